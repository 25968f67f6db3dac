"""Where a benchmark row's GPU time goes: kernel time per iteration by kind, against the iteration's wall time.

Runs one row of `onestep bench` (same networks, same options), times it without the profiler, then profiles a few
iterations with torch.profiler and sums the GPU kernels' durations by kind (matrix products and convolutions,
fused Triton kernels, normalisation, element-wise, copies and layout changes, optimizer, other). Kernel time per
iteration well below the wall time means the GPU waits for the host (launch-bound); close to it, the kernels are
the limit and the kinds say which.

    python3 scripts/profile_step.py --row sid-cifar10 --batch 128 [--cuda-graph] [--compile] [--channels-last]
        [--fused-optimizer] [--no-nhwc-kernels] --out results.json

Prints one summary table and the 25 longest kernels; --out also writes them as JSON. CUDA only. `onestep bench` says
how fast a row runs; this says where its time goes, before and after a change to the step or its kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onestep_cli.bench import DEFAULT_ROWS, ROWS, Options, prepare_row  # noqa: E402
from onestep_cli.bench.timing import time_iterations  # noqa: E402
from onestep_cli.denoisers.edm.layers import GroupNorm  # noqa: E402
from onestep_cli.runtime.precision import set_tf32  # noqa: E402

# (kind, substrings of the lower-cased kernel name), first match wins: Triton kernels first, since their names
# list the ops they fuse ("_to_copy", "native_group_norm").
KINDS = [
    ("fused (triton)", ("triton",)),
    ("copy / layout / cast", ("nchwtonhwc", "nhwctonchw", "transpose", "copy", "cast")),
    ("optimizer / EMA", ("adam", "multi_tensor", "foreach", "lerp")),
    ("attention", ("flash", "fmha", "attention", "softmax")),
    ("matmul / conv", ("gemm", "conv", "cutlass", "sm90", "sm80", "xmma", "cudnn", "wgrad", "dgrad", "fprop",
                       "nvjet", "cublas", "implicit")),
    ("normalisation", ("group_norm", "groupnorm", "layer_norm", "welford", "batch_norm", "norm", "moments",
                       "computeinternalgradients", "gammabeta")),
    ("reduction", ("reduce",)),
    ("element-wise", ("elementwise", "vectorized", "unrolled", "index", "fill")),
]


def kind_of(name: str) -> str:
    # ATen's "gpu_kernel_impl_nocast" element-wise kernels are no casts.
    lower = name.lower().replace("nocast", "")
    return next((kind for kind, keys in KINDS if any(key in lower for key in keys)), "other")


def kernel_seconds(step, iterations: int) -> dict[str, float]:
    """GPU seconds per call of `step` of each CUDA kernel, from `iterations` calls under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iterations):
            step()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.self_device_time_total > 0:
            kernels[event.key] = kernels.get(event.key, 0.0) + event.self_device_time_total / 1e6 / iterations
    return kernels


def seconds_by_kind(kernels: dict[str, float]) -> dict[str, float]:
    """`kernels` summed by `kind_of`, longest first."""
    by_kind: dict[str, float] = {}
    for name, seconds in kernels.items():
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + seconds
    return dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))


def print_kernels(kernels: dict[str, float], top: int) -> None:
    """The time by kind (with its share of all kernel time), then the `top` longest kernels."""
    busy = sum(kernels.values())
    for kind, seconds in seconds_by_kind(kernels).items():
        print(f"  {kind:24s} {seconds * 1e3:8.1f} ms  {seconds / busy:6.1%}")
    for name, seconds in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {seconds * 1e3:7.2f} ms  {name[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--row", default="sid-cifar10", choices=DEFAULT_ROWS, help="An engine row of "
                        "`onestep bench` (the evaluation rows are not steps).")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--precision", default="bf16")
    for flag in ("cuda-graph", "compile", "channels-last", "fused-optimizer"):
        parser.add_argument(f"--{flag}", action="store_true")
    parser.add_argument("--no-nhwc-kernels", action="store_true", help="GroupNorm.nhwc_kernels = False: channels_last "
                        "activations normalised by ATen (eager) or inductor (compiled), not our Triton kernels.")
    parser.add_argument("--iters", type=int, default=10, help="Timed iterations without the profiler.")
    parser.add_argument("--profiled", type=int, default=3, help="Iterations under the profiler.")
    parser.add_argument("--out", type=Path, default=None, help="Also write the results here as JSON.")
    args = parser.parse_args()

    device = torch.device("cuda")
    GroupNorm.nhwc_kernels = not args.no_nhwc_kernels
    row = ROWS[args.row]
    options = Options(precision=args.precision, cuda_graph=args.cuda_graph, compile=args.compile,
                      channels_last=args.channels_last, fused_optimizer=args.fused_optimizer, batch=args.batch)
    batch = args.batch or row.batch
    set_tf32(True)
    iterate, _, captured = prepare_row(row, batch, args.precision, options, device)
    first, _ = time_iterations(iterate, device, warmup=3, iters=0)
    _, seconds = time_iterations(iterate, device, warmup=1, iters=args.iters)
    wall = statistics.median(seconds)

    kernels = kernel_seconds(iterate, args.profiled)
    busy = sum(kernels.values())
    options_json = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    result = {"row": args.row, "batch": batch, "options": options_json,
              "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "inductor_layout_optimization": os.environ.get("TORCHINDUCTOR_LAYOUT_OPTIMIZATION", "1"),
              "graph_captured": captured() if captured else None, "first_iter_s": first,
              "seconds_per_iter": wall, "images_per_s": batch / wall, "kernel_seconds_per_iter": busy,
              "gpu_busy_fraction": busy / wall, "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
              "kernel_seconds_by_kind": seconds_by_kind(kernels),
              "top_kernels": sorted(kernels.items(), key=lambda kv: -kv[1])[:25]}
    print(f"{args.row} batch {batch} {args.precision} cuda_graph={args.cuda_graph} compile={args.compile} "
          f"channels_last={args.channels_last}: {wall * 1e3:.1f} ms/iter, {batch / wall:.1f} img/s, kernels "
          f"{busy * 1e3:.1f} ms/iter (GPU busy {busy / wall:.0%}), peak {result['peak_memory_gb']:.1f} GB, first "
          f"{first:.1f} s, captured {result['graph_captured']}")
    print_kernels(kernels, top=25)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
