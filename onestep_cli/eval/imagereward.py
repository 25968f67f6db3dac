"""ImageReward v1.0, scored by our own module built from transformers' BLIP parts and loaded from the official
`ImageReward.pt` state dict and `med_config.json` (the image-reward package cannot be installed beside current
transformers; see docs/metrics.md).

The reference computes, per (prompt, image):
  image  -> BLIP ViT-L/16 (224 px, CLIP preprocessing) -> all token states (after the final LayerNorm)
  prompt -> BERT tokenizer (bert-base-uncased + [DEC], [ENC]; [CLS] ... [SEP], padded/truncated to 35 tokens)
         -> BLIP's BERT with cross-attention to the image tokens in every layer -> state of the first token
  reward = (MLP(first-token state) - mean) / std, with the mean and std fixed in the reference code.
BLIP's ViT and text encoder are transformers' BlipVisionModel and BlipTextModel; the official parameter names map
onto theirs (`official_to_ours`), and loading is strict: every parameter of ours must come from the file.
"""

from __future__ import annotations

import json
import re

import numpy as np
import torch
from torch import nn

from .base import FeatureExtractor, MetricContext, MetricError
from .clip import RewardHead, clip_image_transform, read_state_dict, to_pixels
from .scorer_precision import ScorerArithmetic
from .weights import resolve_weights

REWARD_MEAN = 0.16717362830052426  # Normalisation constants of ImageReward v1.0 (ImageReward.py).
REWARD_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35
VIT_HEAD_DIM = 64  # BLIP's ViT-B/L use 64-dimensional heads (12 and 16 heads); not stored in the state dict.
VIT_LAYER_NORM_EPS = 1e-6

# Official name (after 'blip.visual_encoder.') -> transformers BlipVisionModel name.
_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.fc(\d)\.", r"encoder.layers.\1.mlp.fc\2."),
    (r"^norm\.", "post_layernorm."),
]


def official_to_ours(state: dict) -> tuple[dict, list[str]]:
    """Rename an ImageReward.pt state dict to this module's names; returns (renamed, keys not used: BLIP's contrastive
    projections vision_proj/text_proj, which the reward does not read)."""
    renamed, unused = {}, []
    for name, tensor in state.items():
        if name.startswith("blip.visual_encoder."):
            rest = name[len("blip.visual_encoder."):]
            for pattern, replacement in _VISION_RENAMES:
                if re.search(pattern, rest):
                    renamed["vision." + re.sub(pattern, replacement, rest)] = tensor
                    break
            else:
                unused.append(name)
        elif name.endswith("position_ids"):
            continue  # A buffer of arange values, rebuilt by transformers.
        elif name.startswith("blip.text_encoder."):
            renamed["text." + name[len("blip.text_encoder."):]] = tensor
        elif name.startswith("mlp.layers."):
            renamed["head." + name[len("mlp."):]] = tensor
        else:
            unused.append(name)
    return renamed, unused


def vision_config_from_state(state: dict):
    """BlipVisionConfig of the ViT in an official state dict (sizes read from the tensors)."""
    from transformers import BlipVisionConfig

    prefix = "blip.visual_encoder."
    hidden = state[prefix + "cls_token"].shape[-1]
    patch = state[prefix + "patch_embed.proj.weight"].shape[-1]
    grid = round((state[prefix + "pos_embed"].shape[1] - 1) ** 0.5)
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k)))
    return BlipVisionConfig(hidden_size=hidden, intermediate_size=state[prefix + "blocks.0.mlp.fc1.weight"].shape[0],
                            num_hidden_layers=layers, num_attention_heads=hidden // VIT_HEAD_DIM,
                            image_size=patch * grid, patch_size=patch, layer_norm_eps=VIT_LAYER_NORM_EPS,
                            hidden_act="gelu", attention_dropout=0.0)


def text_config_from_med(med: dict, vision_width: int):
    """BlipTextConfig of BLIP's BERT from med_config.json; cross-attention reads the ViT's width (as BLIP sets
    encoder_width = vision_width)."""
    from transformers import BlipTextConfig

    return BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=med["hidden_size"],
                          encoder_hidden_size=vision_width, intermediate_size=med["intermediate_size"],
                          num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
                          max_position_embeddings=med["max_position_embeddings"],
                          layer_norm_eps=med.get("layer_norm_eps", 1e-12), hidden_act=med.get("hidden_act", "gelu"),
                          pad_token_id=med.get("pad_token_id", 0), hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, is_decoder=True)  # is_decoder builds the cross-attention.


