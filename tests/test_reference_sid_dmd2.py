"""onestep against the official SiD and DMD2 code on identical inputs: noise levels, losses, gradients, EMA, warm-up.

The fixtures in `tests/fixtures/reference/` were recorded from the official code itself, run on CPU in float32 from
checkouts outside this repository (the commands are in each JSON's `command`):
- `sid.*` by `scripts/reference/sid.py` from mingyuanzhou/SiD @01fbb13: the noise levels `SID_EDMLoss` hands to the
  score networks, one fake-score and one generator step of `sid_training_loop.py` on tiny DDPM++ networks (with their
  draws, per-sample losses and gradients), and its EMA lines executed for 30 iterations.
- `dmd2.*` by `scripts/reference/dmd2.py` from tianweiy/DMD2 @8d8fa55, ImageNet recipe without the GAN term: the noise
  levels of `EDMGuidance`, one `train_one_step` on tiny ADM networks, and the learning-rate warm-up.

Constants between the official losses and onestep's per-sample losses (mean over the batch below), D = C*H*W:
- SiD generator: per-sample losses equal; the official backward is of loss.sum() * 100 / batch (loss_scaling_G), so
  its gradients are 100 x onestep's batch-mean gradients. SiD fake score: equal per sample, gradients 1 x.
- DMD2 generator: loss_dm = 0.5 mse, a mean over batch and D elements, so loss_dm = mean(onestep) / D and its gradients
  are onestep's / D. DMD2 fake score: loss_fake_mean = mean(onestep) / D, gradients / D (its weight
  sigma^-2 + sigma_data^-2 is EDM's lambda).
SiD's networks receive all-zero augment labels where onestep passes none: the same, EDM's map_augment has no bias.
DMD2's generator is G(z) = D(80 z, 80) (its --conditioning_sigma default), and so is the one compared here, as in
onestep's imagenet64-cond-dmd preset (the CIFAR-10 and digits dmd presets keep SiD's 2.5).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from onestep_cli.config import (DMDObjectiveConfig, KarrasIndexSigmaConfig, KarrasSigmaConfig, LogNormalSigmaConfig,
                                SiDObjectiveConfig, list_presets, resolve_config)
from onestep_cli.denoisers.edm import build_precond
from onestep_cli.denoisers.generator import OneStepGenerator
from onestep_cli.objectives import build_objective, fake_score_loss
from onestep_cli.objectives.sigmas import sample_sigma

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
NUM_DRAWS = 200_000  # onestep's draws per distribution, as many as the official samples.
KS_MAX = 0.01  # Two-sample KS statistic; two samples of 200k draws of one distribution give 0.002-0.004.
GRID_RTOL = 1e-5  # onestep's Karras levels (float64, then float32) vs DMD2's (float32): measured 1.6e-6 apart.
# Gradients: float32 through the same networks (the generated images are bitwise equal) and equivalent but differently
# ordered loss arithmetic. Measured on CPU: 1 - cosine <= 5e-13, relative error <= 1.1e-6; the bounds leave ~100x for
# other BLAS builds. Per-sample losses: measured within 2e-6 relative.
COSINE_MIN, REL_ERROR_MAX = 0.99999, 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny convolutions run faster on one thread.


def load_fixture(name: str) -> tuple[dict, dict]:
    return load_file(str(FIXTURES / f"{name}.safetensors")), json.loads((FIXTURES / f"{name}.json").read_text())


SID, SID_META = load_fixture("sid")
DMD2, DMD2_META = load_fixture("dmd2")


def presets_of(objectives: set[str]) -> list[str]:
    """Shipped presets with an EDM teacher whose objective is one of `objectives`."""
    names = []
    for name in list_presets():
        config = resolve_config(preset=name)
        if config.teacher.kind == "edm" and config.objective.name in objectives:
            names.append(name)
    return names


SID_PRESETS = presets_of({"sid", "sim"})
DMD_PRESETS = presets_of({"dmd"})


# ---------------------------------------------------------------------------------------------------------------------
# Noise levels


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = a.double().sort().values, b.double().sort().values
    points = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, points, right=True) / a.numel()
    cdf_b = torch.searchsorted(b, points, right=True) / b.numel()
    return float((cdf_a - cdf_b).abs().max())


def draw(config) -> torch.Tensor:
    sigma = sample_sigma(config, NUM_DRAWS, torch.Generator().manual_seed(0))
    assert sigma.dtype == torch.float32 and sigma.shape == (NUM_DRAWS,)
    return sigma


def assert_matches_sid(config, which: str) -> None:
    """onestep's draws from `config` against SiD's (its order statistics of 200k draws)."""
    ks = ks_statistic(draw(config), SID[f"sigma/{which}"])
    assert ks <= KS_MAX, f"KS {ks:.4f} against SiD's {which} noise levels ({SID_META['sigma'][which]})"


def assert_matches_dmd2(config, which: str) -> None:
    """onestep's draws from `config` against DMD2's: the same grid levels, the same set of them drawn, KS."""
    grid, counts = DMD2["sigma/grid"].double(), DMD2[f"sigma/{which}_counts"].long()
    sigma = draw(config).double()
    above = torch.searchsorted(grid, sigma).clamp(1, grid.numel() - 1)
    index = torch.where((sigma - grid[above - 1]).abs() < (grid[above] - sigma).abs(), above - 1, above)
    error = float(((sigma - grid[index]) / grid[index]).abs().max())
    assert error <= GRID_RTOL, f"a drawn sigma is {error:.2e} (relative) away from every level of DMD2's grid"
    drawn, expected = set(index.unique().tolist()), set(counts.nonzero().flatten().tolist())
    assert drawn == expected, (f"levels drawn: {min(drawn)}..{max(drawn)} ({len(drawn)}); DMD2 draws "
                               f"{min(expected)}..{max(expected)} ({len(expected)}) of its ascending grid")
    ks = ks_statistic(index, torch.repeat_interleave(torch.arange(grid.numel()), counts))
    assert ks <= KS_MAX, f"KS {ks:.4f} against DMD2's {which} noise levels ({DMD2_META['sigma'][which]})"


def test_presets_are_found():
    # Guards the parametrisations below against a discovery that silently finds nothing.
    assert {"cifar10-uncond-sid", "cifar10-cond-sid", "imagenet64-cond-sid"} <= set(SID_PRESETS)
    assert {"cifar10-uncond-dmd", "cifar10-cond-dmd", "imagenet64-cond-dmd", "digits32-dmd",
            "digits-dmd"} <= set(DMD_PRESETS)


@pytest.mark.parametrize("config, which", [(KarrasSigmaConfig(), "generator"), (LogNormalSigmaConfig(), "fake")],
                         ids=["karras-generator", "lognormal-fake"])
def test_sigma_config_matches_sid(config, which):
    assert_matches_sid(config, which)


@pytest.mark.parametrize("config, which", [
    (KarrasIndexSigmaConfig(), "generator"), (KarrasIndexSigmaConfig(min_fraction=0.0, max_fraction=1.0), "fake")],
    ids=["karras_index-generator", "karras_index_all-fake"])
def test_sigma_config_matches_dmd2(config, which):
    assert_matches_dmd2(config, which)


@pytest.mark.parametrize("preset", SID_PRESETS)
def test_sid_preset_noise_levels_match_sid(preset):
    config = resolve_config(preset=preset)
    assert_matches_sid(config.objective.sigma, "generator")
    assert_matches_sid(config.fake.sigma, "fake")


@pytest.mark.parametrize("preset", DMD_PRESETS)
def test_dmd_preset_noise_levels_match_dmd2(preset):
    config = resolve_config(preset=preset)
    assert_matches_dmd2(config.objective.sigma, "generator")
    assert_matches_dmd2(config.fake.sigma, "fake")


# ---------------------------------------------------------------------------------------------------------------------
# Losses and gradients


def build_network(meta: dict, flat: torch.Tensor) -> torch.nn.Module:
    """onestep's EDM network of the recorded config, with the recorded weights (state-dict values in order)."""
    net = build_precond(meta["class_name"], meta["init_kwargs"])
    assert [[key, list(value.shape)] for key, value in net.state_dict().items()] == \
        [[key, shape] for key, shape, _ in meta["state_dict"]]
    sizes = [math.prod(shape) for _, shape, _ in meta["state_dict"]]
    values = flat.float().split(sizes)
    net.load_state_dict({key: value.reshape(shape) for (key, shape, _), value in zip(meta["state_dict"], values)})
    return net.eval()


