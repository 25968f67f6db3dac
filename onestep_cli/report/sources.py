"""What `onestep compare` reads: run directories, checkpoint directories and eval JSON files, each as a Source."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple


from ..errors import OnestepError
from ..runs.run_dir import RunDir, RunFormatError, flatten, read_jsonl

SourceKind = Literal["run", "checkpoint", "eval"]
EXPECTED = ("a run directory (with config.yaml), a checkpoint directory (RUN/checkpoints/step-N with state.json) "
            "or an eval result file written by `onestep eval --json`")


class ReportError(OnestepError, ValueError):
    """A source that cannot be read, phrased as a sentence naming the path and what was expected."""


@dataclass(frozen=True)
class Source:
    """One row of a comparison: a run, a checkpoint of a run, or an eval result."""

    label: str  # Folder or file name; `compare` makes it unique among the sources.
    kind: SourceKind
    path: Path  # As given.
    config: dict[str, Any] = field(default_factory=dict)  # Dotted key -> value of the run's config; {} for eval files.
    metrics: dict[str, float] = field(default_factory=dict)  # Final metrics.
    history: list[tuple[float, dict[str, float]]] = field(default_factory=list)  # (kimg, metrics) per evaluation; runs.
    provenance: dict[str, dict] = field(default_factory=dict)  # Metric name -> how it was measured.
    kimg: float | None = None  # Training progress in thousands of generated images; None for eval files.
    step: int | None = None  # Generator updates; None for eval files.
    status: str | None = None  # run.json's "complete" or "running"; None when unknown.


class _Record(NamedTuple):
    step: int
    kimg: float
    metrics: dict[str, float]
    provenance: dict[str, dict]


def load_source(path: str | Path) -> Source:
    """Read a run directory, a checkpoint directory or an eval JSON file; raise ReportError for anything else."""
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path} does not exist; expected {EXPECTED}.")
    if path.is_file():
        return _load_eval_file(path)
    if (path / "config.yaml").is_file():
        return _load_run(path)
    if (path / "state.json").is_file():
        return _load_checkpoint(path)
    runs_inside = sorted(p.name for p in path.iterdir() if (p / "config.yaml").is_file())
    hint = f" It holds the runs {', '.join(runs_inside)}: pass those instead." if runs_inside else ""
    raise ReportError(f"{path} is a folder with neither config.yaml nor state.json; expected {EXPECTED}.{hint}")


def _load_run(run_dir: Path) -> Source:
    records = _read_metrics(run_dir / "metrics.jsonl")
    last = records[-1] if records else None
    metrics = dict(last.metrics) if last else {}
    provenance = dict(last.provenance) if last else {}
    # Results of `onestep eval` on the run and its checkpoints, the latest checkpoint's last (a re-evaluation of one
    # checkpoint after the earlier one): the run's metrics are its furthest-trained ones, wherever files were copied.
    evaluated = sorted((_read_eval_result(path) for path in RunDir(run_dir).eval_result_paths()), key=_trained_kimg)
    for eval_metrics, eval_provenance in evaluated:
        metrics.update(eval_metrics)
        provenance.update(eval_provenance)
    history = _history(records, evaluated, provenance)
    status = _read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    last_stats = _read_jsonl(run_dir / "stats.jsonl")[-1:] if (run_dir / "stats.jsonl").is_file() else []
    # run.json is authoritative; the last stats and metrics records say how far a run without one got.
    progress = [status, *(obj for _, obj in last_stats), last._asdict() if last else {}]
    return Source(
        label=run_dir.name, kind="run", path=run_dir, config=_read_config(run_dir), metrics=metrics,
        history=history, provenance=provenance,
        kimg=_first_number(progress, "kimg"), step=_first_number(progress, "step"), status=status.get("status"),
    )


def _history(records: list[_Record], evaluated: list[tuple[dict, dict]],
             latest: dict[str, dict]) -> list[tuple[float, dict[str, float]]]:
    """(kimg, metrics) per evaluation: the in-training records, then, for a metric they lack, the `onestep eval`
    results of the run's checkpoints measured on as many images and the same seeds as its latest result (an FID-5k
    among FID-10k points is left out of their curve, not drawn as a step of it)."""
    history = [(r.kimg, r.metrics) for r in records]
    in_training = {name for r in records for name in r.metrics}
    points: dict[float, dict[str, float]] = {}
    for eval_metrics, eval_provenance in evaluated:
        for name, value in eval_metrics.items():
            common = eval_provenance.get(name, {}).get("common", {})
            if name in in_training or not _is_number(common.get("kimg")):
                continue
            if _sample_of(common) == _sample_of(latest[name].get("common", {})):
                points.setdefault(float(common["kimg"]), {})[name] = value
    return history + sorted(points.items())


def _trained_kimg(evaluation: tuple[dict, dict]) -> float:
    """How far the evaluated generator was trained; -inf for a result that does not say (sorted first)."""
    kimg = next(iter(evaluation[1].values()), {}).get("common", {}).get("kimg")
    return float(kimg) if _is_number(kimg) else float("-inf")


def _sample_of(common: dict) -> tuple:
    return common.get("num_images"), common.get("seeds")


def _load_checkpoint(checkpoint_dir: Path) -> Source:
    state = _read_json(checkpoint_dir / "state.json")
    run_dir = checkpoint_dir.parent.parent
    if not isinstance(state.get("step"), int):
        raise ReportError(f"{checkpoint_dir / 'state.json'} has no integer 'step'; expected a onestep checkpoint.")
    if not (run_dir / "config.yaml").is_file():
        raise ReportError(f"{checkpoint_dir} has state.json but {run_dir} has no config.yaml; expected a checkpoint "
                          "inside its run, at RUN/checkpoints/step-N.")
    at_step = [r for r in _read_metrics(run_dir / "metrics.jsonl") if r.step == state["step"]]
    record = at_step[-1] if at_step else None
    return Source(
        label=f"{run_dir.name}/{checkpoint_dir.name}", kind="checkpoint", path=checkpoint_dir,
        config=_read_config(run_dir), metrics=dict(record.metrics) if record else {},
        provenance=dict(record.provenance) if record else {}, kimg=_first_number([state], "kimg"), step=state["step"],
    )


def _load_eval_file(path: Path) -> Source:
    metrics, provenance = _read_eval_result(path)
    return Source(label=path.stem, kind="eval", path=path, metrics=metrics, provenance=provenance)


def _read_config(run_dir: Path) -> dict[str, Any]:
    try:
        return flatten(RunDir(run_dir).read_raw_config())
    except RunFormatError as error:
        raise ReportError(str(error)) from None


def _read_metrics(path: Path) -> list[_Record]:
    if not path.is_file():
        return []
    records = []
    for number, obj in _read_jsonl(path):
        where = f"{path} line {number}"
        well_formed = isinstance(obj.get("step"), int) and _is_number(obj.get("kimg")) and isinstance(
            obj.get("metrics"), dict)
        if not well_formed:
            raise ReportError(f"{where} needs 'step' (integer), 'kimg' (number) and 'metrics' (object); "
                              f"it has keys {sorted(obj)}.")
        metrics = _numbers(obj["metrics"], where)
        records.append(_Record(obj["step"], float(obj["kimg"]), metrics,
                               _per_metric(obj.get("provenance"), metrics, where)))
    return records


def _read_eval_result(path: Path) -> tuple[dict[str, float], dict[str, dict]]:
    data = _read_json(path)
    if not isinstance(data.get("metrics"), dict):
        raise ReportError(f"{path} has no 'metrics' object; expected {EXPECTED}.")
    metrics = _numbers(data["metrics"], str(path))
    return metrics, _per_metric(data.get("provenance"), metrics, str(path))


def _per_metric(provenance: Any, metrics: dict[str, float], where: str) -> dict[str, dict]:
    """Provenance keyed by metric name; a single shared record applies to every metric."""
    if not provenance:
        return {}
    if not isinstance(provenance, dict):
        raise ReportError(f"{where}: 'provenance' is {type(provenance).__name__}; expected an object.")
    if all(name in metrics and isinstance(value, dict) for name, value in provenance.items()):
        return dict(provenance)
    common = provenance.get("common")
    if isinstance(common, dict) and all(name == "common" or (name in metrics and isinstance(value, dict))
                                        for name, value in provenance.items()):
        # `onestep eval`'s layout: one record per metric, and what they share (device, precision...) under "common".
        return {name: {**value, "common": common} for name, value in provenance.items() if name != "common"}
    return {name: provenance for name in metrics}


def _numbers(metrics: dict, where: str) -> dict[str, float]:
    """Metric values as floats; null is how onestep writes a NaN or infinite value (jsonio.py), read back as NaN."""
    for name, value in metrics.items():
        if value is not None and not _is_number(value):
            raise ReportError(f"{where}: metric '{name}' is {value!r}; expected a number.")
    return {name: float("nan") if value is None else float(value) for name, value in metrics.items()}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _first_number(records: list[dict], key: str) -> Any:
    return next((r[key] for r in records if _is_number(r.get(key))), None)


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path} cannot be read ({exc}); expected a readable text file.") from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is not valid JSON ({exc}); expected {EXPECTED}.") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path} holds a JSON {type(data).__name__}; expected an object.")
    return data


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each record of a run's JSON-lines file, read as the run directory reads it."""
    try:
        return read_jsonl(path)
    except RunFormatError as error:
        raise ReportError(str(error)) from None
