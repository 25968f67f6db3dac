"""Scorers and feature networks that load through transformers from local folders: PickScore and DINOv2."""

from __future__ import annotations

import numpy as np
import torch

from .base import FeatureExtractor, MetricContext
from .scorer_precision import ScorerArithmetic
from .weights import resolve_weights

DINOV2_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PICKSCORE_MAX_TOKENS = 77


def _pooled(output) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4 and an output object (projected pooler_output) in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def pickscore(model, pixel_values, input_ids, attention_mask) -> torch.Tensor:
    """PickScore_v1 of preprocessed images and tokenised prompts (on the model's device): logit_scale.exp() times
    the cosine of the projected image and text embeddings."""
    image = _pooled(model.get_image_features(pixel_values=pixel_values)).float()  # The cosine in fp32 under bf16.
    text = _pooled(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)).float()
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * (image * text).sum(dim=-1)


class PickScore(FeatureExtractor):
    """Per (image, prompt): PickScore_v1 = logit_scale.exp() * cos(image embedding, text embedding), the raw score of
    the official inference code (about 20-23 for typical images; papers quoting 0.22 divide by 100)."""

    space = "pickscore"
    key = "pickscore"
    needs_prompts = True

    def __init__(self, ctx: MetricContext):
        import transformers
        from transformers import CLIPModel, CLIPProcessor

        resolved = resolve_weights("pickscore", "pickscore", ctx.weights_override("pickscore"))
        model_dir = resolved.path("model/config.json").parent
        processor_dir = resolved.path("processor/preprocessor_config.json").parent
        self.model = CLIPModel.from_pretrained(model_dir, local_files_only=True).eval().requires_grad_(False)
        self.model.to(ctx.device)
        self.processor = CLIPProcessor.from_pretrained(processor_dir, local_files_only=True)
        self.device = ctx.device
        self.arithmetic = ScorerArithmetic(ctx.scorer_precision, ctx.device)
        self.provenance = {"score": "logit_scale.exp() * cos(image, text) (raw PickScore)",
                           "model": "PickScore_v1 (transformers CLIPModel)", "weights": resolved.provenance(),
                           "backend": f"transformers {transformers.__version__}",
                           "preprocess": "CLIPProcessor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                           "tokenizer": f"CLIP BPE, padded, truncated at {PICKSCORE_MAX_TOKENS}",
                           **self.arithmetic.provenance()}

    @torch.no_grad()
    def extract(self, images, prompts) -> np.ndarray:
        from PIL import Image

        image_inputs = self.processor(images=[Image.fromarray(a) for a in images], return_tensors="pt")
        text_inputs = self.processor(text=list(prompts), padding=True, truncation=True,
                                     max_length=PICKSCORE_MAX_TOKENS, return_tensors="pt")
        with self.arithmetic():
            scores = pickscore(self.model, image_inputs["pixel_values"].to(self.device),
                               text_inputs["input_ids"].to(self.device), text_inputs["attention_mask"].to(self.device))
        return scores.double().cpu().numpy()[:, None]


def dinov2_input(images: np.ndarray) -> torch.Tensor:
    """EDM2's DINOv2 preprocessing ('torch' mode): bicubic antialiased resize of 0..255 floats to 224x224, then
    [0, 1] and ImageNet mean/std."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32)
    x = torch.nn.functional.interpolate(x, size=(DINOV2_SIZE, DINOV2_SIZE), mode="bicubic", antialias=True) / 255
    mean = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
    return (x - mean) / std


class DINOv2Features(FeatureExtractor):
    """DINOv2 features (layer-normed CLS token, 1024 for ViT-L/14), for fd_dinov2 as in EDM2."""

    space = "dinov2"
    key = "dinov2"

    def __init__(self, ctx: MetricContext):
        import transformers
        from transformers import Dinov2Model

        resolved = resolve_weights("dinov2", "fd_dinov2", ctx.weights_override("dinov2"))
        folder = resolved.path("config.json").parent
        self.model = Dinov2Model.from_pretrained(folder, local_files_only=True).eval().requires_grad_(False)
        self.model.to(ctx.device)
        self.device = ctx.device
        self.provenance = {"features": "DINOv2 layer-normed CLS token (transformers Dinov2Model pooler_output)",
                           "weights": resolved.provenance(), "backend": f"transformers {transformers.__version__}",
                           "preprocess": "EDM2 'torch' mode: bicubic antialiased resize to 224x224, ImageNet mean/std",
                           "note": "EDM2 runs the torch.hub DINOv2; equivalence of the two loaders is not checked"}

    @torch.no_grad()
    def extract(self, images, prompts=None) -> np.ndarray:
        return self.model(pixel_values=dinov2_input(images).to(self.device)).pooler_output.double().cpu().numpy()