def flat_grad(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in net.parameters()])


def assert_same_direction(official: torch.Tensor, ours: torch.Tensor, what: str) -> None:
    """`official` and `ours` (already scaled by the documented constant) agree in direction and norm."""
    official, ours = official.double().flatten(), ours.double().flatten()
    cosine = float(official @ ours / (official.norm() * ours.norm()))
    rel_error = float((official - ours).norm() / official.norm())
    message = f"{what}: cosine {cosine:.8f}, relative error {rel_error:.2e}"
    assert cosine >= COSINE_MIN and rel_error <= REL_ERROR_MAX, message


def sid_networks(variant: str):
    meta = SID_META["variants"][variant]
    teacher, fake, generator = (build_network(meta, SID[f"{variant}/weights/{role}"])
                                for role in ("teacher", "fake", "generator"))
    cond = SID.get(f"{variant}/labels")
    return meta, teacher.requires_grad_(False), fake, OneStepGenerator(generator, meta["init_sigma"]), cond


@pytest.mark.parametrize("variant", ["uncond", "cond"])
def test_sid_generator_loss_matches_sid(variant):
    meta, teacher, fake, generator, cond = sid_networks(variant)
    fake.requires_grad_(False)  # SiD's generator step: fake score in eval mode, no parameter gradients
    step = f"{variant}/generator_step"
    sigma, noise = SID[f"{step}/sigma"], SID[f"{step}/noise"]
    objective = build_objective(SiDObjectiveConfig(alpha=meta["alpha"]))

    x_g = generator(SID[f"{step}/z"], cond)
    torch.testing.assert_close(x_g.detach(), SID[f"{step}/images"], rtol=1e-6, atol=1e-6)
    x_leaf = x_g.detach().requires_grad_(True)
    loss = objective.generator_loss(x_leaf, sigma, noise, teacher, fake, cond)
    official = SID[f"{step}/loss"]
    torch.testing.assert_close(loss.detach(), official, rtol=1e-5, atol=1e-5 * float(official.abs().max()))
    loss.mean().backward()
    scale = meta["loss_scaling_G"]  # SiD backpropagates loss.sum() * loss_scaling_G / batch
    assert_same_direction(SID[f"{step}/grad_images"], scale * x_leaf.grad, "gradient w.r.t. the generated images")

    objective.generator_loss(generator(SID[f"{step}/z"], cond), sigma, noise, teacher, fake, cond).mean().backward()
    assert_same_direction(SID[f"{step}/grad_generator"], scale * flat_grad(generator.denoiser),
                          "gradient w.r.t. the generator's parameters")


