"""Does `onestep eval --scorer-precision tf32|bf16` change the scores by more than their own noise?

Scores the same images with the same prompts in fp32 and in each other precision, then prints one table per metric:

  mean         the mean score over the images (what `onestep eval` reports)
  Δ mean       that mean minus the fp32 mean
  mean |Δ|     per image: |score - fp32 score|, averaged over the images
  max |Δ|      the largest of those per-image differences
  Δ/SE         Δ mean in units of the fp32 mean's standard error

and, on the fp32 row, the noise of the mean itself: SE, the standard error of the mean score over the images
(sample std / sqrt(N)), and halves, |mean of one half - mean of the other| for a fixed random split of the images in
two. A change of precision is negligible for a comparison of models when |Δ mean| is well below both.

Inputs are those of `onestep eval`: an image folder (or .npz), `--prompts` (or the prompts a `onestep sample
--prompts` folder records), `--weights KEY=PATH` and `--option metric.option=VALUE`. Each precision loads the
scorers afresh, so the weights are read once per precision. From the repository root:

    python scripts/scorer_precision.py samples/ --prompts prompts.txt \
        --metrics imagereward,pickscore,clip_score,hpsv2 --device cuda [--precisions tf32,bf16] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
from pathlib import Path

import numpy as np

REFERENCE = "fp32"
HALVES_SEED = 0  # The random split of the images into two halves.
DEFAULT_METRICS = "imagereward,pickscore,clip_score,hpsv2"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="Image folder, samples folder or .npz of images.")
    parser.add_argument("--prompts", type=Path, help="One prompt per image (sorted file-name order for folders).")
    parser.add_argument("--metrics", default=DEFAULT_METRICS, help=f"Comma-separated scorers (default "
                        f"{DEFAULT_METRICS}; also aesthetic).")
    parser.add_argument("--precisions", default="tf32,bf16", help="Precisions to compare with fp32.")
    parser.add_argument("--weights", action="append", default=[], help="KEY=PATH, as onestep eval (repeatable).")
    parser.add_argument("--option", action="append", default=[], help="metric.option=VALUE, as onestep eval.")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N].")
    parser.add_argument("--batch", type=int, default=64, help="Images per network call.")
    parser.add_argument("--num", type=int, help="Only the first N images.")
    parser.add_argument("--json", action="store_true", help="Print the tables as one JSON object.")
    return parser.parse_args(argv)


def score_in_precisions(source, prompts, metrics: list[str], precisions: list[str], device, batch_size: int,
                        weights: dict, options: dict) -> tuple[dict, dict]:
    """({precision: {metric: per-image scores [N] float64}}, {precision: {metric: the precision provenance}})."""
    import torch

    from onestep_cli.eval import FEATURE_SPACES, MetricContext, MetricError, get_metric
    from onestep_cli.eval.image_eval import extract_all

    scores, provenance = {}, {}
    for precision in precisions:
        ctx = MetricContext(prompts=prompts, device=device, batch_size=batch_size, weights=weights, options=options,
                            scorer_precision=precision)
        spaces = {metric: get_metric(metric).spaces[0] for metric in metrics}
        extractors = {space: FEATURE_SPACES[space].build(ctx) for space in spaces.values()}
        for metric, space in spaces.items():
            if extractors[space].arithmetic is None:
                raise MetricError(f"Metric '{metric}' is not a per-image scorer; --scorer-precision applies to "
                                  "clip_score, aesthetic, imagereward, pickscore and hpsv2.")
        features = extract_all(source, extractors, batch_size, prompts)
        scores[precision] = {m: features[s][:, 0].astype(np.float64) for m, s in spaces.items()}
        provenance[precision] = {m: {k: v for k, v in extractors[s].provenance.items()
                                     if k in ("precision", "precision_asked", "arithmetic")}
                                 for m, s in spaces.items()}
        del extractors, features
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()  # The next precision loads the scorers again.
    return scores, provenance


def summarise(scores: dict[str, dict[str, np.ndarray]]) -> dict[str, list[dict]]:
    """Per metric, one row per precision (fp32 first) with the columns of the module docstring."""
    tables = {}
    for metric, reference in scores[REFERENCE].items():
        n = reference.size
        standard_error = float(reference.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
        order = np.random.default_rng(HALVES_SEED).permutation(n)
        halves = (float(abs(reference[order[:n // 2]].mean() - reference[order[n // 2:]].mean()))
                  if n > 1 else math.nan)
        rows = []
        for precision, per_metric in scores.items():
            delta = per_metric[metric] - reference
            mean_delta = float(per_metric[metric].mean() - reference.mean())
            rows.append({"precision": precision, "num_images": n, "mean": float(per_metric[metric].mean()),
                         "delta_mean": mean_delta, "mean_abs_delta": float(np.abs(delta).mean()),
                         "max_abs_delta": float(np.abs(delta).max()),
                         "delta_mean_over_se": mean_delta / standard_error if standard_error > 0 else math.nan,
                         **({"standard_error": standard_error, "halves": halves} if precision == REFERENCE else {})})
        tables[metric] = rows
    return tables


def print_tables(tables: dict[str, list[dict]], provenance: dict) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for metric, rows in tables.items():
        table = Table(title=f"{metric} ({rows[0]['num_images']} images)", box=box.SIMPLE)
        for column in ("precision", "mean", "Δ mean", "mean |Δ|", "max |Δ|", "Δ/SE", "SE", "halves"):
            table.add_column(column, justify="left" if column == "precision" else "right")
        for row in rows:
            asked = provenance[row["precision"]][metric]
            name = row["precision"] if asked["precision"] == row["precision"] else \
                f"{row['precision']} (ran {asked['precision']})"  # tf32 where it has no effect.
            table.add_row(name, *(f"{row[k]:.3g}" if k in row else "" for k in (
                "mean", "delta_mean", "mean_abs_delta", "max_abs_delta", "delta_mean_over_se", "standard_error",
                "halves")))
        console.print(table)


def main(argv: list[str] | None = None) -> int:
    from onestep_cli.errors import OnestepError

    args = parse_args(argv)
    try:
        tables, provenance = run(args)
    except OnestepError as error:
        print(f"Error: {error}", file=sys.stderr)
        return error.exit_code
    if args.json:
        print(json.dumps({"tables": tables, "provenance": provenance}, indent=1))
    else:
        print_tables(tables, provenance)
    return 0


def run(args: argparse.Namespace) -> tuple[dict, dict]:
    from onestep_cli.cli.eval import parse_assignments
    from onestep_cli.denoisers.diffusers.prompts import read_prompts
    from onestep_cli.eval import MetricError, check_metric_names, check_scorer_precision, get_metric
    from onestep_cli.eval.evaluate import open_image_source
    from onestep_cli.runtime.precision import resolve_device
    from onestep_cli.sample_io import pair_prompts, recorded_prompts

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    check_metric_names(metrics)
    precisions = [REFERENCE, *(p.strip() for p in args.precisions.split(",") if p.strip() and p.strip() != REFERENCE)]
    for precision in precisions:
        check_scorer_precision(precision)
    source = open_image_source(args.source)
    if args.num is not None:
        source = source.head(args.num)
    prompts = read_prompts(args.prompts) if args.prompts else recorded_prompts(source)
    if prompts is not None:
        pair_prompts(source, prompts, str(args.prompts) if args.prompts else None)
    elif any(get_metric(m).needs_prompts for m in metrics):
        raise MetricError(f"{', '.join(metrics)} score each image against its prompt; pass --prompts FILE with one "
                          "prompt per image (sorted file-name order for folders).")
    scores, provenance = score_in_precisions(
        source, prompts, metrics, precisions, resolve_device(args.device), args.batch,
        parse_assignments(args.weights, "--weights"), parse_assignments(args.option, "--option"))
    return summarise(scores), provenance


if __name__ == "__main__":
    sys.exit(main())
