"""The generator objectives compute the right gradients: checked on Gaussians, where every score is exact.

Teacher q = N(m, v^2 I); generator G(z) = mu + s z with learnable (mu, s); fake score = the generator's exact denoiser
with its parameters detached (docs/objectives.md). sigma is fixed per test, so no sigma
sampling enters. A surrogate's gradient is the mean of per-sample gradients w.r.t. (mu, s) (= autograd of loss.mean());
it must match the true gradient of the divergence (closed form in tests/gaussian_reference.py) within 5 Monte-Carlo
standard errors estimated from the same per-sample gradients. Identities between objectives are checked exactly on
one batch. Each docstring names the source mutations the test catches.
"""

from __future__ import annotations

import pytest
import torch

from gaussian_reference import (
    GaussianDenoiser,
    fisher_divergence,
    frozen_sampling_fisher,
    gaussian_log_density,
    kl_divergence,
    mean_and_standard_error,
    per_sample_theta_gradients,
    pseudo_huber,
    theta_gradient,
)
from onestep_cli.config import DIObjectiveConfig, DMDObjectiveConfig, SiDObjectiveConfig, SIMObjectiveConfig
from onestep_cli.denoisers.gmm import GaussianMixtureDenoiser
from onestep_cli.objectives import DIObjective, DMDObjective, SiDObjective, SIMObjective, build_objective

DTYPE = torch.float64
TEACHER_MEAN = torch.tensor([0.3, -0.5, 1.0, 0.2], dtype=DTYPE)  # m
TEACHER_STD = torch.tensor(0.8, dtype=DTYPE)  # v
GENERATOR_MEAN = torch.tensor([1.0, 0.5, -0.4, 0.9], dtype=DTYPE)  # mu at theta0; every coordinate differs from m
GENERATOR_STD = torch.tensor(1.3, dtype=DTYPE)  # s at theta0; differs from v
DIM = TEACHER_MEAN.numel()
SIGMAS = (0.5, 2.0)  # Neither is 1, so a dropped or wrong power of sigma changes the gradient.
MC_BATCH = 200_000  # Samples per Monte-Carlo gradient estimate.
REFERENCE_BATCH = 1_000_000  # Samples of the frozen sampling distribution for the pseudo-Huber reference.
NUM_SE = 5.0  # Tolerance in standard errors; a seeded false alarm has probability ~1e-6 per component.
MIN_SIGNAL_SE = 20.0  # The true gradient must stand this many standard errors clear of zero (the test has power).
EXACT = dict(rtol=1e-12, atol=1e-12)  # Identities that hold to float64 rounding.


def teacher() -> GaussianDenoiser:
    return GaussianDenoiser(TEACHER_MEAN, TEACHER_STD)


def exact_fake(mu: torch.Tensor, s: torch.Tensor) -> GaussianDenoiser:
    """The generator's exact denoiser with its parameters frozen: the ideal fake score."""
    return GaussianDenoiser(mu.detach(), s.detach()[:, None])


def perturbed_fake(mu: torch.Tensor, s: torch.Tensor):
    """A generic, non-exact, nonlinear fake score: identities between objectives must not depend on exactness."""
    exact = exact_fake(mu, s)
    return lambda x, sigma, cond=None: exact(x, sigma, cond) + 0.15 * torch.sin(2 * x)


FAKES = {"exact": exact_fake, "perturbed": perturbed_fake}


