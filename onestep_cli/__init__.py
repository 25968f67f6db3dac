"""onestep: distil pretrained diffusion models into one-step generators, then sample, evaluate and compare them."""

from .version import __version__

__all__ = ["__version__", "distill"]


def distill(config, out_dir, **kwargs):
    """Run (or resume) a distillation; see `onestep_cli.engine.loop.distill`."""
    from .engine.loop import distill as _distill

    return _distill(config, out_dir, **kwargs)
