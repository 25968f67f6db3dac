"""The benchmark rows (which network, which work: a training step, one-step sampling, the teacher's Heun sampler, or
an evaluation path: the whole FID-50k of a CIFAR-10 generator, the text-to-image scorers; bench/eval_rows.py), and the
options they run under.

Networks are randomly initialised with the real configurations (EDM's DDPM++ CIFAR-10 and ADM ImageNet-64), so no
download is needed and the timings are those of the real shapes; `tiny` gives small stand-ins for the CPU check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import TrainConfig
from ..denoisers.blocks import EDM_UNET
from ..denoisers.edm import EDMPrecond

# EDM's train.py --arch=ddpmpp at CIFAR-10 (dropout 0.13, augmentation labels of size 9): 55.7M parameters.
DDPMPP_CIFAR10 = dict(img_resolution=32, img_channels=3, label_dim=0, model_type="SongUNet",
                      embedding_type="positional", encoder_type="standard", decoder_type="standard",
                      channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2],
                      num_blocks=4, attn_resolutions=[16], dropout=0.13, augment_dim=9)
# EDM's train.py --arch=adm at class-conditional ImageNet-64 (dropout 0.10): 296M parameters.
ADM_IMAGENET64 = dict(img_resolution=64, img_channels=3, label_dim=1000, model_type="DhariwalUNet",
                      model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8],
                      dropout=0.10)
# Stand-ins with the same code paths (attention, resampling, skips, labels) at a small fraction of the work.
TINY = {
    "ddpmpp-cifar10": dict(DDPMPP_CIFAR10, img_resolution=8, model_channels=8, channel_mult=[1, 2], num_blocks=1,
                           attn_resolutions=[4]),
    "adm-imagenet64": dict(ADM_IMAGENET64, img_resolution=8, label_dim=10, model_channels=32, channel_mult=[1, 2],
                           num_blocks=1, attn_resolutions=[4]),
}
NETWORKS = {"ddpmpp-cifar10": DDPMPP_CIFAR10, "adm-imagenet64": ADM_IMAGENET64}
NETWORK_FAMILIES = {"ddpmpp-cifar10": EDM_UNET, "adm-imagenet64": EDM_UNET}  # As network_family() finds them.
GENERATOR_SIGMA_INIT = 2.5  # SiD's and our presets' sigma_init for EDM teachers.


@dataclass(frozen=True)
class Row:
    """One line of the benchmark table."""

    name: str
    work: str  # "train": one Trainer step (fake update, generator update, EMA); "sample": one-step; "heun": teacher;
    # "fid": the whole FID of `batch`-sized calls; "score": one forward of a text-to-image scorer (EVAL_WORK).
    network: str  # Key of NETWORKS; for "score" rows the scorer, imagereward or pickscore (eval_rows.build_scorer).
    objective: str | None  # sid, sim, dmd, di for "train" rows.
    batch: int  # Default batch (images per step, or per sampling call).


EVAL_WORK = ("fid", "score")  # Rows timed by bench/eval_rows.py: evaluation as `onestep eval` runs it.
ENGINE_ROWS = [
    Row("sid-cifar10", "train", "ddpmpp-cifar10", "sid", 128),
    Row("sim-cifar10", "train", "ddpmpp-cifar10", "sim", 128),
    Row("dmd-cifar10", "train", "ddpmpp-cifar10", "dmd", 128),
    Row("di-cifar10", "train", "ddpmpp-cifar10", "di", 128),
    Row("sample-cifar10", "sample", "ddpmpp-cifar10", None, 1024),
    Row("heun-cifar10", "heun", "ddpmpp-cifar10", None, 1024),
    Row("sid-imagenet64", "train", "adm-imagenet64", "sid", 32),
]
EVAL_ROWS = [
    Row("fid50k-cifar10", "fid", "ddpmpp-cifar10", None, 500),
    Row("imagereward-b64", "score", "imagereward", None, 64),
    Row("pickscore-b64", "score", "pickscore", None, 64),
]
ROWS = {row.name: row for row in ENGINE_ROWS + EVAL_ROWS}
DEFAULT_ROWS = [row.name for row in ENGINE_ROWS]  # The evaluation rows need the Inception file: asked for by name.


@dataclass(frozen=True)
class Options:
    """How the rows run: the engine's switches plus the measurement's own settings."""

    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16, as train.precision.
    tf32: bool = True  # TF32 matrix units for float32 work (CUDA).
    channels_last: bool = TrainConfig.model_fields["channels_last"].default  # As train.channels_last.
    fused_optimizer: bool = TrainConfig.model_fields["fused_optimizer"].default  # As train.fused_optimizer.
    compile: bool = TrainConfig.model_fields["compile"].default  # As train.compile.
    cuda_graph: bool = TrainConfig.model_fields["cuda_graph"].default  # As train.cuda_graph (training rows).
    # Training rows: compile, cuda_graph and channels_last at auto, as the presets set them (the three above then
    # apply to the sampling rows only).
    auto_engine: bool = False
    batch: int | None = None  # Images per step; None: the row's default.
    warmup: int | None = None  # Untimed iterations; None: 3 (1 for Heun).
    iters: int | None = None  # Timed iterations; None: 10 (20 for one-step sampling, 2 for Heun).
    heun_steps: int = 18  # EDM Heun steps (2 * steps - 1 evaluations).
    tiny: bool = False  # Small stand-in networks (the CPU check).
    device: str = "auto"

    @classmethod
    def quick(cls, **overrides) -> "Options":
        """Tiny networks, a couple of iterations, CPU: checks that every row runs, says nothing about speed."""
        return cls(**{"tiny": True, "device": "cpu", "warmup": 1, "iters": 2, "heun_steps": 2, **overrides})


def parse_rows(text: str) -> list[Row]:
    """Rows named in a comma-separated list, in the order given."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ROWS]
    if unknown or not names:
        raise ValueError(f"Unknown benchmark row(s) {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(ROWS)}.")
    return [ROWS[name] for name in names]


def build_network(network: str, tiny: bool = False, seed: int = 0) -> EDMPrecond:
    """A randomly initialised EDM network of the named configuration (its tiny stand-in when `tiny`), frozen, eval."""
    torch.manual_seed(seed)
    kwargs = (TINY if tiny else NETWORKS)[network]
    return EDMPrecond(**kwargs).requires_grad_(False).eval()


def group_norm_shapes(network: str) -> list[tuple[int, int, int, int]]:
    """(channels, height, width, groups) of every GroupNorm input in one forward of the named network, found on fake
    tensors (shapes only: no memory, no arithmetic)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..denoisers.edm.layers import GroupNorm

    config = NETWORKS[network]
    shapes = set()
    with FakeTensorMode():
        net = EDMPrecond(**config)
        for module in net.modules():
            if isinstance(module, GroupNorm):
                module.register_forward_pre_hook(
                    lambda norm, inputs: shapes.add((*inputs[0].shape[1:], norm.num_groups)))
        resolution = config["img_resolution"]
        labels = torch.zeros(1, config["label_dim"]) if config["label_dim"] else None
        net(torch.zeros(1, config["img_channels"], resolution, resolution), torch.ones(1), labels)
    return sorted(shapes)
