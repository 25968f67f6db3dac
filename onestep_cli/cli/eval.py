"""`onestep eval`: metrics of a run, checkpoint, image folder or .npz, with provenance.

With `--gpus N` (or `--nnodes`) the command re-runs itself under torch.distributed.run, one process per GPU, and the
processes share the images of image metrics; under an existing launcher (torchrun, srun) it joins that group instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..config import MAX_SEEDS
from ..errors import UsageError
from ..jsonio import to_json
from ..sampling import parse_seeds
from .common import info, output_file, print_json, reports_errors, stdout, warn, worker_command


def parse_assignments(items: list[str] | None, flag: str) -> dict[str, str]:
    """['a=b', ...] -> {'a': 'b'}; a clear error for anything else."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise UsageError(f"{flag} {item!r} is not KEY=VALUE.")
        out[key.strip()] = value.strip()
    return out


@reports_errors
def eval_command(
    source: Path = typer.Argument(..., help="Run directory, checkpoint folder, image folder, samples folder or .npz."),
    metrics: str = typer.Option("swd,mode_coverage", "--metrics",
                                help="Comma-separated: swd, mode_coverage, fid, kid, precision, recall, is, "
                                     "fd_clip, fd_dinov2, clip_score, aesthetic, imagereward, pickscore, hpsv2; "
                                     "digits: fd_digits, class_accuracy, prompt_accuracy, weight_agreement, "
                                     "slant_agreement."),
    ref: Optional[str] = typer.Option(None, "--ref", help="Image metrics: reference statistics (.npz with mu/sigma), "
                                      "an image folder or .npz of images. swd/mode_coverage: a run, preset or config "
                                      "naming the teacher."),
    num: Optional[int] = typer.Option(None, "--num", min=1, max=MAX_SEEDS,
                                      help="Samples to evaluate (generated, or the first N stored)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Seeds to generate with (generator sources)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Text file, one prompt per image (sorted file-name "
                                           "order for folders, array order for .npz)."),
    fid_mode: str = typer.Option("edm", "--fid-mode", help="Inception preprocessing: edm, clean or legacy_tensorflow."),
    batch: int = typer.Option(64, "--batch", min=1, help="Images per network call."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    precision: str = typer.Option("fp32", "--precision", help="Generation precision for generator sources: fp32, "
                                  "bf16 or fp16 (CUDA)."),
    scorer_precision: str = typer.Option(
        "fp32", "--scorer-precision", help="Arithmetic of the per-image scorers (clip_score, aesthetic, imagereward, "
        "pickscore, hpsv2): fp32 (strict float32), tf32 (TF32 matmuls and convolutions on CUDA; no effect on CPU) or "
        "bf16 (bfloat16 autocast). Inception, CLIP and DINOv2 features stay fp32. See docs/metrics.md."),
    compile_generator: bool = typer.Option(
        False, "--compile", help="Generator sources: torch.compile the generator's blocks (channels_last on CUDA) "
        "before generating: about 1.7x the generation speed on an H100 for some 30 s of compilation (less once "
        "inductor's disk cache is warm); see docs/benchmarks.md."),
    weights: Optional[List[str]] = typer.Option(None, "--weights", help="KEY=PATH: use a local copy of a weight set "
                                                "instead of the cache (repeatable; see `onestep weights list`)."),
    option: Optional[List[str]] = typer.Option(None, "--option", help="metric.option=VALUE, e.g. clip_score.model="
                                               "ViT-H-14 with clip_score.pretrained=FILE (repeatable)."),
    save_stats: Optional[str] = typer.Option(None, "--save-stats", help="Write the source's feature statistics "
                                              "(EDM's mu/sigma .npz) for use as --ref later."),
    out: Optional[str] = typer.Option(None, "--out", help="Also write the result JSON to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print exactly one JSON object on stdout."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="Processes on this node sharing the images of image metrics, "
                             "one per GPU (CPU processes on gloo when no GPU is visible). Ignored under "
                             "torchrun/srun."),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="Nodes sharing the evaluation; run the same command on "
                               "each."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="This node's index, 0 to nnodes-1."),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="Hostname of node 0, reachable from every "
                                              "node (the rendezvous endpoint); needed with --nnodes > 1."),
    master_port: int = typer.Option(29500, "--master-port", help="Free TCP port on node 0 for the rendezvous."),
):
    """Evaluate samples; runs keep the result under RUN/eval/."""
    from ..eval.base import check_scorer_precision
    from ..eval.evaluate import evaluate, store_result
    from ..runtime.distributed import launcher_env

    names = [m.strip() for m in metrics.split(",") if m.strip()]
    out = output_file(out) if out is not None else None
    save_stats = output_file(save_stats, "--save-stats") if save_stats is not None else None
    if precision not in ("fp32", "bf16", "fp16"):
        raise UsageError(f"--precision {precision!r} is not one of fp32, bf16, fp16.")
    check_scorer_precision(scorer_precision)
    seed_list = parse_seeds(seeds) if seeds else None
    weight_paths, options = parse_assignments(weights, "--weights"), parse_assignments(option, "--option")
    launcher = launcher_env()
    if launcher is None and (gpus > 1 or nnodes > 1):
        from ..engine.launch import LaunchPlan

        plan = LaunchPlan(gpus, nnodes, node_rank, master_addr, master_port if nnodes > 1 else None)
        command = ["eval", str(source), "--metrics", metrics, *(["--ref", ref] if ref else []),
                   *(["--num", str(num)] if num is not None else []), *(["--seeds", seeds] if seeds else []),
                   *(["--prompts", str(prompts)] if prompts else []), "--fid-mode", fid_mode, "--batch", str(batch),
                   "--device", device, "--precision", precision, "--scorer-precision", scorer_precision,
                   *(["--compile"] if compile_generator else []),
                   *[arg for item in weights or [] for arg in ("--weights", item)],
                   *[arg for item in option or [] for arg in ("--option", item)],
                   *(["--save-stats", str(save_stats)] if save_stats else []), *(["--out", str(out)] if out else []),
                   *(["--json"] if as_json else [])]  # The same command, for every worker.
        code = _relaunch(plan, worker_command(command), source, names, save_stats, device)
        if code:
            raise typer.Exit(code)
        return
    if launcher is not None and launcher.rank == 0 and (gpus > 1 or nnodes > 1):
        info(f"Note: running as one of the {launcher.world_size} processes the launcher started; --gpus/--nnodes "
             "are ignored under torchrun or srun.")
    # Errors about the inputs are raised alike by every rank, and PeerFailure stands for one that rank 0 raises: rank 0
    # prints them, the other ranks exit quietly (reports_errors).
    result = evaluate(source, names, num, seed_list, ref, prompts=prompts, fid_mode=fid_mode, batch_size=batch,
                      device=device, precision=precision, weights=weight_paths, options=options,
                      save_stats=save_stats, compile_generator=compile_generator, scorer_precision=scorer_precision)
    if result is None:  # A rank other than 0: rank 0 prints and writes the result.
        return
    store_result(result, source)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(to_json(result, indent=1))
    if as_json:
        print_json(result)
        return
    if result["metrics"]:
        table = Table(title=f"eval {source}", box=None)
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_column("how", overflow="fold")
        for name, value in result["metrics"].items():
            table.add_row(name, f"{value:.4g}", _how(result["provenance"][name]))
        stdout.print(table)
    if result.get("skipped_without_reference"):
        stdout.print(f"Not computed without --ref: {', '.join(result['skipped_without_reference'])}.",
                     highlight=False)
    if "stats" in result:
        stats = result["stats"]
        stdout.print(f"Wrote reference statistics ({', '.join(stats['spaces'])}; {stats['num_images']} images) to "
                     f"{stats['path']} (sha256 {stats['sha256'][:12]}).", highlight=False)


def _relaunch(plan, command: list[str], source: Path, names: list[str], save_stats: Path | None, device: str) -> int:
    """Check what can be checked before any process starts, then run `command` in every process of `plan`."""
    from ..engine.launch import check_devices, run_torchrun
    from ..eval.evaluate import check_splittable

    check_splittable(source, names, save_stats)
    if device.startswith("cuda:"):
        raise UsageError(f"--device {device} names one GPU, but --gpus {plan.nproc_per_node} puts process i on GPU i; "
                         "pass --device cuda (or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES.")
    check_devices(plan, device, warn=warn, option="--device")
    code, signal_name = run_torchrun(plan, command, warn, task="the evaluation",
                                     advice="Fix its cause and run the same command again.")
    if signal_name is not None:
        warn(f"Error: the evaluation was interrupted by {signal_name}; run the same command again.")
    return code


def _how(provenance: dict) -> str:
    parts = [f"mode {provenance['mode']}"] if "mode" in provenance else []
    size = f" at {provenance['image_size']}" if "image_size" in provenance else ""
    parts.append(f"{provenance.get('num_samples', '?')} samples{size}")
    if "seeds" in provenance:
        parts.append(f"seeds {provenance['seeds']}")
    return ", ".join(parts)
