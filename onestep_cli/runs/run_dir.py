"""The run directory's format, written and read only here: resolved config.yaml, stats.jsonl, metrics.jsonl,
checkpoints/ (runs/checkpoint.py), export/ and run.json."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

from ..config import ConfigError, RunConfig, config_to_yaml, upgrade_saved_config, validate_config
from ..errors import OnestepError

# Keys that may change between a run and its resumption: the length of the run, memory/speed knobs that leave the
# training maths unchanged (up to floating-point rounding), and where its records are also sent (logging.*).
RESUMABLE_CHANGES = {"train.max_steps", "train.grad_accumulation", "train.batch_gpu", "train.gradient_checkpointing",
                     "train.tf32", "prompts.cache_max"}
RESUMABLE_SECTIONS = ("logging.",)


def flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


class RunFormatError(OnestepError, ValueError):
    """A file of a run directory that onestep did not write as it is (edited, or damaged)."""


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSON-lines file of a run.

    A last line without its newline is a record cut off (a full disk, a killed process) or one a live run is still
    writing: it is dropped, with a warning when it is not valid JSON. Any other line that is not a JSON object is an
    error naming the file and line."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise RunFormatError(f"{path} cannot be read ({error}); expected a onestep JSON-lines file.") from None
    lines = text.split("\n")
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # No newline after it: cut off.
                print(f"Warning: dropping the cut-off last line {number} of {path}.", file=sys.stderr)
                break
            raise RunFormatError(f"{path} line {number} is not valid JSON ({error}); expected one object per line "
                                 "(remove or repair that line).") from None
        if not isinstance(record, dict):
            raise RunFormatError(f"{path} line {number} holds a JSON {type(record).__name__}; expected an object.")
        out.append((number, record))
    return out


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.yaml")
    stats_path = property(lambda self: self.path / "stats.jsonl")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    status_path = property(lambda self: self.path / "run.json")
    checkpoints = property(lambda self: self.path / "checkpoints")
    export = property(lambda self: self.path / "export")

    def is_run(self) -> bool:
        return self.config_path.is_file()

    def read_config(self) -> RunConfig:
        return validate_config(upgrade_saved_config(self.read_raw_config()))

    def read_raw_config(self) -> dict:
        """config.yaml as written, not validated (for comparing runs of other versions)."""
        if not self.config_path.is_file():
            raise ConfigError(f"{self.path} is not a onestep run directory: it has no config.yaml.")
        try:
            data = yaml.safe_load(self.config_path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise RunFormatError(f"{self.config_path} cannot be read as YAML ({error}); expected the run's resolved "
                                 "config.") from None
        if not isinstance(data, dict):
            raise RunFormatError(f"{self.config_path} holds {type(data).__name__}; expected the run's config, a "
                                 "mapping (teacher:, ...).")
        return data

    def prepare(self, config: RunConfig) -> bool:
        """Create the directory or check it belongs to this config; True when an earlier run is being continued."""
        if self.is_run():
            saved = flatten(self.read_config().model_dump(mode="json"))
            wanted = flatten(config.model_dump(mode="json"))
            changed = sorted(k for k in saved.keys() | wanted.keys()
                             if saved.get(k) != wanted.get(k) and k not in RESUMABLE_CHANGES
                             and not k.startswith(RESUMABLE_SECTIONS))
            if changed:
                details = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in changed[:5])
                raise ConfigError(
                    f"{self.path} holds a run with a different configuration ({details}). "
                    "Use another --out to start a new run, or the same options to resume this one."
                )
            self.write_config(config)
            return True
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_config(config)
        return False

    def write_config(self, config: RunConfig) -> None:
        write_atomic(self.config_path, config_to_yaml(config))

    def append(self, path: Path, record: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_records_after(self, step: int) -> None:
        """Drop stats/metrics rows newer than `step`, written by a run that died before its next checkpoint."""
        for path in (self.stats_path, self.metrics_path):
            if path.is_file():
                kept = [record for _, record in read_jsonl(path) if record.get("step", 0) <= step]
                write_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))

    def read_records(self, path: Path) -> list[dict]:
        return [record for _, record in read_jsonl(path)] if path.is_file() else []

    def write_status(self, **status) -> None:
        write_atomic(self.status_path, json.dumps(status, indent=1))

    def read_status(self) -> dict:
        """run.json ({} when absent)."""
        if not self.status_path.is_file():
            return {}
        try:
            status = json.loads(self.status_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RunFormatError(f"{self.status_path} cannot be read as JSON ({error}); delete it, the next "
                                 "`onestep distill` writes it again.") from None
        if not isinstance(status, dict):
            raise RunFormatError(f"{self.status_path} holds a JSON {type(status).__name__}; expected an object.")
        return status


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
