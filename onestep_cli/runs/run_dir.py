"""The run directory's format, written and read only here: resolved config.yaml, stats.jsonl, metrics.jsonl,
checkpoints/ (runs/checkpoint.py), export/, run.json and the lock file `.lock` of the run using it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

from ..config import (ConfigError, RunConfig, config_to_yaml, describe_yaml_error, load_yaml, upgrade_saved_config,
                      validate_config)
from ..errors import OnestepError, disk_space
from ..jsonio import to_json
from .checkpoint import list_checkpoints

# Keys (or whole sections) that may change between a run and its resumption: the length of the run, memory/speed
# knobs that leave the training maths unchanged (up to floating-point rounding), and what is recorded or kept.
RESUMABLE_CHANGES = {"train.max_steps", "train.grad_accumulation", "train.batch_gpu", "train.gradient_checkpointing",
                     "train.tf32", "train.compile", "train.cuda_graph", "train.channels_last", "train.tick_every",
                     "train.checkpoint_every", "train.keep_checkpoints", "train.fsdp_reshard_after_forward",
                     "train.fsdp_prefetch", "eval", "logging", "prompts.cache_max"}
RESUME_ADVICE = ("Free space there, then run the same command again: it resumes from the newest complete "
                 "checkpoint.")


def resumable(key: str) -> bool:
    """Whether the config key `key` may differ between a run and its resumption."""
    return under_any(key, RESUMABLE_CHANGES)


def under_any(key: str, prefixes) -> bool:
    """Whether the dotted key `key` is one of `prefixes` or lies below one ("eval" holds "eval.metrics")."""
    return any(key == k or key.startswith(k + ".") for k in prefixes)


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
        try:
            return validate_config(upgrade_saved_config(self.read_raw_config()))
        except ConfigError as error:  # The run's own file, not the command line: exit code 1, naming the file.
            raise RunFormatError(f"{self.config_path} is not a valid run config ({str(error).rstrip('.')}); restore "
                                 "the file this run wrote, or start a new run with another --out.") from None

    def read_raw_config(self) -> dict:
        """config.yaml as written, not validated (for comparing runs of other versions)."""
        if not self.config_path.is_file():
            raise ConfigError(f"{self.path} is not a onestep run directory: it has no config.yaml.")
        try:
            data = load_yaml(self.config_path.read_text())
        except (OSError, UnicodeDecodeError) as error:
            raise RunFormatError(f"{self.config_path} cannot be read as YAML ({error}); expected the run's resolved "
                                 "config.") from None
        except yaml.YAMLError as error:
            raise RunFormatError(f"{self.config_path} cannot be read as YAML ({describe_yaml_error(error)}); expected "
                                 "the run's resolved config.") from None
        if not isinstance(data, dict):
            raise RunFormatError(f"{self.config_path} holds {type(data).__name__}; expected the run's config, a "
                                 "mapping (teacher:, ...).")
        return data

    def check_layout(self) -> None:
        """Refuse a folder whose run files are not what onestep writes: config.yaml or checkpoints of the wrong kind,
        or a run's records without the config.yaml that says what they belong to (a new run would append to them)."""
        for path, kind, is_kind in ((self.config_path, "a file", Path.is_file),
                                    (self.checkpoints, "a folder", Path.is_dir)):
            if path.exists() and not is_kind(path):
                raise RunFormatError(f"{path} is not {kind}, as onestep writes it; move it away or choose another "
                                     "--out.")
        leftovers = [p.name for p in (self.stats_path, self.metrics_path, self.status_path, self.checkpoints)
                     if p.exists()]
        if leftovers and not self.is_run():
            raise RunFormatError(f"{self.path} holds a run's {', '.join(leftovers)} but no config.yaml, so it can "
                                 "neither be resumed nor overwritten safely; restore its config.yaml, or choose "
                                 "another --out.")

    def prepare(self, config: RunConfig, log=print) -> bool:
        """Create the directory or check it belongs to this config; True when an earlier run is being continued.

        A run that wrote no checkpoint (it failed or was killed early) has nothing to resume: it starts again with
        whatever configuration is given, and its stats and metrics rows are dropped."""
        self.check_layout()
        if self.is_run():
            saved = flatten(self.read_config().model_dump(mode="json"))
            wanted = flatten(config.model_dump(mode="json"))
            changed = sorted(k for k in saved.keys() | wanted.keys()
                             if saved.get(k) != wanted.get(k) and not resumable(k))
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in changed[:5])
            if changed and list_checkpoints(self.checkpoints):
                raise ConfigError(
                    f"{self.path} holds a run with a different configuration ({details}). "
                    "Use another --out to start a new run, or the same options to resume this one."
                )
            self.write_config(config)
            if not changed:
                return True
            log(f"Note: {self.path} holds a run that wrote no checkpoint; it starts again with the new configuration "
                f"({details}).")
            self.truncate_records_after(-1)
            return False
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_config(config)
        return False

    def write_config(self, config: RunConfig) -> None:
        write_atomic(self.config_path, config_to_yaml(config))

    def append(self, path: Path, record: dict) -> None:
        """Add one line to a JSON-lines file; a write that fails (for lack of space: a DiskFullError) leaves the file
        as it was."""
        line = (to_json(record) + "\n").encode()
        with disk_space(path.parent, path.name, RESUME_ADVICE), open(path, "ab", buffering=0) as f:
            size = f.seek(0, os.SEEK_END)
            try:
                while line:
                    line = line[f.write(line):]
            except OSError:
                f.truncate(size)
                raise

    def truncate_records_after(self, step: int) -> None:
        """Drop stats/metrics rows newer than `step`, written by a run that died before its next checkpoint."""
        for path in (self.stats_path, self.metrics_path):
            if path.is_file():
                kept = [record for _, record in read_jsonl(path) if record.get("step", 0) <= step]
                write_atomic(path, "".join(to_json(record) + "\n" for record in kept))

    def read_records(self, path: Path) -> list[dict]:
        return [record for _, record in read_jsonl(path)] if path.is_file() else []

    eval_results = property(lambda self: self.path / "eval")

    def write_eval_result(self, result: dict) -> Path:
        """Keep an `onestep eval` result of this run as eval/<metrics>-step<N>.json, where `onestep compare` finds
        it."""
        step = result["provenance"]["common"].get("step", 0)
        path = self.eval_results / f"{'-'.join(sorted(result['metrics']))}-step{step:08d}.json"
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, to_json(result, indent=1))
        return path

    def eval_result_paths(self) -> list[Path]:
        """The stored evaluation results, oldest first (so that a re-evaluation of the same metric wins)."""
        return sorted(self.eval_results.glob("*.json"), key=lambda p: (p.stat().st_mtime_ns, p.name))

    def write_status(self, **status) -> None:
        write_atomic(self.status_path, to_json(status, indent=1))

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
    """Replace `path` by `text` at once; a write that fails (for lack of space: a DiskFullError) leaves it as it was."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with disk_space(path.parent, path.name, RESUME_ADVICE):
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
