"""Sources side by side: unique labels, the union of their metrics, the config keys on which runs differ and the
provenance keys on which a metric was measured differently."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..runs.run_dir import flatten, under_any
from .sources import ReportError, Source, load_source

# Provenance keys that say how a number was measured (not what was measured): a metric whose sources differ in one of
# these is not comparable at face value. Dotted keys match themselves and everything below them.
MEASUREMENT_KEYS = ("precision", "precision_asked", "common.scorer_precision", "common.precision", "mode", "version",
                    "model", "weights.sha256", "backend", "preprocess", "tokenizer", "score")


@dataclass(frozen=True)
class Comparison:
    """Sources in the order given, with what a table or plot of them needs.

    `config_differences` maps a dotted config key to {label: value} for each source with a config; a label is
    absent where that source's config lacks the key. `measurement_differences` maps a metric to the provenance keys
    (MEASUREMENT_KEYS) on which the sources that have it differ, each to {label: value}, absent where it lacks the key.
    """

    sources: list[Source]
    metrics: list[str]  # Union of the sources' final metric names, sorted.
    config_differences: dict[str, dict[str, Any]]
    measurement_differences: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)


def compare(paths: Iterable[str | Path]) -> Comparison:
    """Load every path as a Source and put them side by side; raise ReportError if one cannot be read."""
    paths = list(paths)
    if not paths:
        raise ReportError("Nothing to compare: give run directories, checkpoint directories or eval JSON files.")
    sources = unique_labels([load_source(path) for path in paths])
    metrics = sorted({name for source in sources for name in source.metrics})
    return Comparison(sources, metrics, config_differences(sources), measurement_differences(sources, metrics))


def config_differences(sources: list[Source]) -> dict[str, dict[str, Any]]:
    """Dotted config keys whose value differs between (or is missing from some of) the sources that have a config."""
    configured = [s for s in sources if s.kind != "eval"]
    keys = dict.fromkeys(key for source in configured for key in source.config)  # First-seen order: config order.
    differences = {}
    for key in keys:
        values = {s.label: s.config[key] for s in configured if key in s.config}
        first = next(iter(values.values()))
        if len(values) < len(configured) or any(value != first for value in values.values()):
            differences[key] = values
    return differences


def measurement_differences(sources: list[Source], metrics: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per metric, the MEASUREMENT_KEYS of its provenance whose value differs between (or is missing from some of)
    the sources that have the metric with a provenance (e.g. precision fp32 against bf16)."""
    out = {}
    for metric in metrics:
        records = {s.label: flatten(s.provenance[metric]) for s in sources
                   if metric in s.metrics and isinstance(s.provenance.get(metric), dict)}
        if len(records) < 2:
            continue
        keys = dict.fromkeys(key for record in records.values() for key in record if under_any(key, MEASUREMENT_KEYS))
        differences = {}
        for key in keys:
            values = {label: record[key] for label, record in records.items() if key in record}
            if len(values) < len(records) or len({repr(v) for v in values.values()}) > 1:
                differences[key] = values
        if differences:
            out[metric] = differences
    return out


def unique_labels(sources: list[Source]) -> list[Source]:
    """Prefix colliding labels with as many parent folders as tell them apart; number exact duplicates."""
    labels = [s.label for s in sources]
    for label, count in Counter(labels).items():
        if count == 1:
            continue
        group = [i for i, existing in enumerate(labels) if existing == label]
        parents = [_parent_parts(sources[i]) for i in group]
        candidates = [label] * count
        for depth in range(1, max(len(p) for p in parents) + 1):
            candidates = ["/".join([*p[-depth:], label]) for p in parents]
            if len(set(candidates)) == len(set(parents)):  # Sources in one folder stay alike; numbered below.
                break
        for i, candidate in zip(group, candidates):
            labels[i] = candidate
    seen: Counter[str] = Counter()
    for i, label in enumerate(labels):
        seen[label] += 1
        if seen[label] > 1:
            labels[i] = f"{label} ({seen[label]})"  # The same source given twice.
    return [replace(source, label=label) for source, label in zip(sources, labels)]


def _parent_parts(source: Source) -> tuple[str, ...]:
    """Folders above what the label already names (a checkpoint's label names its run and itself)."""
    levels_named = 3 if source.kind == "checkpoint" else 1
    return source.path.resolve().parents[levels_named - 1].parts[1:]  # [1:] drops the root, "/".
