"""The metric registry: METRICS (name -> Metric) and FEATURE_SPACES (name -> FeatureSpace). Every distribution space
`X` also offers the metric `fd_X`. The built-in metrics are registered here; other packages add their own through the
`onestep.metrics` entry-point group (a function that calls `register_metric` / `register_feature_space`), loaded at
the first lookup (docs/metrics.md)."""

from __future__ import annotations

import difflib
import sys
from importlib.metadata import entry_points

from .base import FeatureSpace, Metric, MetricError
from .builtin import BUILTIN_METRICS, FD_PREFIX, builtin_spaces, frechet_finish

PLUGIN_GROUP = "onestep.metrics"

METRICS: dict[str, Metric] = {}
FEATURE_SPACES: dict[str, FeatureSpace] = {}
_plugins_loaded = False


def register_metric(metric: Metric, replace: bool = False) -> None:
    """Add a metric to METRICS (an error if the name is taken, unless `replace`)."""
    if metric.name in METRICS and not replace:
        raise ValueError(f"Metric '{metric.name}' is already registered.")
    METRICS[metric.name] = metric


def register_feature_space(space: FeatureSpace, replace: bool = False) -> None:
    """Add a feature space; a distribution space `X` also makes `fd_X` available."""
    if space.name in FEATURE_SPACES and not replace:
        raise ValueError(f"Feature space '{space.name}' is already registered.")
    FEATURE_SPACES[space.name] = space


def load_plugins() -> None:
    """Call every `onestep.metrics` entry point once (the shipped digits metrics are one); a plug-in that fails to
    load is reported on stderr and skipped, so one broken package does not take every metric with it."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry in entry_points(group=PLUGIN_GROUP):
        try:
            entry.load()()
        except Exception as error:  # noqa: BLE001 - any failure of third-party code
            print(f"Warning: the metrics plug-in '{entry.name}' ({entry.value}) failed to load and is skipped: "
                  f"{type(error).__name__}: {error}", file=sys.stderr)


for _metric in BUILTIN_METRICS:
    register_metric(_metric)
for _space in builtin_spaces():
    register_feature_space(_space)


def get_metric(name: str) -> Metric:
    """The registered metric, or the Fréchet distance `fd_<space>` of a distribution feature space."""
    load_plugins()
    if name in METRICS:
        return METRICS[name]
    space = FEATURE_SPACES.get(name[len(FD_PREFIX):]) if name.startswith(FD_PREFIX) else None
    if space is not None and space.distribution:
        return Metric(name, "image", f"Fréchet distance in {space.name} features", spaces=(space.name,),
                      needs_reference=True, finish=frechet_finish(space.name))
    available = list(METRICS) + [f"{FD_PREFIX}{s}" for s, fs in FEATURE_SPACES.items() if fs.distribution]
    hint = difflib.get_close_matches(name, available, n=1)
    did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
    no_plugins = "" if entry_points(group=PLUGIN_GROUP) else (
        " No metric plug-in is installed (not even onestep's own digits metrics): reinstall onestep (`pip install "
        "-e .` in a checkout) so that its `onestep.metrics` entry points are registered.")
    raise MetricError(f"Unknown metric '{name}'.{did_you_mean} Available: {', '.join(available)}.{no_plugins}")


def check_metric_names(names: list[str]) -> None:
    for name in names:
        get_metric(name)


def is_image_metric(name: str) -> bool:
    return get_metric(name).kind == "image"


def needs_explicit_reference(metric: Metric) -> bool:
    """Whether `metric` needs --ref: it compares distributions and some space it reads has no default reference."""
    return metric.needs_reference and any(FEATURE_SPACES[s].default_reference is None for s in metric.spaces)