def draw(seed: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded generator noise z and diffusion noise eps, each [batch, DIM]."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, DIM, generator=gen, dtype=DTYPE)
    noise = torch.randn(batch, DIM, generator=gen, dtype=DTYPE)
    return z, noise


def surrogate_gradients(objective, sigma: torch.Tensor, seed: int, batch: int, fake=exact_fake) -> torch.Tensor:
    """Per-sample gradients [batch, DIM + 1] of objective.generator_loss w.r.t. (mu, s) at theta0."""
    z, noise = draw(seed, batch)

    def loss(mu, s):
        x_g = mu + s[:, None] * z
        return objective.generator_loss(x_g, sigma, noise, teacher(), fake(mu, s))

    return per_sample_theta_gradients(loss, GENERATOR_MEAN, GENERATOR_STD, batch)


def constant_sigma(value: float, batch: int) -> torch.Tensor:
    return torch.full((batch,), value, dtype=DTYPE)


def varied_sigma(batch: int) -> torch.Tensor:
    """Distinct noise levels per sample, for exact identities that must hold at every sigma."""
    return torch.linspace(0.3, 3.0, batch, dtype=DTYPE)


def true_gradient(divergence, sigma: float) -> torch.Tensor:
    """Gradient w.r.t. (mu, s) at theta0 of divergence(mu, s, sigma)."""
    sigma = torch.tensor(sigma, dtype=DTYPE)
    return theta_gradient(lambda mu, s: divergence(mu, s, sigma), GENERATOR_MEAN, GENERATOR_STD)


def frozen_fisher_gradient(sigma: float) -> torch.Tensor:
    """Explicit (sampling-frozen) gradient of the Fisher divergence: SIM-l2 with unit weight."""
    return true_gradient(
        lambda mu, s, sg: frozen_sampling_fisher(mu, s, GENERATOR_MEAN, GENERATOR_STD, TEACHER_MEAN, TEACHER_STD, sg),
        sigma,
    )


def total_fisher_gradient(sigma: float) -> torch.Tensor:
    """Total gradient of the Fisher divergence, the sampling distribution's dependence on theta included."""
    return true_gradient(lambda mu, s, sg: fisher_divergence(mu, s, TEACHER_MEAN, TEACHER_STD, sg), sigma)


def assert_unbiased(rows: torch.Tensor, expected: torch.Tensor, expected_se: torch.Tensor | float = 0.0):
    """The mean of per-sample gradients matches `expected` within NUM_SE combined standard errors."""
    estimate, se = mean_and_standard_error(rows)
    se = (se**2 + torch.as_tensor(expected_se, dtype=DTYPE) ** 2).sqrt()
    report = f"estimate {estimate.tolist()}\nexpected {expected.tolist()}\nstd err  {se.tolist()}"
    assert expected.norm() > MIN_SIGNAL_SE * se.norm(), f"the test cannot tell this gradient from zero:\n{report}"
    assert ((estimate - expected).abs() <= NUM_SE * se + 1e-10).all(), f"biased gradient:\n{report}"


def sim(distance="l2", weighting="unit", normalization="none", huber_c=1.0) -> SIMObjective:
    config = SIMObjectiveConfig(distance=distance, weighting=weighting, normalization=normalization, huber_c=huber_c)
    return build_objective(config)


def sid(alpha: float, normalization="none") -> SiDObjective:
    return build_objective(SiDObjectiveConfig(alpha=alpha, normalization=normalization))


# ---------------------------------------------------------------------------------------------------------------------
# The references themselves


def test_reference_divergences_match_monte_carlo():
    """The closed forms the other tests trust agree with direct Monte-Carlo averages of their definitions.

    Catches: a wrong closed form in tests/gaussian_reference.py (which would make every other test meaningless).
    """
    sigma = torch.tensor(0.7, dtype=DTYPE)
    mu, s = GENERATOR_MEAN + 0.2, GENERATOR_STD * 0.9  # A theta away from theta0 for the frozen-sampling form.
    a, a0, b = s**2 + sigma**2, GENERATOR_STD**2 + sigma**2, TEACHER_STD**2 + sigma**2
    gen = torch.Generator().manual_seed(11)
    xi = torch.randn(REFERENCE_BATCH, DIM, generator=gen, dtype=DTYPE)
    score_q = lambda x: -(x - TEACHER_MEAN) / b  # noqa: E731

    x0 = GENERATOR_MEAN + a0.sqrt() * xi  # From p_{theta0}.
    frozen = (-(x0 - mu) / a - score_q(x0)).pow(2).sum(dim=1)
    x = mu + a.sqrt() * xi  # From p_theta.
    fisher = (-(x - mu) / a - score_q(x)).pow(2).sum(dim=1)
    log_ratio = gaussian_log_density(x, mu, a) - gaussian_log_density(x, TEACHER_MEAN, b)

    frozen_closed_form = frozen_sampling_fisher(mu, s, GENERATOR_MEAN, GENERATOR_STD, TEACHER_MEAN, TEACHER_STD, sigma)
    cases = {
        "frozen-sampling Fisher": (frozen, frozen_closed_form),
        "Fisher": (fisher, fisher_divergence(mu, s, TEACHER_MEAN, TEACHER_STD, sigma)),
        "KL": (log_ratio, kl_divergence(mu, s, TEACHER_MEAN, TEACHER_STD, sigma)),
    }
    for name, (samples, closed_form) in cases.items():
        estimate, se = mean_and_standard_error(samples[:, None])
        assert (estimate - closed_form).abs() <= NUM_SE * se, f"{name}: MC {estimate.item()} vs {closed_form.item()}"


def test_per_sample_rows_average_to_the_batch_gradient():
    """The per-sample gradient rows used throughout average to autograd of loss.mean() w.r.t. shared (mu, s).

    Catches: a broken per-sample gradient helper in tests/gaussian_reference.py.
    """
    batch = 256
    sigma = varied_sigma(batch)
    z, noise = draw(seed=12, batch=batch)
    objective = sim("pseudo_huber", "sigma4")
    rows = surrogate_gradients(objective, sigma, seed=12, batch=batch, fake=perturbed_fake)

    def mean_loss(mu, s):
        shared_s = s.expand(batch)
        fake = perturbed_fake(mu.expand(batch, -1), shared_s)
        return objective.generator_loss(mu + s * z, sigma, noise, teacher(), fake).mean()

    torch.testing.assert_close(rows.mean(dim=0), theta_gradient(mean_loss, GENERATOR_MEAN, GENERATOR_STD), **EXACT)


def test_single_component_gmm_is_the_gaussian_denoiser():
    """The package's analytic teacher with one component equals the closed-form Gaussian denoiser, Jacobian included.

    Catches: a wrong shrink factor or posterior in denoisers/gmm.py, which SIM/SiD differentiate through.
    """
    gmm = GaussianMixtureDenoiser(TEACHER_MEAN[None], TEACHER_STD[None])
    x = torch.randn(64, DIM, generator=torch.Generator().manual_seed(5), dtype=DTYPE, requires_grad=True)
    sigma = varied_sigma(64)
    cotangent = torch.randn(64, DIM, generator=torch.Generator().manual_seed(6), dtype=DTYPE)
    out_gmm = gmm(x, sigma)
    out_ref = teacher()(x, sigma)
    torch.testing.assert_close(out_gmm, out_ref, **EXACT)
    (vjp_gmm,) = torch.autograd.grad(out_gmm, x, cotangent)
    (vjp_ref,) = torch.autograd.grad(out_ref, x, cotangent)
    torch.testing.assert_close(vjp_gmm, vjp_ref, **EXACT)


# ---------------------------------------------------------------------------------------------------------------------
# SIM


@pytest.mark.parametrize("sigma", SIGMAS)
def test_sim_l2_gradient_is_the_frozen_sampling_fisher_gradient(sigma):
    """SIM with d = |y|^2, unit weight: E[grad surrogate] = grad_theta E_{x ~ sg(p_theta)} |s_p_theta - s_q|^2.

    Catches: a flipped sign of the SIM loss; a dropped 1/sigma^2 in the loss or 1/sigma for 1/sigma^2 in y; x_t
    detached from x_g in either network's input (the identity needs gradients through both); x_g detached in
    D_fake - x_g. (D_fake - x_t for D_fake - x_g is unbiased for l2 on Gaussians: the pseudo-Huber test catches it.)
    """
    rows = surrogate_gradients(sim("l2"), constant_sigma(sigma, MC_BATCH), seed=1, batch=MC_BATCH)
    assert_unbiased(rows, frozen_fisher_gradient(sigma))


@pytest.mark.parametrize("sigma", SIGMAS)
def test_sim_pseudo_huber_gradient_is_the_frozen_sampling_divergence_gradient(sigma):
    """SIM with d = sqrt(|y|^2 + c^2) - c: E[grad surrogate] = grad_theta E_{x ~ sg(p_theta)} d(s_p_theta - s_q).

    c is set to the rms of |s_p - s_q| at theta0, so l2 and pseudo-Huber differ in direction, not only in scale. The
    reference is autograd of the explicit divergence on its own large sample of p_theta0 (another seed).
    Catches: d'(y) = 2y (l2), y/c, or c for c^2 in y / sqrt(|y|^2 + c^2); the norm taken per element instead of per
    sample; D_fake - x_t in place of D_fake - x_g; a flipped sign; a wrong power of sigma in y or in the loss;
    detached network inputs.
    """
    sigma_t = torch.tensor(sigma, dtype=DTYPE)
    huber_c = frozen_sampling_fisher(
        GENERATOR_MEAN, GENERATOR_STD, GENERATOR_MEAN, GENERATOR_STD, TEACHER_MEAN, TEACHER_STD, sigma_t
    ).sqrt().item()

    a0, b = GENERATOR_STD**2 + sigma_t**2, TEACHER_STD**2 + sigma_t**2
    xi = torch.randn(REFERENCE_BATCH, DIM, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    x = GENERATOR_MEAN + a0.sqrt() * xi  # A fixed sample of the frozen sampling distribution.

    def divergence(mu, s):
        score_p = -(x - mu) / (s**2 + sigma_t**2)[:, None]
        score_q = -(x - TEACHER_MEAN) / b
        return pseudo_huber(score_p - score_q, huber_c)

    reference_rows = per_sample_theta_gradients(divergence, GENERATOR_MEAN, GENERATOR_STD, REFERENCE_BATCH)
    expected, expected_se = mean_and_standard_error(reference_rows)

    objective = sim("pseudo_huber", huber_c=huber_c)
    rows = surrogate_gradients(objective, constant_sigma(sigma, MC_BATCH), seed=3, batch=MC_BATCH)
    assert_unbiased(rows, expected, expected_se)
    # Power against l2: no rescaling of the l2 gradient comes within MIN_SIGNAL_SE standard errors of this one.
    l2 = frozen_fisher_gradient(sigma)
    residual = expected - torch.dot(expected, l2) / torch.dot(l2, l2) * l2
    assert residual.norm() > MIN_SIGNAL_SE * expected_se.norm(), "pseudo-Huber is a rescaled l2 here; pick another c"


@pytest.mark.parametrize("distance", ["l2", "pseudo_huber"])
def test_sim_sigma4_weighting_is_sigma4_times_unit(distance):
    """weighting='sigma4' multiplies each sample's loss and gradient by exactly sigma^4 (distinct sigma per sample).

    Catches: w = sigma^2 (or any other power) in place of sigma^4; the weight applied to one term only.
    """
    batch = 64
    sigma = varied_sigma(batch)
    z, noise = draw(seed=4, batch=batch)
    mu = GENERATOR_MEAN.expand(batch, -1)
    s = GENERATOR_STD.expand(batch)

    def per_sample(weighting):
        x_g = (mu + s[:, None] * z).requires_grad_(True)
        loss = sim(distance, weighting).generator_loss(x_g, sigma, noise, teacher(), perturbed_fake(mu, s))
        (grad,) = torch.autograd.grad(loss.sum(), x_g)
        return loss.detach(), grad

    unit_loss, unit_grad = per_sample("unit")
    weighted_loss, weighted_grad = per_sample("sigma4")
    torch.testing.assert_close(weighted_loss, sigma**4 * unit_loss, **EXACT)
    torch.testing.assert_close(weighted_grad, sigma[:, None] ** 4 * unit_grad, **EXACT)


@pytest.mark.parametrize("fake_kind", FAKES)
def test_sim_l2_sigma4_is_twice_sid_alpha_one(fake_kind):
    """SIM(l2, sigma^4) and 2 x SiD(alpha=1) have the same per-sample gradients, exact or perturbed fake (DESIGN §4).

    Catches: any drift between the two surrogates (a sign, a weight, a detached input, alpha misread) in either file.
    """
    batch = 256
    sigma = varied_sigma(batch)
    fake = FAKES[fake_kind]

    def rows(objective):
        return surrogate_gradients(objective, sigma, seed=5, batch=batch, fake=fake)

    torch.testing.assert_close(rows(sim("l2", "sigma4")), 2 * rows(sid(1.0)), **EXACT)


# ---------------------------------------------------------------------------------------------------------------------
# SiD


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.2])
def test_sid_gradient_matches_the_fisher_divergence(alpha, sigma):
    """SiD(alpha), no normalization: E[grad] = sigma^4 [E/2 + (1 - alpha)(T - E)], T and E the total and the
    sampling-frozen gradients of the Fisher divergence; so sigma^4 T/2 at alpha = 0.5 and sigma^4 E/2 at alpha = 1.

    Catches: a flipped sign of the loss or of D_teacher - D_fake; x_t detached from x_g in either network's input;
    x_g detached in D_teacher - x_g; alpha with the wrong sign, or ignored (alpha = 1 used for every alpha).
    """
    frozen, total = frozen_fisher_gradient(sigma), total_fisher_gradient(sigma)
    expected = sigma**4 * (frozen / 2 + (1 - alpha) * (total - frozen))
    rows = surrogate_gradients(sid(alpha), constant_sigma(sigma, MC_BATCH), seed=6, batch=MC_BATCH)
    assert_unbiased(rows, expected)


