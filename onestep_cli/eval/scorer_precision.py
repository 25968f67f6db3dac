"""The arithmetic of the per-image scorers (clip_score, aesthetic, imagereward, pickscore, hpsv2), chosen with
`onestep eval --scorer-precision`:

  fp32 (default)  float32 weights and arithmetic; on CUDA TF32 is switched off for the call (cuDNN allows it for
                  convolutions by default), so the scores are strict float32 whatever the process set.
  tf32            float32 weights; CUDA matmuls and cuDNN convolutions may use TF32 tensor cores (10-bit mantissa).
                  Only GPUs of compute capability 8.0 and newer have them: elsewhere, the CPU included, it has no
                  effect, and the provenance says so.
  bf16            float32 weights under torch.autocast(bfloat16): linear layers, matmuls, convolutions and attention
                  in bfloat16, the ops autocast keeps in float32 (layer norms, softmax on CUDA) in float32.

The settings hold only inside the scorer's network call and are restored afterwards. Distribution features (Inception,
CLIP for fd_clip, DINOv2) always run in fp32: their statistics are compared with reference statistics made in fp32.
"""

from __future__ import annotations

import contextlib

import torch

from ..runtime.precision import set_tf32
from .base import check_scorer_precision

TF32_MIN_CAPABILITY = 8  # Ampere: the first GPUs with TF32 tensor cores.


class ScorerArithmetic:
    """A scorer's precision on its device: `with arithmetic():` around the network call, `provenance()` for the
    result."""

    def __init__(self, precision: str, device: str | torch.device):
        check_scorer_precision(precision)
        self.precision = precision
        self.device = torch.device(device)

    def tf32_has_effect(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.get_device_capability(self.device)[0] >= TF32_MIN_CAPABILITY

    @contextlib.contextmanager
    def __call__(self):
        if self.precision == "bf16":
            # Autocast rather than bf16 weights: one mechanism for open_clip and transformers (open_clip's own
            # evaluation, --precision amp_bf16, does the same), and the fp32 weights and norms are not rounded.
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                yield
            return
        with torch.autocast(self.device.type, enabled=False), _tf32(self.device, self.precision == "tf32"):
            yield

    def provenance(self) -> dict:
        """The precision the scores were computed in, and how."""
        if self.precision == "bf16":
            return {"precision": "bf16", "arithmetic": "torch.autocast(bfloat16) over fp32 weights: linear layers, "
                                                       "matmuls, convolutions and attention in bf16"}
        if self.precision == "tf32" and self.tf32_has_effect():
            return {"precision": "tf32", "arithmetic": "fp32 weights; CUDA matmuls and cuDNN convolutions in TF32"}
        if self.precision == "tf32":
            return {"precision": "fp32", "precision_asked": "tf32",
                    "arithmetic": f"strict float32: TF32 had no effect on this device ({self.device.type}; TF32 "
                                  "needs a CUDA GPU of compute capability 8.0 or newer)"}
        return {"precision": "fp32", "arithmetic": "strict float32 (no autocast; TF32 off on CUDA)"}


@contextlib.contextmanager
def _tf32(device: torch.device, enabled: bool):
    """TF32 for CUDA matmuls and cuDNN convolutions on or off inside the block, the process's flags restored after."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    set_tf32(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
