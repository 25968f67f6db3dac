"""Speed must not cost correctness: a faster variant (bf16 or fp16 autocast, torch.compile, a CUDA graph,
channels_last, and every combination of them that `auto` picks) of a gmm or digits preset, trained for a few hundred
steps, must end where fp32 eager ends; a text-to-image digits preset must start where fp32 eager starts.

The variants: bf16, compiled and cuda_graph, one change each; and `auto-configs`, one per configuration that
train.compile, train.cuda_graph and train.channels_last at `auto` can pick (bench/auto_choices.py asks
engine/switches.py for them: each switch combination in each precision train.precision runs in on CUDA), named after
it ("bf16+compile+cuda_graph+channels_last"), plus `auto`, all three at auto on this device (on the CPU auto is fp32
eager, the reference's own configuration, and its record says so). The reference and every variant set all three
switches (the digits presets leave them at auto); a variant's unnamed switches are off.

Over hundreds of steps two runs that differ only in rounding drift apart (training is chaotic), so parameters are
not compared. What is compared is what a user sees:

- the first steps' losses of the generator and of the fake score. At step 1 both runs hold the same parameters and
  draw the same latents, noise levels and noise, so the difference is rounding alone. After it, Adam (which
  normalises away the gradients' scale) turns any difference into parameter steps of the order of the learning rate,
  and runs separate within a few steps; so a variant in bf16 or fp16 (rounding of 2^-8 or 2^-11 per operand) is
  compared at step 1, whatever its switches, and one in fp32 (compiled, graphed or channels_last: reassociated sums,
  about 1e-7) over the first ten;
- the final metrics (the gmm presets: sliced Wasserstein distance to the teacher and mode coverage; the digits
  presets: fd_digits and class accuracy on 1000 samples): after hundreds of steps the variant's run is as
  independent of fp32's same-seed run as another seed's, so its value must lie in the band the fp32 seeds span,
  widened on each side by the metric's own resolution. The resolutions: swd between two exact sample sets of the
  evaluation's size; fd_digits two standard deviations of its value over bootstrap resamples of the evaluation's
  size from the real digits; class accuracy two standard errors of the difference of two accuracies on n samples
  each, 2 sqrt(2 p (1 - p) / n). Mode coverage may not fall below the worst fp32 seed's by more than one mode of the
  eight. The text-to-image digits presets (a diffusers teacher: digits-t2i-*, digits-pixart-sim, digits-flow-sim)
  have no final metric here (no evaluation during training takes prompts): their first steps' losses are the check.

A variant that would not test what it names on this device is not run, and its record says why: train.compile where
torch.compile does not work (the run would fall back to eager), train.channels_last on the CPU (the Trainer keeps the
weights NCHW there) or on networks without 4-D weights (the gmm MLPs). On the CPU train.cuda_graph runs the step's
deferred checks and fused Adam eagerly, without capture; the record says that too.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import NamedTuple

from ..config import resolve_config
from ..engine.switches import SWITCHES
from .auto_choices import auto_choices

EARLY_STEPS = 10  # Steps whose losses are recorded.
EARLY_LOSSES = ("loss_generator", "loss_fake")  # Both networks': a wrong fake score shows first in its own loss.
TEXT_TO_IMAGE = "text-to-image"  # The family of the digits presets with a diffusers teacher.
MODES = 8  # Components of the gmm presets' ring.
# Each preset family's final metrics and the overrides that evaluate them: the digits presets scaled to a few CPU
# minutes as `onestep demo` runs them (their metrics are off during training by default).
FAMILIES = {
    "gmm": (["swd", "mode_coverage"], []),
    "digits": (["fd_digits", "class_accuracy"],
               ["eval.metrics=[fd_digits,class_accuracy]", "eval.num_samples=1000", "train.batch_size=64",
                "train.ema_halflife_kimg=2"]),
    TEXT_TO_IMAGE: ([], ["train.batch_size=16"]),  # The batch of the CPU rows of docs/results.md.
}
# Precision -> (early tolerance, early steps compared): the largest relative difference allowed between a variant's
# generator losses and fp32's over its first steps. bf16 rounds every matrix operand to 8 significant bits (unit
# roundoff 2^-8 = 4e-3, fp16's 2^-11); a few layers and the objectives' differences of two denoisers (cancellation)
# make that about 1e-2 of the loss; 5e-2 allows for it. fp32 variants (compiled, graphed, channels_last) only
# reassociate sums; fused Adam (train.cuda_graph's) rounds its update in another order, about 1e-7 per step.
EARLY = {"bf16": (5e-2, 1), "fp16": (5e-2, 1), "fp32": (1e-4, EARLY_STEPS)}


class Variant(NamedTuple):
    """A configuration checked against fp32 eager: its switches (true, false or "auto"; those not named are off)
    and its precision (None: the preset's train.precision as this device resolves it)."""

    settings: dict[str, bool | str]
    precision: str | None

    @property
    def overrides(self) -> list[str]:
        return [f"train.{name}={str(self.settings.get(name, False)).lower()}" for name in SWITCHES]


EAGER = Variant({}, "fp32").overrides  # The reference: all three switches off.
VARIANTS = {
    "bf16": Variant({}, "bf16"),
    "compiled": Variant({"compile": True}, "fp32"),
    # The captured step on a GPU; on the CPU its deferred checks and fused Adam, eager.
    "cuda_graph": Variant({"cuda_graph": True}, "fp32"),
}


def auto_config_variants() -> dict[str, Variant]:
    """One variant per configuration `auto` can pick (bench/auto_choices.py) but fp32 eager, the reference; and
    `auto`, all three switches at auto in the preset's precision on this device."""
    variants = {choice.name: Variant({name: True for name in SWITCHES if getattr(choice, name)}, choice.precision)
                for choice in auto_choices() if choice != ("fp32", False, False, False)}
    return {**variants, "auto": Variant(dict.fromkeys(SWITCHES, "auto"), None)}


def select_variants(spec: str) -> dict[str, Variant]:
    """The variants a comma-separated list names: VARIANTS' names, `auto-configs` (all of auto_config_variants), or
    any one of those."""
    auto = auto_config_variants()
    chosen = {}
    for name in spec.split(","):
        if name == "auto-configs":
            chosen.update(auto)
        elif name in VARIANTS or name in auto:
            chosen[name] = VARIANTS.get(name) or auto[name]
        else:
            raise ValueError(f"Unknown variant {name!r}; choose from {', '.join(VARIANTS)}, auto-configs "
                             f"(all of: {', '.join(auto)}) or one of those.")
    return chosen


def family(preset: str) -> str:
    """The family of `preset` (its name's first part; TEXT_TO_IMAGE for a digits preset with a diffusers teacher),
    whose final metrics are compared."""
    name = preset.split("-")[0]
    if name not in ("gmm", "digits"):
        raise ValueError(f"Tracking checks the gmm and digits presets; {preset!r} is neither (its final metrics "
                         f"would have no resolution to compare within).")
    if name == "digits" and resolve_config(preset).teacher.kind == "diffusers":
        return TEXT_TO_IMAGE
    return name


def not_run_reason(train, networks, device) -> str | None:
    """Why a run of `train`'s switches would not test what they name on `device` (None: it would)."""
    from ..runtime.precision import compile_failure

    where = device_name(device)
    if train.compile is True and (failure := compile_failure(device)) is not None:
        return f"torch.compile does not work on {where} here ({failure}): train.compile=true would run eager"
    if train.channels_last is True:
        if device.type != "cuda":
            return (f"train.channels_last applies on CUDA only (the Trainer keeps the weights NCHW on {where}): the "
                    f"run would repeat the same switches without it; run it on a CUDA device")
        parameters = (p for net in (networks.teacher, networks.generator, networks.fake) for p in net.parameters())
        if not any(p.dim() == 4 for p in parameters):
            return ("the preset's networks have no 4-D weights, so train.channels_last changes nothing: the run would "
                    "repeat the same switches without it; run it on a digits preset (EDM U-Nets)")
    return None


def device_name(device) -> str:
    return "the CPU" if device.type == "cpu" else f"a {device.type} device"


def train_once(preset: str, overrides: list[str], steps: int, seed: int, precision: str | None = None) -> dict:
    """Distil `preset` for `steps` steps with the engine's Trainer (no run directory); returns its final metrics,
    their resolutions, the first steps' losses of both networks, the precision and switches it ran with and what
    they did not exercise here; or, for switches that would not test what they name here, only `not_run`, the reason.
    `precision` is passed to the Trainer as is, so bf16 and fp16 can be checked on a CPU too, where the command line
    refuses them for speed, not correctness."""
    from ..engine.loop import GeneratorEvaluator
    from ..runs.networks import build_networks
    from ..runtime.precision import resolve_device, resolve_precision, set_tf32
    from ..engine.trainer import Trainer

    family_overrides = FAMILIES[family(preset)][1]
    config = resolve_config(preset, overrides=[*family_overrides, f"train.max_steps={steps}", f"train.seed={seed}",
                                               "eval.every_steps=null", *overrides])
    device = resolve_device(config.train.device)
    networks = build_networks(config)
    reason = not_run_reason(config.train, networks, device)
    if reason is not None:
        return {"not_run": reason}
    if device.type == "cuda":
        set_tf32(config.train.tf32)
    precision = precision or resolve_precision(config.train.precision, device)
    trainer = Trainer(config, networks, device, precision)
    early = {key: [] for key in EARLY_LOSSES}
    for step in range(steps):
        stats = trainer.step()
        if step < EARLY_STEPS:
            for key in EARLY_LOSSES:
                early[key].append(float(stats[key]))
    final = GeneratorEvaluator(config, trainer)(trainer) if config.eval.metrics else {"metrics": {}, "provenance": {}}
    metrics = final["metrics"]
    return {"metrics": metrics, "resolution": resolutions(metrics, final["provenance"], config.eval.num_samples),
            **{f"early_{key}": early[key] for key in EARLY_LOSSES}, "precision": precision,
            "engine": trainer.switches.record(),
            "notes": engine_notes(config.train, trainer, device)}


def engine_notes(train, trainer, device) -> list[str]:
    """What a run's switches did not exercise on `device`, and what `auto` resolved to, in sentences."""
    notes, where = [], device_name(device)
    if trainer.switches.cuda_graph and trainer.step_graph is None:
        notes.append(f"cuda_graph: the step is not captured on {where}; its deferred checks and fused Adam ran eagerly")
    if any(getattr(train, name) == "auto" for name in SWITCHES):
        notes.append(f"auto resolved to {trainer.switches.describe().removeprefix('engine: ').rstrip('.')}")
        if device.type != "cuda":
            notes.append(f"on {where} auto is eager, the reference's own switches: this run does not test what auto "
                         f"picks on a CUDA device")
    return notes


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
        out["class_accuracy"] = 2 * (2 * p * (1 - p) / num_samples) ** 0.5  # Two accuracies' difference.
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


def tracking_check(preset: str, variants: dict[str, Variant], steps: int = 300, seeds: tuple[int, ...] = (0, 1, 2),
                   base: list[str] = ()) -> dict:
    """Train fp32 eager (`base` overrides) with each seed, then each variant (`base` + its switches, its precision)
    with seeds[0]. Returns every number, and per variant its checks and `passed` (None, with `not_run` and the
    reason, for a variant not run here); `passed` overall: every variant run passed."""
    names = FAMILIES[family(preset)][0]
    reference = [train_once(preset, [*base, *EAGER], steps, seed, "fp32") for seed in seeds]
    runs = {name: train_once(preset, [*base, *variant.overrides], steps, seeds[0], variant.precision)
            for name, variant in variants.items()}
    first = reference[0]
    # The band the fp32 seeds span, widened on each side by the metric's noise (mode coverage: one mode, below only).
    fp32_range = {metric: (min(run["metrics"][metric] for run in reference),
                           max(run["metrics"][metric] for run in reference)) for metric in names}
    tolerance = {metric: first["resolution"][metric] for metric in names}
    worst_coverage = min(run["metrics"]["mode_coverage"] for run in reference) if "mode_coverage" in names else None
    results = {}
    for name, fast in runs.items():
        asked = {"settings": variants[name].settings, "overrides": variants[name].overrides}
        if "not_run" in fast:
            results[name] = {**asked, "precision": variants[name].precision, "run": False, **fast, "passed": None}
            continue
        early_tolerance, early_steps = EARLY[fast["precision"]]
        compared = [pair for key in EARLY_LOSSES
                    for pair in zip(fast[f"early_{key}"][:early_steps], first[f"early_{key}"])]
        early = max(abs(a - b) / max(abs(b), 1e-12) for a, b in compared)
        checks = {"early_losses": early <= early_tolerance}
        for metric in names:
            value = fast["metrics"][metric]
            if metric == "mode_coverage":  # Only a loss of modes counts against the variant.
                checks[metric] = value >= worst_coverage - tolerance[metric]
            else:
                low, high = fp32_range[metric]
                checks[metric] = low - tolerance[metric] <= value <= high + tolerance[metric]
        results[name] = {**asked, "run": True, **fast, "early_max_rel_diff": early,
                         "early_tolerance": early_tolerance, "early_steps_compared": early_steps, "checks": checks,
                         "passed": all(checks.values())}
    not_run = {name: result["not_run"] for name, result in results.items() if not result["run"]}
    return {"preset": preset, "steps": steps, "seeds": list(seeds), "fp32": reference, "fp32_range": fp32_range,
            "tolerance": tolerance, "variants": results, "not_run": not_run,
            "passed": all(result["passed"] for result in results.values() if result["run"])}


def summary(result: dict) -> list[str]:
    """One line per variant of a `tracking_check` result: passed, FAILED (with the checks that failed) or not run
    (with why), then what it did not exercise."""
    lines = []
    for name, variant in result["variants"].items():
        head = f"{result['preset']} {name}:"
        if not variant["run"]:
            lines.append(f"{head} not run: {variant['not_run']}.")
            continue
        failed = [check for check, ok in variant["checks"].items() if not ok]
        verdict = "passed" if variant["passed"] else f"FAILED ({', '.join(failed)})"
        early = (f"early losses within {variant['early_max_rel_diff']:.1e} over {variant['early_steps_compared']} "
                 f"step(s)")
        metrics = [f"{metric} {value:.4g}" for metric, value in variant["metrics"].items()]
        lines.append(f"{head} {verdict}; {', '.join([variant['precision'], early, *metrics])}.")
        lines += [f"    {note}." for note in variant["notes"]]
    return lines


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(seed) for seed in text.split(","))
    except ValueError:
        raise ValueError(f"--seeds {text!r} is not a comma-separated list of integers, e.g. 0,1,2.") from None


