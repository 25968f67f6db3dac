"""The measurement campaign behind docs/benchmarks.md: every before/after row, in one process on one GPU.

    python -m onestep_cli.bench.campaign --stage 1 --out results.jsonl [--budget-s 420]

Each stage is a list of (rows, options) run in order; results are appended to --out as they come, so a run cut
short keeps what it measured, and items that would start after --budget-s seconds are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .rows import ROWS
from .run import Options, run_benchmarks

# The baseline options: autocast's float32 GroupNorm, NCHW, per-tensor Adam.
BEFORE = dict(channels_last=False, fused_optimizer=False, fp32_group_norm=True)
PLAIN = dict(channels_last=False, fused_optimizer=False)
BEST = dict(channels_last=True, fused_optimizer=True)
TRAIN = ["sid-cifar10", "sim-cifar10", "dmd-cifar10", "di-cifar10"]

STAGES = {
    1: [
        # The reference's configurations, in our engine (fp32 rows: no GroupNorm change applies).
        (["sid-cifar10"], dict(precision="fp32", tf32=False, batch=64, warmup=2, iters=5, **PLAIN)),
        (["sid-cifar10"], dict(precision="fp32", batch=64, warmup=2, iters=5, **PLAIN)),
        # bf16 autocast, then each change alone and together (predict, change, measure).
        (["sid-cifar10"], dict(precision="bf16", batch=64, **BEFORE)),
        (["sid-cifar10"], dict(precision="bf16", batch=128, **BEFORE)),
        (["sid-cifar10"], dict(precision="bf16", batch=128, **PLAIN)),
        (["sid-cifar10"], dict(precision="bf16", batch=128, channels_last=True, fused_optimizer=False)),
        (["sid-cifar10"], dict(precision="bf16", batch=128, **BEST)),
        (["sid-cifar10"], dict(precision="bf16", batch=64, **BEST)),
        (["sid-cifar10"], dict(precision="bf16", batch=256, **BEST)),
        (TRAIN[1:], dict(precision="bf16", batch=128, **BEST)),
        (TRAIN[2:], dict(precision="bf16", batch=256, **BEST)),
        (["dmd-cifar10"], dict(precision="bf16", batch=128, **BEFORE)),
        (["sample-cifar10"], dict(precision="fp32", **PLAIN)),
        (["sample-cifar10"], dict(precision="bf16", **BEFORE)),
        (["sample-cifar10"], dict(precision="bf16", **PLAIN)),
        (["sample-cifar10"], dict(precision="bf16", **BEST)),
        (["heun-cifar10"], dict(precision="bf16", **BEST)),
        (["sid-imagenet64"], dict(precision="bf16", batch=32, **BEST)),
        ("numerics", {}),
        ("profile", dict(precision="bf16", batch=128, **BEST)),
        (["sid-cifar10"], dict(precision="bf16", batch=128, cudnn_benchmark=True, **BEST)),
        (["sid-cifar10"], dict(precision="bf16", batch=128, compile=True, warmup=2, **BEST)),
        (["sample-cifar10"], dict(precision="bf16", compile=True, **BEST)),
        (["sid-imagenet64"], dict(precision="bf16", batch=64, **BEST)),
        (["heun-cifar10"], dict(precision="fp32", iters=1, **PLAIN)),
    ],
}


def profile_step(options: Options, out: Path, rows: int = 25) -> str:
    """CUDA time per kernel family over one SiD step (after warm-up), as torch.profiler's table."""
    from torch.profiler import ProfilerActivity, profile

    from .run import _trainer

    trainer = _trainer(ROWS["sid-cifar10"], options.batch, options.precision, options, torch.device("cuda"))
    for _ in range(3):
        trainer.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60)
    out.write_text(table)
    return table