@pytest.mark.parametrize("variant", ["uncond", "cond"])
def test_sid_fake_score_loss_matches_sid(variant):
    meta, _, fake, generator, cond = sid_networks(variant)
    step = f"{variant}/fake_step"
    with torch.no_grad():
        x_g = generator(SID[f"{step}/z"], cond)
    torch.testing.assert_close(x_g, SID[f"{step}/images"], rtol=1e-6, atol=1e-6)
    loss = fake_score_loss(fake, x_g, SID[f"{step}/sigma"], SID[f"{step}/noise"], cond, sigma_data=0.5)
    official = SID[f"{step}/loss"]
    torch.testing.assert_close(loss.detach(), official, rtol=1e-5, atol=1e-5 * float(official.abs().max()))
    loss.mean().backward()  # SiD backpropagates loss.sum() * loss_scaling / batch, loss_scaling 1
    assert_same_direction(SID[f"{step}/grad_fake"], meta["loss_scaling"] * flat_grad(fake),
                          "gradient w.r.t. the fake score's parameters")


def dmd2_networks():
    meta = DMD2_META["iteration"]
    teacher, fake, generator = (build_network(meta, DMD2[f"weights/{role}"]) for role in ("teacher", "fake",
                                                                                          "generator"))
    return meta, teacher.requires_grad_(False), fake, OneStepGenerator(generator, meta["conditioning_sigma"])


def test_dmd_generator_loss_matches_dmd2():
    _, teacher, fake, generator = dmd2_networks()
    fake.requires_grad_(False)
    labels, sigma, noise = DMD2["labels"], DMD2["dm/sigma"], DMD2["dm/noise"]
    objective = build_objective(DMDObjectiveConfig())

    x_g = generator(DMD2["z"], labels)
    torch.testing.assert_close(x_g.detach(), DMD2["dm/images"], rtol=1e-6, atol=1e-6)
    elements = x_g[0].numel()  # D = C*H*W: DMD2's losses are means over the batch and D elements
    x_leaf = x_g.detach().requires_grad_(True)
    loss = objective.generator_loss(x_leaf, sigma, noise, teacher, fake, labels)
    torch.testing.assert_close(loss.detach().mean().reshape(1) / elements, DMD2["dm/loss_dm"], rtol=1e-5, atol=0)
    loss.mean().backward()
    assert_same_direction(DMD2["dm/grad_images"], x_leaf.grad / elements, "gradient w.r.t. the generated images")

    objective.generator_loss(generator(DMD2["z"], labels), sigma, noise, teacher, fake, labels).mean().backward()
    assert_same_direction(DMD2["dm/grad_generator"], flat_grad(generator.denoiser) / elements,
                          "gradient w.r.t. the generator's parameters")


