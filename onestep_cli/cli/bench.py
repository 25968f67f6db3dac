"""`onestep bench`: time the engine's training step and samplers on this device, and the evaluation paths (FID-50k,
ImageReward, PickScore) as `onestep eval` runs them."""

from __future__ import annotations

from typing import Optional

import typer

from ..config import ConfigError
from .common import info, print_json, reports_errors, stdout

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@reports_errors
def bench_command(
    rows: str = typer.Option("sid-cifar10,sim-cifar10,dmd-cifar10,di-cifar10,sample-cifar10,heun-cifar10,"
                             "sid-imagenet64", "--rows", help="Comma-separated rows to run; the evaluation rows "
                             "fid50k-cifar10, imagereward-b64 and pickscore-b64 run only when named."),
    batch: Optional[int] = typer.Option(None, "--batch", min=1, help="Images per step for every row (default: "
                                        "each row's: 128 for CIFAR-10 training, 1024 for sampling, 32 ImageNet-64, "
                                        "500 per generator and Inception call for FID, 64 for the scorers)."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16, "
                                  "as train.precision; for fid50k-cifar10 the generation's (as `onestep eval "
                                  "--precision`); the scorers and Inception run fp32, as in production."),
    tf32: bool = typer.Option(True, "--tf32/--no-tf32", help="TF32 matrix units for float32 work (CUDA)."),
    channels_last: bool = typer.Option(False, "--channels-last/--no-channels-last", help="As train.channels_last "
                                       "(EDM U-Nets: slower eager, faster with --compile and --cuda-graph)."),
    fused_optimizer: bool = typer.Option(False, "--fused-optimizer/--no-fused-optimizer",
                                         help="As train.fused_optimizer."),
    compile: bool = typer.Option(False, "--compile/--no-compile", help="As train.compile (adds compile time to the "
                                 "warm-up; first_iter_s in --json shows it)."),
    cuda_graph: bool = typer.Option(False, "--cuda-graph/--no-cuda-graph", help="As train.cuda_graph (training "
                                    "rows): two eager steps, then the step is captured; keep --warmup at 3 or more "
                                    "so that only replays are timed."),
    auto: bool = typer.Option(False, "--auto", help="Training rows: train.compile, train.cuda_graph and "
                              "train.channels_last at auto, as the presets set them (what auto picks is reported "
                              "either way); --compile, --cuda-graph and --channels-last then apply to the other rows."),
    warmup: Optional[int] = typer.Option(None, "--warmup", min=1, help="Untimed iterations (default 3, Heun 1; "
                                         "fid50k-cifar10 has none: its untimed reference statistics warm it up)."),
    iters: Optional[int] = typer.Option(None, "--iters", min=1, help="Timed iterations (default 10, sampling 20, "
                                        "Heun 2); images/s comes from their median."),
    quick: bool = typer.Option(False, "--quick", help="Tiny networks, two iterations, on the CPU: checks that every "
                               "row runs (FID: 64 images through a stand-in Inception); the timings mean nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON instead of a table."),
):
    """Run benchmark rows on random-init networks of the real sizes and print images/s, peak memory and FLOP
    utilisation against this device's own measured matrix-product rate. The engine switches (--tf32,
    --channels-last, --fused-optimizer, --compile, --cuda-graph) apply to the engine rows; the evaluation rows run as
    `onestep eval` does."""
    from ..bench import Options, parse_rows, run_benchmarks

    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}.")
    try:
        chosen = parse_rows(rows)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    settings = dict(precision=precision, tf32=tf32, channels_last=channels_last, fused_optimizer=fused_optimizer,
                    compile=compile, cuda_graph=cuda_graph, auto_engine=auto, batch=batch, warmup=warmup, iters=iters)
    options = Options.quick(**settings) if quick else Options(**settings)
    results = run_benchmarks(chosen, options, log=(lambda message: None) if as_json else info)
    if as_json:
        print_json(results)
    else:
        stdout.print(results_table(results, quick))


