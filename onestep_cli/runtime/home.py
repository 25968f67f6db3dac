"""ONESTEP_HOME: the one folder of this machine's onestep caches (metric weights, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def onestep_home() -> Path:
    """ONESTEP_HOME, else $XDG_CACHE_HOME/onestep, else ~/.cache/onestep."""
    if os.environ.get("ONESTEP_HOME"):
        return Path(os.environ["ONESTEP_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "onestep"
