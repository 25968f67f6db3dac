"""A gmm teacher that returns NaN on chosen calls: the NaN/inf guard's tests inject divergence with it."""

from __future__ import annotations

from onestep_cli.denoisers.gmm import GaussianMixtureDenoiser


class PoisonedTeacher(GaussianMixtureDenoiser):
    """The gmm teacher, returning NaN on chosen calls (SiD calls it once per step, in the generator update)."""

    def __init__(self, base: GaussianMixtureDenoiser, poisoned):
        super().__init__(base.means, base.stds, base.weights)
        self.poisoned, self.calls = poisoned, 0

    def forward(self, x, sigma, cond=None):
        self.calls += 1
        out = super().forward(x, sigma, cond)
        return out * float("nan") if self.poisoned(self.calls) else out
