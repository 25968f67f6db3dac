"""Sources side by side: unique labels, the union of their metrics and the config keys on which runs differ."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .sources import ReportError, Source, load_source


@dataclass(frozen=True)
class Comparison:
    """Sources in the order given, with what a table or plot of them needs.

    `config_differences` maps a dotted config key to {label: value} for each source with a config; a label is
    absent where that source's config lacks the key.
    """

    sources: list[Source]
    metrics: list[str]  # Union of the sources' final metric names, sorted.
    config_differences: dict[str, dict[str, Any]]


def compare(paths: Iterable[str | Path]) -> Comparison:
    """Load every path as a Source and put them side by side; raise ReportError if one cannot be read."""
    paths = list(paths)
    if not paths:
        raise ReportError("Nothing to compare: give run directories, checkpoint directories or eval JSON files.")
    sources = unique_labels([load_source(path) for path in paths])
    metrics = sorted({name for source in sources for name in source.metrics})
    return Comparison(sources, metrics, config_differences(sources))


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
