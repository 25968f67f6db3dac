"""onestep: distil pretrained diffusion models into one-step generators, then sample, evaluate and compare them."""

__version__ = "0.1.0"


def distill(config, out_dir, **kwargs):
    """Run (or resume) a distillation; see `onestep_cli.engine.loop.distill`."""
    from .engine.loop import distill as _distill

    return _distill(config, out_dir, **kwargs)
