"""Generator objectives (SIM, SiD, DMD, DI) and the fake-score loss, all against the Denoiser interface."""

from ..config import DIObjectiveConfig, DMDObjectiveConfig, SiDObjectiveConfig, SIMObjectiveConfig
from .di import DIObjective
from .dmd import DMDObjective
from .fake_score import fake_score_loss
from .sid import SiDObjective
from .sim import SIMObjective

_BY_CONFIG = {
    SIMObjectiveConfig: SIMObjective,
    SiDObjectiveConfig: SiDObjective,
    DMDObjectiveConfig: DMDObjective,
    DIObjectiveConfig: DIObjective,
}


def build_objective(config):
    """The objective object for an `objective:` config section."""
    return _BY_CONFIG[type(config)](config)


__all__ = ["build_objective", "fake_score_loss", "SIMObjective", "SiDObjective", "DMDObjective", "DIObjective"]
