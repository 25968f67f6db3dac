"""Speed must not cost correctness: a faster variant (bf16 autocast, torch.compile) of a gmm preset, trained for a
few hundred steps, must end where fp32 eager ends.

Over hundreds of steps two runs that differ only in rounding drift apart (training is chaotic), so parameters are
not compared. What is compared is what a user sees:

- the first steps' losses, before the drift grows: relative differences of the order of the variant's rounding;
- the final sliced Wasserstein distance to the teacher: the variant's swd and fp32's (same seed) may differ by no
  more than fp32 eager runs of different seeds differ from each other, or than the metric's own resolution (the
  swd between two exact sample sets of the evaluation's size), whichever is larger;
- mode coverage: no lower than the worst fp32 seed's, less one mode of the eight.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..config import resolve_config

EARLY_STEPS = 10  # Steps whose losses are compared one by one.
MODES = 8  # Components of the gmm presets' ring.


def train_once(preset: str, overrides: list[str], steps: int, seed: int, folder: Path) -> dict:
    """Distil `preset` for `steps` steps; returns its final swd, its resolution, coverage and the early losses."""
    from .. import distill

    config = resolve_config(preset, overrides=[f"train.max_steps={steps}", f"train.seed={seed}", "train.tick_every=1",
                                               f"train.checkpoint_every={steps}", "eval.every_steps=null", *overrides])
    summary = distill(config, folder, log=lambda message: None, progress=False)
    final = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    stats = [json.loads(line) for line in (folder / "stats.jsonl").read_text().splitlines()]
    return {"swd": final["metrics"]["swd"], "swd_resolution": final["provenance"]["swd"]["exact_vs_exact"],
            "mode_coverage": final["metrics"]["mode_coverage"], "wall_seconds": summary.wall_seconds,
            "early_loss_generator": [row["loss_generator"] for row in stats[:EARLY_STEPS]]}


def tracking_check(preset: str, variants: dict[str, tuple[list[str], float]], steps: int = 300,
                   seeds: tuple[int, ...] = (0, 1, 2), base: list[str] = ()) -> dict:
    """Train fp32 eager (`base` overrides) with each seed, then each variant (`base` + its overrides) with seeds[0].

    `variants` maps a name to (overrides, early tolerance: the largest relative difference allowed between its first
    steps' generator losses and fp32's). Returns every number, and per variant its checks and `passed`.
    """
    with tempfile.TemporaryDirectory() as tmp:
        reference = [train_once(preset, [*base, "train.precision=fp32", "train.compile=false"], steps, seed,
                                Path(tmp) / f"fp32-{seed}") for seed in seeds]
        runs = {name: train_once(preset, [*base, *overrides], steps, seeds[0], Path(tmp) / f"variant-{index}")
                for index, (name, (overrides, _)) in enumerate(variants.items())}
    first = reference[0]
    spread = max((abs(run["swd"] - first["swd"]) for run in reference[1:]), default=0.0)
    tolerance = max(spread, first["swd_resolution"])
    worst_coverage = min(run["mode_coverage"] for run in reference)
    results = {}
    for name, fast in runs.items():
        early = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(fast["early_loss_generator"],
                                                                     first["early_loss_generator"]))
        checks = {"early_losses": early <= variants[name][1],
                  "swd": abs(fast["swd"] - first["swd"]) <= tolerance,
                  "mode_coverage": fast["mode_coverage"] >= worst_coverage - 1 / MODES}
        results[name] = {"overrides": variants[name][0], **fast, "early_max_rel_diff": early,
                         "early_tolerance": variants[name][1], "checks": checks, "passed": all(checks.values())}
    return {"preset": preset, "steps": steps, "seeds": list(seeds), "fp32": reference, "seed_spread_swd": spread,
            "swd_tolerance": tolerance, "variants": results, "passed": all(r["passed"] for r in results.values())}