def results_table(results: list[dict], quick: bool = False):
    """One rich table: a line per row, and a caption that says what the columns are measured against."""
    from rich.table import Table
    from rich.text import Text

    first = results[0]
    table = Table(title=f"onestep bench on {first['device']}, torch {first['torch']}"
                  + (" (--quick: tiny networks on the CPU, timings mean nothing)" if quick else ""),
                  caption=_caption(results) or None, caption_justify="left")
    columns = [("row", "left"), ("batch", "right"), ("precision", "left"), ("images/s", "right"), ("peak GB", "right"),
               ("GFLOP/img", "right"), ("TFLOP/s", "right"), ("FLOP util.", "right"), ("floor img/s", "right")]
    timed_column = any("measured" in r or "skipped" in r for r in results)  # Evaluation rows say what they timed.
    for name, justify in columns:
        table.add_column(name, justify=justify)
    if timed_column:
        table.add_column("what was timed", overflow="fold")
    for r in results:
        if "error" in r or "skipped" in r:
            cells = [r["row"], str(r["batch"]), r["precision"], r.get("error", "skipped")] + [""] * 5
            table.add_row(*cells + ([Text(r.get("skipped", ""))] if timed_column else []))
            continue
        peak = f"{r['peak_memory_gb']:.1f}" if "peak_memory_gb" in r else "-"
        achieved = f"{r['flops_per_image'] * r['images_per_s'] / 1e12:.3g}" if "flops_per_image" in r else "-"
        cells = [r["row"], str(r["batch"]), r["precision"] + (" compiled" if r.get("compiled") else ""),
                 f"{r['images_per_s']:.1f}", peak, _number(r, "flops_per_image", "{:.1f}", 1e-9),
                 achieved, _number(r, "flop_utilisation", "{:.1f}%", 100),
                 _number(r, "floor_images_per_s", "{:.0f}")]
        table.add_row(*cells + ([Text(_what_was_timed(r))] if timed_column else []))  # Text: no markup.
    return table


def _caption(results: list[dict]) -> str:
    """What FLOP utilisation and the floor divide by: the rates measured on this device, one per precision."""
    rates = {}
    for r in results:
        if "matmul_flops_per_s" in r:
            setting = r["precision"] + (", as `onestep eval` runs it" if r["work"] == "score" else "")
            rates[setting] = r["matmul_flops_per_s"]
    bandwidth = next((r["copy_bytes_per_s"] for r in results if "copy_bytes_per_s" in r), None)
    if not rates:
        return _auto_picks(results)
    measured = "; ".join(f"{setting}: {rate / 1e12:.3g} TFLOP/s" for setting, rate in rates.items())
    picks = _auto_picks(results)
    caption = ("FLOP utilisation: matrix-product FLOPs per image (torch.utils.flop_counter) x images/s over this "
               f"device's rate for a large square matrix product in the row's precision, measured here ({measured}).")
    if bandwidth is not None:
        caption += (" Floor: the larger of those FLOPs over that rate and the matrix operands' bytes over this "
                    f"device's measured copy bandwidth ({bandwidth / 1e12:.3g} TB/s).")
    return caption + (f"\n{picks}" if picks else "")


def _auto_picks(results: list[dict]) -> str:
    """Which switches train.*: auto (the presets' setting) picks for the training rows here, and what ran."""
    from ..engine.switches import SWITCHES, EngineSwitches

    lines = []
    for r in results:
        if "auto_engine" in r:
            pick = EngineSwitches.from_record(r["auto_engine"])
            ran = ""
            if "engine" in r:
                used = ", ".join(f"{name} {'on' if r['engine'][name] else 'off'}" for name in SWITCHES)
                ran = f" Timed with: {used}."
            lines.append(f"{r['row']}: auto picks {pick.describe().removeprefix('engine: ')}{ran}")
    return "\n".join(lines)


def _number(result: dict, key: str, form: str, scale: float = 1.0) -> str:
    return form.format(result[key] * scale) if key in result else "-"


def _what_was_timed(result: dict) -> str:
    """The evaluation rows' own numbers (FID: where the seconds went) and what their timing covers."""
    if "total_s" in result:
        return (f"{result['num_images']} images in {result['total_s']:.1f} s = generation {result['generation_s']:.1f}"
                f" + Inception features {result['features_s']:.1f} + statistics {result['statistics_s']:.1f} "
                f"(setup {result['setup_s']:.1f} s untimed). {result['measured']}")
    return result.get("measured", "")
