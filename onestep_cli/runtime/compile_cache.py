"""torch.compile's on-disk caches kept under ONESTEP_HOME, so that a block compiled once on a machine is not
compiled again by the next run there (inductor's default folder is in /tmp, which many machines clear).

Inductor keeps its compiled FX graphs, AOTAutograd graphs, autotuning results and Triton kernels under
TORCHINDUCTOR_CACHE_DIR; a value the user set is kept as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

from .home import onestep_home

CACHE_DIR_ENV = "TORCHINDUCTOR_CACHE_DIR"
# Each local cache's switch and the environment variable with which a user forces it (then left to the user).
CACHE_SWITCHES = (("torch._inductor.config", "fx_graph_cache", "TORCHINDUCTOR_FX_GRAPH_CACHE"),
                  ("torch._inductor.config", "autotune_local_cache", None),
                  ("torch._functorch.config", "enable_autograd_cache", "TORCHINDUCTOR_AUTOGRAD_CACHE"))


def default_compile_cache() -> Path:
    return onestep_home() / "inductor"


def use_persistent_compile_cache() -> Path | None:
    """Point inductor's caches at ONESTEP_HOME/inductor unless TORCHINDUCTOR_CACHE_DIR is set, and turn its local
    caches on (unless forced off through their environment variables). Returns the folder compiled kernels go to; None
    when ONESTEP_HOME cannot be written (inductor then keeps its own default)."""
    import importlib

    if not os.environ.get(CACHE_DIR_ENV):
        folder = default_compile_cache()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:  # A read-only home: compile as before, into inductor's temporary folder.
            return None
        os.environ[CACHE_DIR_ENV] = str(folder)
    for module, name, forcing_env in CACHE_SWITCHES:
        config = importlib.import_module(module)
        if (forcing_env is None or forcing_env not in os.environ) and hasattr(config, name):
            setattr(config, name, True)
    return Path(os.environ[CACHE_DIR_ENV])


def compile_cache_dir() -> Path | None:
    """The folder inductor caches compiled kernels in now; None before anything set it (its default, in /tmp)."""
    folder = os.environ.get(CACHE_DIR_ENV)
    return Path(folder) if folder else None
