"""`evaluate`: metrics of a generator (run or checkpoint, generated in memory) or of stored samples, with provenance."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from . import __version__
from .config import ConfigError, PRESET_DIR, read_config_file, resolve_config
from .engine.loading import is_generator_source, load_generator_source
from .engine.networks import build_teacher
from .engine.run_dir import RunDir
from .metrics import check_metric_names, compute_metrics
from .sample_io import read_samples
from .sampling import generate

DEFAULT_NUM = 2000


def teacher_from_reference(ref: str):
    """The teacher named by --ref: a run directory, a preset name, or a YAML config file."""
    path = Path(ref)
    if RunDir(path).is_run():
        return build_teacher(RunDir(path).read_config().teacher)
    if path.suffix in (".yaml", ".yml"):
        return build_teacher(resolve_config(config_file=path).teacher)
    if (PRESET_DIR / f"{ref}.yaml").is_file():
        return build_teacher(resolve_config(ref).teacher)
    raise ConfigError(f"--ref {ref} is neither a run directory, a YAML config file nor a preset name.")


def evaluate(source: Path, metrics: list[str], num: int | None = None, seeds: list[int] | None = None,
             ref: str | None = None) -> dict:
    """Compute `metrics` on `source`; returns {"source", "metrics": {name: value}, "provenance": {...}}."""
    check_metric_names(metrics)
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"Source {source} does not exist; pass a run directory, checkpoint, .npz or folder.")
    common = {"onestep": __version__, "torch": torch.__version__, "python": platform.python_version()}
    if is_generator_source(source):
        loaded = load_generator_source(source)
        seeds = seeds if seeds is not None else list(range(num or DEFAULT_NUM))
        samples = generate(loaded.generator, seeds, loaded.data_shape, loaded.label_dim)
        teacher = teacher_from_reference(ref) if ref else loaded.teacher
        common.update(source_kind="generator", step=loaded.step, kimg=loaded.kimg, seeds=f"{seeds[0]}-{seeds[-1]}",
                      generation="in memory, one step")
    else:
        samples, meta = read_samples(source)
        if num is not None:
            if num > samples.shape[0]:
                raise ValueError(f"--num {num} asks for more samples than {source} holds ({samples.shape[0]}).")
            samples = samples[:num]
        if ref:
            teacher = teacher_from_reference(ref)
        elif meta.get("source") and is_generator_source(Path(meta["source"])):
            teacher = load_generator_source(Path(meta["source"])).teacher
        else:
            raise ConfigError(f"{source} does not say which teacher it belongs to; pass --ref RUN_DIR, a preset or a config.")
        common.update(source_kind="samples", samples_meta=meta)
    results = compute_metrics(metrics, samples, teacher)
    return {
        "source": str(source),
        "metrics": {name: r.value for name, r in results.items()},
        "provenance": {"common": {**common, "num_samples": int(samples.shape[0])},
                       **{name: r.provenance for name, r in results.items()}},
    }


def store_result(result: dict, source: Path) -> Path | None:
    """Keep a run's evaluation next to it (RUN/eval/*.json) so `onestep compare` finds it."""
    source = Path(source)
    run = RunDir(source) if RunDir(source).is_run() else (RunDir(source.parent.parent) if source.name.startswith("step-") else None)
    if run is None or not run.is_run():
        return None
    step = result["provenance"]["common"].get("step", 0)
    path = run.path / "eval" / f"{'-'.join(sorted(result['metrics']))}-step{step:08d}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    return path
