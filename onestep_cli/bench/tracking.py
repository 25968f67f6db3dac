"""Speed must not cost correctness: a faster variant (bf16 autocast, torch.compile, a CUDA graph) of a gmm or digits
preset, trained for a few hundred steps, must end where fp32 eager ends.

Over hundreds of steps two runs that differ only in rounding drift apart (training is chaotic), so parameters are
not compared. What is compared is what a user sees:

- the first steps' generator losses. At step 1 both runs hold the same parameters and draw the same latents, noise
  levels and noise, so the difference is rounding alone. After it, Adam (which normalises away the gradients'
  scale) turns any difference into parameter steps of the order of the learning rate, and runs separate within a
  few steps; so bf16 (rounding of 2^-9 per operand) is compared at step 1, compiled fp32 (reassociated sums, about
  1e-7) over the first ten;
- the final metrics (the gmm presets: sliced Wasserstein distance to the teacher and mode coverage; the digits
  presets: fd_digits and class accuracy on 1000 samples): the variant's value and fp32's (same seed) may differ by
  no more than fp32 eager runs of different seeds differ from each other, or than the metric's own resolution,
  whichever is larger. The resolutions: swd between two exact sample sets of the evaluation's size; fd_digits two
  standard deviations of its value over bootstrap resamples of the evaluation's size from the real digits; class
  accuracy two binomial standard errors, 2 sqrt(p (1 - p) / n). Mode coverage may not fall below the worst fp32
  seed's by more than one mode of the eight.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

from ..config import resolve_config

EARLY_STEPS = 10  # Steps whose generator losses are recorded.
MODES = 8  # Components of the gmm presets' ring.
# Each preset family's final metrics and the overrides that evaluate them: the digits presets scaled to a few CPU
# minutes as `onestep demo` runs them (their metrics are off during training by default).
FAMILIES = {
    "gmm": (["swd", "mode_coverage"], []),
    "digits": (["fd_digits", "class_accuracy"],
               ["eval.metrics=[fd_digits,class_accuracy]", "eval.num_samples=1000", "train.batch_size=64",
                "train.ema_halflife_kimg=2"]),
}
# name -> (overrides, precision, early tolerance, early steps compared): the largest relative difference allowed
# between the variant's generator losses and fp32's over its first steps. bf16 rounds every matrix operand to 8
# significant bits (unit roundoff 2^-9 = 2e-3); a few layers and the objectives' differences of two denoisers
# (cancellation) make that about 1e-2 of the loss; 5e-2 allows for it. Compiled fp32 only reassociates sums.
VARIANTS = {
    "bf16": ([], "bf16", 5e-2, 1),
    "compiled": (["train.compile=true"], "fp32", 1e-4, EARLY_STEPS),
    # The captured step on a GPU; on the CPU its deferred checks and fused Adam, eager. Fused Adam rounds its update
    # in another order than the per-tensor one: differences of about 1e-7 per step, as compiled.
    "cuda_graph": (["train.cuda_graph=true"], "fp32", 1e-4, EARLY_STEPS),
}


def family(preset: str) -> str:
    """The family of `preset` (its name's first part), whose final metrics are compared."""
    name = preset.split("-")[0]
    if name not in FAMILIES:
        raise ValueError(f"Tracking checks the gmm and digits presets; {preset!r} is neither (its final metrics "
                         f"would have no resolution to compare within).")
    return name


def train_once(preset: str, overrides: list[str], steps: int, seed: int, precision: str | None = None) -> dict:
    """Distil `preset` for `steps` steps with the engine's Trainer (no run directory); returns its final metrics,
    their resolutions and the first steps' generator losses. `precision` is passed to the Trainer as is, so bf16 can
    be checked on a CPU too, where the command line refuses it for speed, not correctness."""
    from ..engine.loop import GeneratorEvaluator
    from ..runs.networks import build_networks
    from ..runtime.precision import resolve_device, resolve_precision, set_tf32
    from ..engine.trainer import Trainer

    family_overrides = FAMILIES[family(preset)][1]
    config = resolve_config(preset, overrides=[*family_overrides, f"train.max_steps={steps}", f"train.seed={seed}",
                                               "eval.every_steps=null", *overrides])
    device = resolve_device(config.train.device)
    if device.type == "cuda":
        set_tf32(config.train.tf32)
    trainer = Trainer(config, build_networks(config), device,
                      precision or resolve_precision(config.train.precision, device))
    early = []
    for step in range(steps):
        stats = trainer.step()
        if step < EARLY_STEPS:
            early.append(float(stats["loss_generator"]))
    final = GeneratorEvaluator(config, trainer)(trainer)
    metrics = final["metrics"]
    return {"metrics": metrics, "resolution": resolutions(metrics, final["provenance"], config.eval.num_samples),
            "early_loss_generator": early}


def resolutions(metrics: dict, provenance: dict, num_samples: int) -> dict:
    """The smallest difference each final metric can tell from noise (module docstring)."""
    out = {}
    if "swd" in metrics:
        out["swd"] = provenance["swd"]["exact_vs_exact"]
    if "mode_coverage" in metrics:
        out["mode_coverage"] = 1 / MODES
    if "fd_digits" in metrics:
        out["fd_digits"] = fd_digits_noise(num_samples)
    if "class_accuracy" in metrics:  # p kept one sample from 0 and 1, where the binomial error would vanish.
        p = min(max(metrics["class_accuracy"], 1 / num_samples), 1 - 1 / num_samples)
        out["class_accuracy"] = 2 * (p * (1 - p) / num_samples) ** 0.5
    return out


@functools.cache
def fd_digits_noise(num_samples: int, resamples: int = 8) -> float:
    """Two standard deviations of fd_digits over bootstrap resamples of `num_samples` real digits: how much the
    metric moves when only the sample set changes (about 0.3 per deviation at 1000)."""
    import torch

    from ..digits.data import load_digits_images
    from ..digits.metrics import fd_digits

    real, _ = load_digits_images(8)
    draws = torch.Generator().manual_seed(0)
    values = torch.tensor([fd_digits(real[torch.randint(len(real), (num_samples,), generator=draws)])[0]
                           for _ in range(resamples)])
    return 2 * values.std().item()


def tracking_check(preset: str, variants: dict[str, tuple[list[str], str | None, float, int]], steps: int = 300,
                   seeds: tuple[int, ...] = (0, 1, 2), base: list[str] = ()) -> dict:
    """Train fp32 eager (`base` overrides) with each seed, then each variant (`base` + its overrides, its precision)
    with seeds[0]; `variants` as VARIANTS. Returns every number, and per variant its checks and `passed`."""
    names = FAMILIES[family(preset)][0]
    reference = [train_once(preset, [*base, "train.compile=false"], steps, seed, "fp32") for seed in seeds]
    runs = {name: train_once(preset, [*base, *overrides], steps, seeds[0], precision)
            for name, (overrides, precision, _, _) in variants.items()}
    first = reference[0]
    spread = {metric: max((abs(run["metrics"][metric] - first["metrics"][metric]) for run in reference[1:]),
                          default=0.0) for metric in names}
    # Mode coverage is compared with the worst seed's, less one mode: its spread is already in that worst.
    tolerance = {metric: first["resolution"][metric] if metric == "mode_coverage"
                 else max(spread[metric], first["resolution"][metric]) for metric in names}
    worst_coverage = min(run["metrics"]["mode_coverage"] for run in reference) if "mode_coverage" in names else None
    results = {}
    for name, fast in runs.items():
        compared = zip(fast["early_loss_generator"][:variants[name][3]], first["early_loss_generator"])
        early = max(abs(a - b) / max(abs(b), 1e-12) for a, b in compared)
        checks = {"early_losses": early <= variants[name][2]}
        for metric in names:
            value = fast["metrics"][metric]
            if metric == "mode_coverage":  # Only a loss of modes counts against the variant.
                checks[metric] = value >= worst_coverage - tolerance[metric]
            else:
                checks[metric] = abs(value - first["metrics"][metric]) <= tolerance[metric]
        results[name] = {"overrides": variants[name][0], "precision": variants[name][1], **fast,
                         "early_max_rel_diff": early, "early_tolerance": variants[name][2],
                         "early_steps_compared": variants[name][3], "checks": checks,
                         "passed": all(checks.values())}
    return {"preset": preset, "steps": steps, "seeds": list(seeds), "fp32": reference, "seed_spread": spread,
            "tolerance": tolerance, "variants": results, "passed": all(r["passed"] for r in results.values())}


def main(argv=None) -> int:
    """python -m onestep_cli.bench.tracking [--presets gmm-sid,digits-sim,...] [--variants bf16,compiled,cuda_graph]
    [--steps 300]"""
    parser = argparse.ArgumentParser(description="Check that bf16, compiled and graphed runs track fp32 eager.")
    parser.add_argument("--presets", default="gmm-sim,gmm-sid,gmm-dmd,gmm-di")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    unknown = [name for name in args.variants.split(",") if name not in VARIANTS]
    presets = args.presets.split(",")
    try:
        if unknown:
            raise ValueError(f"Unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}.")
        for preset in presets:
            family(preset)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    chosen = {name: VARIANTS[name] for name in args.variants.split(",")}
    passed = True
    for preset in presets:
        result = tracking_check(preset, chosen, args.steps, base=[f"train.device={args.device}"])
        print(json.dumps(result), flush=True)
        passed &= result["passed"]
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
