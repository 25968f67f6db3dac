"""The run directory: resolved config, stats.jsonl, metrics.jsonl, checkpoints/, export/ and run.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from ..config import ConfigError, RunConfig, config_to_yaml, upgrade_saved_config, validate_config

# Keys that may change between a run and its resumption: the length of the run, and memory/speed knobs that leave
# the training maths unchanged (up to floating-point rounding).
RESUMABLE_CHANGES = {"train.max_steps", "train.grad_accumulation", "train.batch_gpu", "train.gradient_checkpointing",
                     "train.tf32"}


def flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
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
        if not self.config_path.is_file():
            raise ConfigError(f"{self.path} is not a onestep run directory: it has no config.yaml.")
        return validate_config(upgrade_saved_config(yaml.safe_load(self.config_path.read_text())))

    def prepare(self, config: RunConfig) -> bool:
        """Create the directory or check it belongs to this config; True when an earlier run is being continued."""
        if self.is_run():
            saved = flatten(self.read_config().model_dump(mode="json"))
            wanted = flatten(config.model_dump(mode="json"))
            changed = sorted(k for k in saved.keys() | wanted.keys()
                             if saved.get(k) != wanted.get(k) and k not in RESUMABLE_CHANGES)
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
                rows = [line for line in path.read_text().splitlines() if line.strip()]
                kept = [line for line in rows if json.loads(line).get("step", 0) <= step]
                write_atomic(path, "".join(line + "\n" for line in kept))

    def read_records(self, path: Path) -> list[dict]:
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_status(self, **status) -> None:
        write_atomic(self.status_path, json.dumps(status, indent=1))

    def read_status(self) -> dict:
        return json.loads(self.status_path.read_text()) if self.status_path.is_file() else {}


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