# ---------------------------------------------------------------------------------------------------------------------
# DI and DMD


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("name", ["di", "dmd"])
def test_di_and_dmd_gradients_are_sigma2_times_the_kl_gradient(name, sigma):
    """DI and DMD, no normalization: E[grad] = sigma^2 grad_theta KL(p_t || q_t).

    Catches: a flipped sign (D_teacher - D_fake, or x_g + step as DMD's target); gradients let through the networks
    (no_grad removed); DMD's target not detached (the loss then has no gradient at all); a stray 1/sigma^2; a
    normalizer applied although normalization is 'none'.
    """
    config = DIObjectiveConfig(normalization="none") if name == "di" else DMDObjectiveConfig(normalization="none")
    expected = sigma**2 * true_gradient(lambda mu, s, sg: kl_divergence(mu, s, TEACHER_MEAN, TEACHER_STD, sg), sigma)
    rows = surrogate_gradients(build_objective(config), constant_sigma(sigma, MC_BATCH), seed=7, batch=MC_BATCH)
    assert_unbiased(rows, expected)


@pytest.mark.parametrize("fake_kind", FAKES)
def test_dmd_equals_di_without_normalization(fake_kind):
    """DMD and DI give identical per-sample gradients on one batch, exact or perturbed fake.

    Catches: DMD's regression target not detached, or either loss differentiating through the networks.
    """
    batch = 256
    sigma = varied_sigma(batch)
    fake = FAKES[fake_kind]
    dmd = surrogate_gradients(DMDObjective(DMDObjectiveConfig(normalization="none")), sigma, 8, batch, fake)
    di = surrogate_gradients(DIObjective(DIObjectiveConfig(normalization="none")), sigma, 8, batch, fake)
    torch.testing.assert_close(dmd, di, **EXACT)