def main(argv=None) -> int:
    """python -m onestep_cli.bench.tracking [--presets gmm-sid,digits-sim,...] [--variants bf16,compiled,cuda_graph |
    auto-configs | NAME,...] [--steps 300] [--seeds 0,1,2] [--device auto|cpu|cuda] [--set KEY=VALUE ...]"""
    parser = argparse.ArgumentParser(description="Check that faster runs (bf16, compiled, graphed, and every "
                                                 "configuration auto picks) track fp32 eager.")
    parser.add_argument("--presets", default="gmm-sim,gmm-sid,gmm-dmd,gmm-di")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated: bf16, compiled, cuda_graph, auto-configs (every configuration auto "
                             "can pick, and auto itself) or one of those by name")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="0,1,2", help="fp32 eager runs' seeds; the variants run with the first")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, reference and variants alike")
    args = parser.parse_args(argv)
    presets = args.presets.split(",")
    try:
        chosen = select_variants(args.variants)
        seeds = parse_seeds(args.seeds)
        for preset in presets:
            family(preset)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    passed = True
    for preset in presets:
        result = tracking_check(preset, chosen, args.steps, seeds, [f"train.device={args.device}", *args.overrides])
        print(json.dumps(result), flush=True)
        print("\n".join(summary(result)), file=sys.stderr, flush=True)
        passed &= result["passed"]
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
