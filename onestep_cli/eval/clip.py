"""CLIP through open_clip: CLIP score, the LAION aesthetic predictor, and CLIP image features for fd_clip.

The default CLIP is OpenAI's ViT-L/14 (weight set `clip_vit_l14`), the network the aesthetic predictor was trained
on. Its architecture is read from the weights (open_clip's builder for OpenAI state dicts), so the file decides what
runs and the provenance records it. `clip_score` can use any open_clip model instead:
`--option clip_score.model=ViT-H-14 --option clip_score.pretrained=/path/open_clip_pytorch_model.bin`.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .base import FeatureExtractor, MetricContext, MetricError
from .scorer_precision import ScorerArithmetic
from .weights import file_sha256, resolve_weights

CLIP_SCORE_WEIGHT = 100.0  # CLIPScore = 100 * max(cos, 0), as torchmetrics and most text-to-image papers.


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def read_state_dict(path: Path) -> dict:
    """Tensors of a checkpoint: a TorchScript archive (OpenAI's CLIP release), safetensors, or a plain state dict
    read with torch.load(weights_only=True). Nothing here unpickles arbitrary Python objects."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if _is_torchscript_archive(path):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign or damaged files
        raise MetricError(f"{path} could not be read as a state dict ({exc}).") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


def clip_image_transform(image_size: int):
    """OpenAI CLIP's eval preprocessing as open_clip builds it: bicubic resize of the short side, centre crop,
    normalisation by CLIP's mean/std (PIL images in, tensors out)."""
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return open_clip.image_transform(image_size, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)


def to_pixels(images: np.ndarray, transform) -> torch.Tensor:
    from PIL import Image

    return torch.stack([transform(Image.fromarray(image)) for image in images])


class LoadedCLIP:
    def __init__(self, model, transform, tokenizer, provenance: dict):
        self.model, self.transform, self.tokenizer, self.provenance = model, transform, tokenizer, provenance


def load_openai_clip(ctx: MetricContext, metric: str) -> LoadedCLIP:
    """The `clip_vit_l14` weights as an open_clip model (once per evaluation)."""
    if "clip_vit_l14" not in ctx.cache:
        import open_clip
        from open_clip.model import build_model_from_openai_state_dict

        resolved = resolve_weights("clip_vit_l14", metric, ctx.weights_override("clip_vit_l14"))
        state = read_state_dict(resolved.path())
        state = {k: v for k, v in state.items() if k not in ("input_resolution", "context_length", "vocab_size")}
        model = build_model_from_openai_state_dict(dict(state), quick_gelu=True, cast_dtype=None).float().eval()
        model.load_state_dict({k: v.float() for k, v in state.items()})  # The builder rounds weights through fp16.
        model.requires_grad_(False).to(ctx.device)
        image_size = model.visual.image_size
        image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
        provenance = {"model": "OpenAI CLIP ViT-L/14 (architecture read from the weights)",
                      "architecture": _describe(model, image_size), "weights": resolved.provenance(),
                      "backend": f"open_clip {open_clip.__version__}", "precision": "fp32",
                      "preprocess": f"bicubic resize short side to {image_size}, centre crop, CLIP mean/std "
                                    "(open_clip.image_transform)"}
        tokenizer = open_clip.SimpleTokenizer(context_length=model.context_length)
        ctx.cache["clip_vit_l14"] = LoadedCLIP(model, clip_image_transform(image_size), tokenizer, provenance)
    return ctx.cache["clip_vit_l14"]


def load_named_clip(ctx: MetricContext, model_name: str, pretrained: str) -> LoadedCLIP:
    """Any open_clip model from a local weights file (clip_score options)."""
    key = f"open_clip:{model_name}:{pretrained}"
    if key not in ctx.cache:
        import open_clip

        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise MetricError(f"clip_score.pretrained {path} does not exist; give the local weights file of "
                              f"open_clip model {model_name} (nothing is downloaded).")
        model = open_clip.create_model(model_name, pretrained=str(path), device=ctx.device).eval()
        model.requires_grad_(False)
        image_size = model.visual.image_size
        image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
        provenance = {"model": f"open_clip {model_name}", "architecture": _describe(model, image_size),
                      "weights": {"path": str(path), "origin": "user path", "sha256": {path.name: file_sha256(path)}},
                      "backend": f"open_clip {open_clip.__version__}", "precision": "fp32",
                      "preprocess": f"bicubic resize short side to {image_size}, centre crop, CLIP mean/std"}
        ctx.cache[key] = LoadedCLIP(model, clip_image_transform(image_size), open_clip.get_tokenizer(model_name),
                                    provenance)
    return ctx.cache[key]


def _describe(model, image_size: int) -> dict:
    return {"image_size": int(image_size), "embed_dim": int(model.text_projection.shape[1])
            if isinstance(getattr(model, "text_projection", None), torch.Tensor) else None,
            "parameters": int(sum(p.numel() for p in model.parameters()))}


class CLIPImageFeatures(FeatureExtractor):
    """CLIP image embeddings (before L2 normalisation), for fd_clip."""

    space = "clip"
    key = "clip"

    def __init__(self, ctx: MetricContext):
        self.clip = load_openai_clip(ctx, "fd_clip")
        self.device = ctx.device
        self.provenance = {"features": "CLIP image embedding (unnormalised)", **self.clip.provenance}

    @torch.no_grad()
    def extract(self, images, prompts=None) -> np.ndarray:
        pixels = to_pixels(images, self.clip.transform).to(self.device)
        return self.clip.model.encode_image(pixels).double().cpu().numpy()


class CLIPScore(FeatureExtractor):
    """Per image: 100 * max(cos(CLIP image embedding, CLIP text embedding of its prompt), 0)."""

    space = "clip_score"
    needs_prompts = True

    def __init__(self, ctx: MetricContext):
        model_name = ctx.options.get("clip_score.model")
        pretrained = ctx.options.get("clip_score.pretrained")
        if (model_name is None) != (pretrained is None):
            raise MetricError("Give clip_score.model and clip_score.pretrained together (an open_clip model name and "
                              "its local weights file), or neither for OpenAI CLIP ViT-L/14 from the cache.")
        self.clip = (load_named_clip(ctx, model_name, pretrained) if model_name
                     else load_openai_clip(ctx, "clip_score"))
        self.key = f"clip_score[{model_name or 'clip_vit_l14'}]"
        self.device = ctx.device
        self.arithmetic = ScorerArithmetic(ctx.scorer_precision, ctx.device)
        self.provenance = {"score": f"{CLIP_SCORE_WEIGHT:g} * max(cos(image, text), 0)", **self.clip.provenance,
                           "tokenizer": f"open_clip {type(self.clip.tokenizer).__name__} (truncated at "
                                        f"{self.clip.model.context_length} tokens)", **self.arithmetic.provenance()}

    @torch.no_grad()
    def extract(self, images, prompts) -> np.ndarray:
        model = self.clip.model
        pixels, tokens = to_pixels(images, self.clip.transform).to(self.device), self.clip.tokenizer(list(prompts))
        with self.arithmetic():
            image, text = model.encode_image(pixels), model.encode_text(tokens.to(self.device))
        cosine = torch.nn.functional.cosine_similarity(image.double(), text.double(), dim=-1)
        return (CLIP_SCORE_WEIGHT * cosine.clamp(min=0)).cpu().numpy()[:, None]


class RewardHead(nn.Module):
    """The MLP of the LAION aesthetic predictor and of ImageReward: Linear layers in->1024->128->64->16->1 with
    dropout between the first four and no nonlinearity (the layout of their state dicts: layers.0/2/4/6/7)."""

    def __init__(self, input_dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AestheticScore(FeatureExtractor):
    """Per image: the LAION improved aesthetic predictor (MLP on the L2-normalised CLIP ViT-L/14 image embedding)."""

    space = "aesthetic"
    key = "aesthetic"

    def __init__(self, ctx: MetricContext):
        self.clip = load_openai_clip(ctx, "aesthetic")
        resolved = resolve_weights("aesthetic_head", "aesthetic", ctx.weights_override("aesthetic_head"))
        state = read_state_dict(resolved.path())
        if "layers.0.weight" not in state:
            raise MetricError(f"{resolved.path()} is not the aesthetic predictor's MLP (no 'layers.0.weight'; it "
                              f"holds {sorted(state)[:4]}...).")
        self.head = RewardHead(state["layers.0.weight"].shape[1])
        self.head.load_state_dict(state)
        self.head.eval().requires_grad_(False).to(ctx.device)
        self.device = ctx.device
        self.arithmetic = ScorerArithmetic(ctx.scorer_precision, ctx.device)
        self.provenance = {"score": "MLP(L2-normalised CLIP image embedding)", **self.clip.provenance,
                           "head_weights": resolved.provenance(), **self.arithmetic.provenance()}

    @torch.no_grad()
    def extract(self, images, prompts=None) -> np.ndarray:
        pixels = to_pixels(images, self.clip.transform).to(self.device)
        with self.arithmetic():
            embedding = self.clip.model.encode_image(pixels).float()
            embedding = embedding / embedding.norm(dim=-1, keepdim=True)
            score = self.head(embedding)
        return score.double().cpu().numpy()
