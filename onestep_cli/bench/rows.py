"""The benchmark rows: the engine's (which networks, which work: a training iteration or sampling, and the target)
and the evaluation rows (the whole FID-50k of a CIFAR-10 generator, the text-to-image scorers; bench/eval_rows.py).

Networks are randomly initialised with the real configurations (EDM's DDPM++ CIFAR-10 and ADM ImageNet-64), so no
download is needed and the timings are those of the real shapes; `tiny` gives small stand-ins for the CPU check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


@dataclass(frozen=True)
class Row:
    """One line of the benchmark table."""

    name: str
    work: str  # "train": one Trainer step (fake update, generator update, EMA); "sample": one-step; "heun": teacher;
    # "fid": the whole FID of `batch`-sized calls; "score": one forward of a text-to-image scorer (EVAL_WORK).
    network: str  # Key of NETWORKS; for "score" rows the scorer, imagereward or pickscore (eval_rows.build_scorer).
    objective: str | None  # sid, sim, dmd, di for "train" rows.
    batch: int  # Default batch (images per step, or per sampling call).
    target: str  # The target, as printed.
    target_images_per_s: float | None = None  # Absolute target, when the issue gives one.
    relative_to: str | None = None  # "at least 2x" that row's images/s measured in the same invocation.
    target_seconds: float | None = None  # Wall-time target of a one-shot row (fid).


EVAL_WORK = ("fid", "score")  # Rows timed by bench/eval_rows.py: evaluation as `onestep eval` runs it.
ENGINE_ROWS = [
    Row("sid-cifar10", "train", "ddpmpp-cifar10", "sid", 128, ">= 600 img/s (stretch 750)", 600),
    Row("sim-cifar10", "train", "ddpmpp-cifar10", "sim", 128, ">= 600 img/s (stretch 750)", 600),
    Row("dmd-cifar10", "train", "ddpmpp-cifar10", "dmd", 128, ">= 2x sid-cifar10", relative_to="sid-cifar10"),
    Row("di-cifar10", "train", "ddpmpp-cifar10", "di", 128, ">= 2x sid-cifar10", relative_to="sid-cifar10"),
    Row("sample-cifar10", "sample", "ddpmpp-cifar10", None, 1024, ">= 8000 img/s", 8000),
    Row("heun-cifar10", "heun", "ddpmpp-cifar10", None, 1024, "report (reference 125 img/s)"),
    Row("sid-imagenet64", "train", "adm-imagenet64", "sid", 32, "report img/s and FLOP utilisation"),
]
EVAL_ROWS = [
    Row("fid50k-cifar10", "fid", "ddpmpp-cifar10", None, 500, "FID-50k in < 60 s", target_seconds=60),
    Row("imagereward-b64", "score", "imagereward", None, 64, "report img/s"),
    Row("pickscore-b64", "score", "pickscore", None, 64, "report img/s"),
]
ROWS = {row.name: row for row in ENGINE_ROWS + EVAL_ROWS}
DEFAULT_ROWS = [row.name for row in ENGINE_ROWS]  # The evaluation rows need the Inception file: asked for by name.


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