@pytest.mark.parametrize("normalization", ["none", "mean_abs_error"])
@pytest.mark.parametrize("name", ["di", "dmd"])
def test_di_and_dmd_sample_gradient_is_the_explicit_step(name, normalization):
    """d loss_i / d x_g_i = (D_fake - D_teacher)(x_t_i) / sg(mean|x_g_i - D_teacher(x_t_i)|), written out here.

    Catches: the normalizer taken from x_t instead of x_g, as a batch mean, multiplied instead of divided, or not
    applied; the step's sign flipped; gradients through the networks or an undetached target.
    """
    batch = 32
    sigma = varied_sigma(batch)
    z, noise = draw(seed=9, batch=batch)
    mu, s = GENERATOR_MEAN.expand(batch, -1), GENERATOR_STD.expand(batch)
    fake = perturbed_fake(mu, s)
    config_cls = DIObjectiveConfig if name == "di" else DMDObjectiveConfig
    objective = build_objective(config_cls(normalization=normalization))

    x_g = (mu + s[:, None] * z).requires_grad_(True)
    loss = objective.generator_loss(x_g, sigma, noise, teacher(), fake)
    (grad,) = torch.autograd.grad(loss.sum(), x_g)

    x_t = x_g.detach() + sigma[:, None] * noise
    teacher_x0 = teacher()(x_t, sigma)
    divisor = torch.ones(batch, dtype=DTYPE)
    if normalization == "mean_abs_error":
        divisor = (x_g.detach() - teacher_x0).abs().mean(dim=1)
    torch.testing.assert_close(grad, (fake(x_t, sigma) - teacher_x0) / divisor[:, None], **EXACT)