def test_dmd_fake_score_loss_matches_dmd2():
    _, _, fake, generator = dmd2_networks()
    labels = DMD2["labels"]
    with torch.no_grad():
        x_g = generator(DMD2["z"], labels)  # DMD2's guidance turn reuses the generator turn's images
    loss = fake_score_loss(fake, x_g, DMD2["fake/sigma"], DMD2["fake/noise"], labels, sigma_data=0.5)
    elements = x_g[0].numel()
    torch.testing.assert_close(loss.detach().mean().reshape(1) / elements, DMD2["fake/loss_fake_mean"], rtol=1e-5,
                               atol=0)
    loss.mean().backward()
    assert_same_direction(DMD2["fake/grad_fake"], flat_grad(fake) / elements,
                          "gradient w.r.t. the fake score's parameters")


# ---------------------------------------------------------------------------------------------------------------------
# EMA and learning-rate warm-up


def test_ema_matches_sid():
    from onestep_cli.engine.ema import EMA, ema_beta

    settings = SID_META["ema"]
    source = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    source.load_state_dict({key[len("ema/initial/"):]: value for key, value in SID.items()
                            if key.startswith("ema/initial/")})
    ema = EMA(source)
    for iteration, nimg in enumerate(settings["nimg_before_update"]):
        torch.nn.utils.vector_to_parameters(SID["ema/generator"][iteration], source.parameters())
        beta = ema_beta(settings["batch_size"], settings["ema_halflife_kimg"], settings["ema_rampup_ratio"],
                        nimg=nimg)
        assert beta == pytest.approx(float(SID["ema/beta"][iteration]), rel=1e-12, abs=0), f"iteration {iteration}"
        ema.update(source, beta)
        average = torch.nn.utils.parameters_to_vector(ema.module.parameters())
        torch.testing.assert_close(average, SID["ema/average"][iteration], rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"iteration {iteration} (nimg {nimg}): {m}")


@pytest.mark.parametrize("processes", DMD2_META["warmup"]["process_counts"])
def test_lr_warmup_matches_dmd2(processes):
    from onestep_cli.engine.lr_schedule import warmup_factor

    warmup_iterations = DMD2_META["recipe_settings"]["warmup_step"] / processes  # accelerate steps P times a call
    ratio = DMD2_META["recipe_settings"]["dfake_gen_update_ratio"]
    for network, every in (("guidance", 1), ("generator", ratio)):
        recorded = DMD2[f"warmup/{network}_p{processes}"]
        iterations = range(0, recorded.numel(), every)
        ours = torch.tensor([warmup_factor(i, warmup_iterations) for i in iterations], dtype=torch.float64)
        torch.testing.assert_close(ours, recorded[::every], rtol=1e-12, atol=1e-15, msg=lambda m: f"{network}: {m}")


def test_imagenet_dmd_preset_is_dmd2s_recorded_recipe():
    # The settings DMD2's own argument parser produced for experiments/imagenet/imagenet_lr2e-6_scratch.sh.
    recipe, processes = DMD2_META["recipe_settings"], int(DMD2_META["recipe_nproc_per_node"])
    config = resolve_config("imagenet64-cond-dmd")
    train = config.train
    assert config.generator.sigma_init == recipe["conditioning_sigma"]
    assert config.generator.dropout == 0 and config.fake.dropout == 0  # main/edm/edm_network.py builds dropout 0.
    assert train.batch_size == recipe["batch_size"] * processes and train.batch_gpu == recipe["batch_size"]
    assert train.generator_learning_rate == recipe["generator_lr"] and train.fake_learning_rate == recipe["guidance_lr"]
    assert train.fake_updates_per_step == recipe["dfake_gen_update_ratio"]
    assert train.update_order == "generator_first"
    assert train.grad_clip == recipe["max_grad_norm"]
    assert train.lr_warmup_iterations == pytest.approx(recipe["warmup_step"] / processes, rel=1e-6)
    assert (train.optimizer, tuple(train.betas), train.weight_decay) == ("adamw", (0.9, 0.999), 0.01)
    assert train.ema_halflife_kimg is None and not recipe["gan_classifier"]
    assert config.fake.sigma_data == recipe["sigma_data"]