def numerics_check(batch: int = 64, device: str = "cuda") -> list[dict]:
    """Relative error of the DDPM++ network's own output (D(x) - c_skip x = c_out F, the skip term left out: at random
    init EDM's zero-initialised output layer makes it tiny next to c_skip x) and of its gradient in the input,
    against strict fp32 (TF32 off), for each bf16 variant: autocast with float32 GroupNorm (the baseline), 16-bit
    GroupNorm (after), and after + channels_last (CUDA)."""
    from ..denoisers.edm.layers import GroupNorm
    from ..engine.precision import set_tf32, use_channels_last
    from .rows import build_network

    device = torch.device(device)
    network = build_network("ddpmpp-cifar10").to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device, generator=generator)
    sigma = (torch.randn(batch, device=device, generator=generator) * 1.2 - 1.2).exp()
    probe = torch.randn(batch, 3, 32, 32, device=device, generator=generator)
    c_skip = network.scalings(sigma)[0].reshape(-1, 1, 1, 1)

    def run(dtype):
        inputs = x.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = network(inputs, sigma) - c_skip * inputs
        (grad,) = torch.autograd.grad((out * probe).sum(), inputs)
        return out.detach().double(), grad.double()

    if device.type == "cuda":
        set_tf32(False)
    reference = run(None)
    variants = [("fp32+tf32", None, False), ("bf16, float32 GroupNorm", True, False),
                ("bf16, 16-bit GroupNorm", False, False)]
    if device.type == "cuda":
        set_tf32(True)
        variants.append(("bf16, 16-bit GroupNorm, channels_last", False, True))
    rows = []
    rel = lambda a, b: float((a - b).norm() / b.norm())
    for name, fp32_norm, channels_last in variants:
        if channels_last:
            use_channels_last([network], device)
        GroupNorm.autocast_float32 = bool(fp32_norm)
        try:
            out, grad = run(None if fp32_norm is None else torch.bfloat16)
        finally:
            GroupNorm.autocast_float32 = False
        rows.append({"check": "numerics", "device": device.type, "variant": name,
                     "output_rel_error": rel(out, reference[0]), "input_grad_rel_error": rel(grad, reference[1])})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, default=1, choices=sorted(STAGES))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=420.0)
    args = parser.parse_args(argv)
    start = time.time()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = []
    for rows, settings in STAGES[args.stage]:
        elapsed = time.time() - start
        if elapsed > args.budget_s:
            print(f"[{elapsed:.0f}s] budget spent: skipping {rows} {settings}", flush=True)
            continue
        options = Options(**settings)
        try:
            if rows == "numerics":
                with args.out.open("a") as file:
                    for row in numerics_check():
                        print(row, flush=True)
                        file.write(json.dumps(row) + "\n")
                continue
            if rows == "profile":
                print(profile_step(options, args.out.with_name("profile.txt"), rows=30), flush=True)
                continue
            results = run_benchmarks([ROWS[name] for name in rows], options,
                                     log=lambda message: print(f"[{time.time() - start:.0f}s] {message}", flush=True))
        except Exception as exc:  # noqa: BLE001 - one failing item must not lose the others.
            print(f"[{time.time() - start:.0f}s] FAILED {rows} {settings}: {type(exc).__name__}: {exc}", flush=True)
            continue
        with args.out.open("a") as file:
            for result in results:
                file.write(json.dumps(result) + "\n")
                summary.append(result)
                print(_line(result), flush=True)
    print("\nrow | batch | precision | options | images/s | peak GB | FLOP util | first iter s")
    for result in summary:
        print(_line(result))
    return 0


def _line(r: dict) -> str:
    o = r["options"]
    flags = ",".join(k for k in ("channels_last", "fused_optimizer", "compile", "fp32_group_norm", "cudnn_benchmark")
                     if o[k])
    flags += "" if o["tf32"] else ",tf32-off"
    if "error" in r:
        return f"{r['row']} | {r['batch']} | {r['precision']} | {flags} | {r['error']}"
    return (f"{r['row']} | {r['batch']} | {r['precision']} | {flags} | {r['images_per_s']:.1f} | "
            f"{r.get('peak_memory_gb', 0):.1f} | {100 * r['flop_utilisation']:.1f}% | {r['first_iter_s']:.1f}"
            f"{' (compiled)' if r.get('compiled') else ''}")


if __name__ == "__main__":
    sys.exit(main())