class ImageRewardModel(nn.Module):
    """BLIP ViT + BLIP BERT with cross-attention + reward MLP; forward gives the raw (unnormalised) reward."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = RewardHead(text_config.hidden_size)

    def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        image_states = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_states.shape[:-1], dtype=torch.long, device=image_states.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_states,
                         encoder_attention_mask=image_mask, is_decoder=False)  # Bidirectional self-attention.
        return self.head(text.last_hidden_state[:, 0, :].float())[:, 0]

    def reward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        """ImageReward v1.0: the raw reward normalised by the reference code's fixed mean and std (float64)."""
        return (self(pixel_values, input_ids, attention_mask).double() - REWARD_MEAN) / REWARD_STD


def build_tokenizer(vocab_file):
    """BLIP's tokenizer: bert-base-uncased plus [DEC] (bos) and [ENC] special tokens (vocabulary 30524)."""
    import inspect

    from transformers import BertTokenizer

    # transformers 5 takes the vocabulary as `vocab`, 4 as `vocab_file`.
    argument = "vocab" if "vocab" in inspect.signature(BertTokenizer.__init__).parameters else "vocab_file"
    tokenizer = BertTokenizer(**{argument: str(vocab_file)}, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load_imagereward(files: dict, device) -> tuple[ImageRewardModel, object, list[str]]:
    """(model, tokenizer, unused official keys) from the three files of the `imagereward` weight set."""
    med = json.loads(files["med_config.json"].read_text())
    state = read_state_dict(files["ImageReward.pt"])
    if "blip.visual_encoder.cls_token" not in state:
        raise MetricError(f"{files['ImageReward.pt']} is not an ImageReward state dict (no "
                          "'blip.visual_encoder.cls_token').")
    vision_config = vision_config_from_state(state)
    model = ImageRewardModel(vision_config, text_config_from_med(med, vision_config.hidden_size))
    renamed, unused = official_to_ours(state)
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    if missing or unexpected:
        raise MetricError(f"{files['ImageReward.pt']} does not fit ImageReward's architecture: missing "
                          f"{missing[:5]}, unexpected {unexpected[:5]}.")
    tokenizer = build_tokenizer(files["bert-base-uncased-vocab.txt"])
    if len(tokenizer) != med["vocab_size"]:
        raise MetricError(f"The tokenizer has {len(tokenizer)} tokens but med_config.json says vocab_size "
                          f"{med['vocab_size']}; the vocabulary file is not bert-base-uncased's.")
    return model.eval().requires_grad_(False).to(device), tokenizer, unused


class ImageRewardScore(FeatureExtractor):
    """Per (image, prompt): ImageReward v1.0, normalised by its fixed mean and std."""

    space = "imagereward"
    key = "imagereward"
    needs_prompts = True

    def __init__(self, ctx: MetricContext):
        import transformers

        resolved = resolve_weights("imagereward", "imagereward", ctx.weights_override("imagereward"))
        self.model, self.tokenizer, unused = load_imagereward(resolved.files, ctx.device)
        image_size = self.model.vision.config.image_size
        self.transform = clip_image_transform(image_size)
        self.device = ctx.device
        self.arithmetic = ScorerArithmetic(ctx.scorer_precision, ctx.device)
        self.provenance = {
            "score": f"(MLP(BLIP text-image state of [CLS]) - {REWARD_MEAN}) / {REWARD_STD}",
            "model": "ImageReward v1.0, onestep's scorer on transformers BLIP modules (not the image-reward package)",
            "backend": f"transformers {transformers.__version__}", "weights": resolved.provenance(),
            "unused_weights": sorted({k.split(".")[1] if k.startswith("blip.") else k for k in unused}),
            "preprocess": f"bicubic resize short side to {image_size}, centre crop, CLIP mean/std",
            "tokenizer": f"bert-base-uncased + [DEC]/[ENC], padded/truncated to {MAX_PROMPT_TOKENS}",
            **self.arithmetic.provenance()}

    @torch.no_grad()
    def extract(self, images, prompts) -> np.ndarray:
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                                return_tensors="pt")
        pixels = to_pixels(images, self.transform).to(self.device)
        with self.arithmetic():
            scores = self.model.reward(pixels, tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device))
        return scores.cpu().numpy()[:, None]
