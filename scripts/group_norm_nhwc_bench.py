"""GroupNorm + SiLU, forward and backward, on an EDM network's norm shapes at batch 256 (bf16): our Triton
kernels on channels_last against ATen's group_norm in NCHW, inductor's compiled NCHW group_norm, and inductor's
compilation of `layers.group_norm_channels_last` on channels_last. Prints milliseconds per forward+backward
(replayed as a CUDA graph, as the training step runs) and the memory bandwidth the kernels' bytes imply (forward reads
x twice and writes y; backward reads x and dy twice each and writes dx: 8 reads or writes of 2 bytes per element in
all). CUDA only.

    python3 scripts/group_norm_nhwc_bench.py [--network ddpmpp-cifar10|adm-imagenet64] [--batch 256]
        [--block-elements 16384,65536]
        [--variant blocks=131072,warps=16 --variant stages=1,unroll=4 ...]

Rerun it after changing the kernels (onestep_cli/denoisers/edm/group_norm_nhwc.py), or to choose their launch
settings on another GPU: a `--variant` times ours with some of the module's launch settings changed: blocks
(BLOCK_ELEMENTS), tile (TILE_ELEMENTS), warps (REDUCTION_WARPS), stages (REDUCTION_STAGES), unroll
(REDUCTION_UNROLL).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onestep_cli.bench.rows import NETWORKS, group_norm_shapes  # noqa: E402
from onestep_cli.denoisers.edm import group_norm_nhwc as kernels  # noqa: E402
from onestep_cli.denoisers.edm.layers import group_norm_channels_last  # noqa: E402


def aten(x, weight, bias):
    return torch.nn.functional.silu(torch.nn.functional.group_norm(x, 32, weight, bias, 1e-5))


def nhwc_view(x, weight, bias):
    return torch.nn.functional.silu(group_norm_channels_last(x, 32, weight, bias, 1e-5))


SETTINGS = {"blocks": "BLOCK_ELEMENTS", "tile": "TILE_ELEMENTS", "warps": "REDUCTION_WARPS",
            "stages": "REDUCTION_STAGES", "unroll": "REDUCTION_UNROLL"}
DEFAULTS = {key: getattr(kernels, name) for key, name in SETTINGS.items()}


def ours(variant: str):
    """Our kernels with the launch settings `variant` ("key=value,...") changed from the module's defaults."""
    settings = dict(DEFAULTS)
    for item in filter(None, variant.split(",")):
        key, _, value = item.partition("=")
        if key not in SETTINGS or not value.isdigit():
            raise SystemExit(f"--variant {variant}: {item!r} is not setting=integer; the settings: "
                             f"{', '.join(SETTINGS)}.")
        settings[key] = int(value)

    def group_norm_silu(x, weight, bias):
        for key, value in settings.items():  # Read when the kernels are launched (here, at capture).
            setattr(kernels, SETTINGS[key], value)
        return kernels.group_norm_nhwc(x, 32, weight, bias, 1e-5, silu=True)
    return group_norm_silu


def milliseconds(function, x, weight, bias, upstream, iters: int = 50) -> float:
    """GPU time of one forward+backward, replayed as a CUDA graph (as the training step runs): no host overhead."""
    def step():
        torch.autograd.grad(function(x, weight, bias), (x, weight, bias), upstream)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", default="ddpmpp-cifar10", choices=list(NETWORKS),
                        help="Whose GroupNorm shapes (every norm of one forward).")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--block-elements", default=str(kernels.BLOCK_ELEMENTS),
                        help="Comma-separated sizes of the reduction kernels' blocks to time ours with.")
    parser.add_argument("--variant", action="append", default=[],
                        help="Also time ours with these launch settings changed, e.g. blocks=131072,warps=16.")
    args = parser.parse_args()
    ours_variants = {f"ours, blocks of {size}": ours(f"blocks={size}") for size in args.block_elements.split(",")}
    ours_variants.update({f"ours {chr(ord('A') + i)}": ours(variant) for i, variant in enumerate(args.variant)})
    variants = {"aten nchw": (aten, torch.contiguous_format),
                "compiled nchw": (torch.compile(aten), torch.contiguous_format),
                "compiled nhwc view": (torch.compile(nhwc_view), torch.channels_last),
                **{name: (function, torch.channels_last) for name, function in ours_variants.items()}}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, batch {args.batch}; "
          f"ms per forward+backward (GB/s); ours' defaults {DEFAULTS}")
    for i, variant in enumerate(args.variant):
        print(f"ours {chr(ord('A') + i)}: {variant}")
    print(f"{'C x HxW':>12} | " + " | ".join(f"{name:>22}" for name in variants))
    for channels, height, width, groups in group_norm_shapes(args.network):
        assert groups == 32, "the ATen and inductor columns normalise over 32 groups"
        shape = (args.batch, channels, height, width)
        cells = []
        for function, memory_format in variants.values():
            x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).to(memory_format=memory_format)
            weight, bias = (torch.randn(channels, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            x, weight, bias = (t.requires_grad_() for t in (x, weight, bias))
            ms = milliseconds(function, x, weight, bias, torch.randn_like(x))
            cells.append(f"{ms:7.3f} ({8 * 2 * x.numel() / ms / 1e6:5.0f})")
        print(f"{channels:>4} x {height:>2}x{width:<2} | " + " | ".join(f"{cell:>22}" for cell in cells))


if __name__ == "__main__":
    main()