# ---------------------------------------------------------------------------------------------------------------------
# Normalization


NORMALIZED = {
    "sim-l2": lambda normalization: sim("l2", "sigma4", normalization),
    "sim-pseudo_huber": lambda normalization: sim("pseudo_huber", "sigma4", normalization),
    "sid": lambda normalization: sid(1.2, normalization),
    "dmd": lambda normalization: DMDObjective(DMDObjectiveConfig(normalization=normalization)),
    "di": lambda normalization: DIObjective(DIObjectiveConfig(normalization=normalization)),
}


@pytest.mark.parametrize("name", NORMALIZED)
def test_mean_abs_error_divides_each_sample_gradient_by_a_constant(name):
    """With 'mean_abs_error', the full Jacobian d loss_i / d x_g_j is the 'none' one divided by the detached
    mean|x_g_i - D_teacher(x_t_i)|: the same on the diagonal blocks, and zero across samples.

    Catches: the normalizer not detached (an extra gradient term); a normalizer computed from x_t, from the fake, or
    over the batch (samples coupled); the normalizer multiplied instead of divided, or ignored.
    """
    batch = 5
    sigma = varied_sigma(batch)
    z, noise = draw(seed=10, batch=batch)
    mu, s = GENERATOR_MEAN.expand(batch, -1), GENERATOR_STD.expand(batch)
    fake = perturbed_fake(mu, s)
    x_g = mu + s[:, None] * z

    def jacobian(normalization):
        objective = NORMALIZED[name](normalization)
        loss_fn = lambda x: objective.generator_loss(x, sigma, noise, teacher(), fake)  # noqa: E731
        return torch.autograd.functional.jacobian(loss_fn, x_g)  # [batch, batch, DIM]

    x_t = x_g + sigma[:, None] * noise
    divisor = (x_g - teacher()(x_t, sigma)).abs().mean(dim=1)
    expected = jacobian("none") / divisor[:, None, None]
    torch.testing.assert_close(jacobian("mean_abs_error"), expected, **EXACT)
    off_diagonal = ~torch.eye(batch, dtype=torch.bool)
    assert expected[off_diagonal].abs().max() == 0, "samples must not interact in the per-sample loss"
