"""HPSv2: Human Preference Score v2 and v2.1, an open_clip ViT-H-14 fine-tuned on human preference pairs (HPD v2).

Built here with the installed open_clip from the official checkpoints (`HPS_v2_compressed.pt`,
`HPS_v2.1_compressed.pt`), as the reference `hpsv2.score` computes it (the hpsv2 package vendors an old open_clip of
its own, so it is not a dependency):
  image  -> HPSv2's eval transform: bicubic resize of the long side to 224, black padding to a square, CLIP mean/std
            (not open_clip's usual short-side resize and crop; docs/metrics.md section 8)
  prompt -> open_clip's ViT-H-14 tokenizer (CLIP BPE, 77 tokens)
  score  = cos(image embedding, text embedding), reported raw (about 0.2-0.35; HPSv2's benchmark tables print 100x).
The version is an option: `--option hpsv2.version=v2.0` (default v2.1), each with its own weight set.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import FeatureExtractor, MetricContext, MetricError
from .clip import read_state_dict
from .scorer_precision import ScorerArithmetic
from .weights import resolve_weights

HPS_ARCHITECTURE = "ViT-H-14"  # The open_clip config both official checkpoints were fine-tuned from.
HPS_VERSIONS = {"v2.0": "hps_v2.0", "v2.1": "hps_v2.1"}  # The hpsv2 package's `hps_version` -> our weight set.
DEFAULT_HPS_VERSION = "v2.1"
VERSION_OPTION = "hpsv2.version"


def hps_version(ctx: MetricContext) -> str:
    """The version asked for with --option hpsv2.version (v2.1 unless given)."""
    version = ctx.options.get(VERSION_OPTION, DEFAULT_HPS_VERSION)
    if version not in HPS_VERSIONS:
        raise MetricError(f"--option {VERSION_OPTION}={version} is not one of {', '.join(HPS_VERSIONS)} (the "
                          f"versions of the official checkpoints; default {DEFAULT_HPS_VERSION}).")
    return version


def hps_pixels(images: np.ndarray, size: int) -> torch.Tensor:
    """HPSv2's eval transform (its `ResizeMaxSize`, applied after ToTensor): bicubic antialiased resize so that the
    long side is `size`, black padding split evenly (the extra pixel right/bottom), then CLIP's mean/std.
    uint8 [B, H, W, 3] of one size -> float [B, 3, size, size]."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvf

    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32) / 255
    height, width = x.shape[-2:]
    scale = size / max(height, width)
    if scale != 1.0:  # As the reference: an image already `size` on its long side is not resampled.
        new_height, new_width = round(height * scale), round(width * scale)
        x = tvf.resize(x, [new_height, new_width], InterpolationMode.BICUBIC, antialias=True)
    pad_height, pad_width = size - x.shape[-2], size - x.shape[-1]
    # The reference pads only when it resizes; padding always keeps a non-square image of long side `size` usable.
    x = tvf.pad(x, [pad_width // 2, pad_height // 2, pad_width - pad_width // 2, pad_height - pad_height // 2], fill=0)
    return tvf.normalize(x, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)


def load_hps_model(path, device: torch.device):
    """open_clip's ViT-H-14 with the `state_dict` of an official HPSv2 checkpoint, loaded strictly, in fp32."""
    import open_clip

    state = read_state_dict(path)  # torch.load(weights_only=True), then the checkpoint's 'state_dict'.
    model = open_clip.create_model(HPS_ARCHITECTURE, pretrained=None, precision="fp32")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MetricError(f"{path} does not fit open_clip's {HPS_ARCHITECTURE}: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}. Is it an official HPSv2 checkpoint (a dict whose "
                          "'state_dict' holds the open_clip model)?")
    return model.eval().requires_grad_(False).to(device)  # fp32 parameters, whatever the file's precision.


def hps_score(model, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per (image, prompt) row: the cosine of the L2-normalised image and text embeddings (the diagonal of
    image_features @ text_features.T in `hpsv2.score`; no logit scale)."""
    image = torch.nn.functional.normalize(model.encode_image(pixels).double(), dim=-1)
    text = torch.nn.functional.normalize(model.encode_text(tokens).double(), dim=-1)
    return (image * text).sum(dim=-1)


class HPSv2Score(FeatureExtractor):
    """Per (image, prompt): HPS v2 or v2.1, the raw cosine of the fine-tuned CLIP's image and text embeddings."""

    space = "hpsv2"
    needs_prompts = True

    def __init__(self, ctx: MetricContext):
        import open_clip

        self.version = hps_version(ctx)
        weight_set = HPS_VERSIONS[self.version]
        resolved = resolve_weights(weight_set, "hpsv2", ctx.weights_override(weight_set))
        self.model = load_hps_model(resolved.path(), ctx.device)
        image_size = self.model.visual.image_size
        self.image_size = int(image_size[0] if isinstance(image_size, (tuple, list)) else image_size)
        self.tokenizer = open_clip.get_tokenizer(HPS_ARCHITECTURE)
        self.key = f"hpsv2[{self.version}]"
        self.device = ctx.device
        self.arithmetic = ScorerArithmetic(ctx.scorer_precision, ctx.device)
        self.provenance = {
            "score": "cos(image, text) of the L2-normalised embeddings (raw HPS; HPSv2's benchmark prints 100x)",
            "model": f"HPS {self.version} (open_clip {HPS_ARCHITECTURE} fine-tuned on HPD v2), onestep's scorer on "
                     "open_clip (not the hpsv2 package)",
            "version": self.version, "open_clip_model": HPS_ARCHITECTURE,
            "architecture": {"image_size": self.image_size, "context_length": int(self.model.context_length),
                             "parameters": int(sum(p.numel() for p in self.model.parameters()))},
            "weights": resolved.provenance(), "backend": f"open_clip {open_clip.__version__}",
            "preprocess": f"HPSv2 eval transform: bicubic antialiased resize of the long side to {self.image_size}, "
                          "black padding to a square, CLIP mean/std",
            "tokenizer": f"open_clip {HPS_ARCHITECTURE} {type(self.tokenizer).__name__} (truncated at "
                         f"{self.model.context_length} tokens)", **self.arithmetic.provenance()}

    @torch.no_grad()
    def extract(self, images, prompts) -> np.ndarray:
        pixels = hps_pixels(images, self.image_size).to(self.device)
        tokens = self.tokenizer(list(prompts)).to(self.device)
        with self.arithmetic():
            scores = hps_score(self.model, pixels, tokens)
        return scores.cpu().numpy()[:, None]
