"""`onestep eval`: metrics of a run, checkpoint, image folder or .npz, with provenance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..sampling import parse_seeds
from .common import print_json, reports_errors, stdout


def parse_assignments(items: list[str] | None, flag: str) -> dict[str, str]:
    """['a=b', ...] -> {'a': 'b'}; a clear error for anything else."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"{flag} {item!r} is not KEY=VALUE.")
        out[key.strip()] = value.strip()
    return out


@reports_errors
def eval_command(
    source: Path = typer.Argument(..., help="Run directory, checkpoint folder, image folder, samples folder or .npz."),
    metrics: str = typer.Option("swd,mode_coverage", "--metrics",
                                help="Comma-separated: swd, mode_coverage, fid, kid, precision, recall, is, "
                                     "fd_clip, fd_dinov2, clip_score, aesthetic, imagereward, pickscore."),
    ref: Optional[str] = typer.Option(None, "--ref", help="Image metrics: reference statistics (.npz with mu/sigma), "
                                      "an image folder or .npz of images. swd/mode_coverage: a run, preset or config "
                                      "naming the teacher."),
    num: Optional[int] = typer.Option(None, "--num", min=1,
                                      help="Samples to evaluate (generated, or the first N stored)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Seeds to generate with (generator sources)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Text file, one prompt per image (sorted file-name "
                                           "order for folders, array order for .npz)."),
    fid_mode: str = typer.Option("edm", "--fid-mode", help="Inception preprocessing: edm, clean or legacy_tensorflow."),
    batch: int = typer.Option(64, "--batch", min=1, help="Images per network call."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    precision: str = typer.Option("fp32", "--precision", help="Generation precision for generator sources: fp32, "
                                  "bf16 or fp16 (CUDA)."),
    weights: Optional[List[str]] = typer.Option(None, "--weights", help="KEY=PATH: use a local copy of a weight set "
                                                "instead of the cache (repeatable; see `onestep weights list`)."),
    option: Optional[List[str]] = typer.Option(None, "--option", help="metric.option=VALUE, e.g. clip_score.model="
                                               "ViT-H-14 with clip_score.pretrained=FILE (repeatable)."),
    save_stats: Optional[Path] = typer.Option(None, "--save-stats", help="Write the source's feature statistics "
                                              "(EDM's mu/sigma .npz) for use as --ref later."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the result JSON to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print exactly one JSON object on stdout."),
):
    """Evaluate samples; runs keep the result under RUN/eval/."""
    from ..evaluation import evaluate, store_result

    names = [m.strip() for m in metrics.split(",") if m.strip()]
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"--precision {precision!r} is not one of fp32, bf16, fp16.")
    result = evaluate(source, names, num, parse_seeds(seeds) if seeds else None, ref, prompts=prompts,
                      fid_mode=fid_mode, batch_size=batch, device=device, precision=precision,
                      weights=parse_assignments(weights, "--weights"), options=parse_assignments(option, "--option"),
                      save_stats=save_stats)
    store_result(result, source)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))
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


def _how(provenance: dict) -> str:
    parts = [f"mode {provenance['mode']}"] if "mode" in provenance else []
    size = f" at {provenance['image_size']}" if "image_size" in provenance else ""
    parts.append(f"{provenance.get('num_samples', '?')} samples{size}")
    if "seeds" in provenance:
        parts.append(f"seeds {provenance['seeds']}")
    return ", ".join(parts)
