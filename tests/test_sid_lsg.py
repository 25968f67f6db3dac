"""SiD-LSG's long and short guidance: the four guidance scales reach the network calls the official code gives them
(kappa1 the fake score in its own loss, kappa2 = kappa3 the fake score in the generator loss, kappa4 the teacher),
its uniform-timestep noise levels, its fake-score prompt dropout and epsilon-MSE weighting, the shorthand
fake.guidance_scale, and the sd15/sd21-sid-lsg presets on a tiny SD pipeline.

The wiring is checked on the shipped SD-style digits teacher (onestep_cli/assets/digits_t2i_teacher) by recording
every guided call of one real training step.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from onestep_cli.config import ConfigError, resolve_config, validate_config  # noqa: E402
from onestep_cli.denoisers.diffusers import guidance  # noqa: E402
from onestep_cli.denoisers.diffusers.schedule import DDPMSigmaSchedule  # noqa: E402
from onestep_cli.engine.trainer import Trainer  # noqa: E402
from onestep_cli.objectives.fake_score import fake_score_loss  # noqa: E402
from onestep_cli.objectives.sigmas import ddpm_sigmas, sample_sigma  # noqa: E402
from onestep_cli.runs.networks import build_networks  # noqa: E402
from onestep_cli.runs.run_dir import RunDir  # noqa: E402

from test_diffusers_adapters import build_sd  # noqa: E402

CPU = torch.device("cpu")
KAPPAS = ["fake.train_guidance_scale=1.5", "fake.generator_loss_guidance_scale=2.5", "teacher.guidance_scale=3.5"]
SMALL = ["train.batch_size=4", "train.max_steps=1", "train.precision=fp32", "train.device=cpu"]


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # Tiny networks: one thread (conftest.py).


# ---------------------------------------------------------------------------------------------------------------------
# The guidance scales reach their network calls.


class GuidanceRecorder:
    """Records, for every call of a guided network, which network, in which update, with which scale it combined its
    branches (`guide` is where the scale is applied; a scale of 1 skips it and is recorded from the call)."""

    def __init__(self, monkeypatch, networks):
        self.calls, self.update, self.network = [], None, None
        self._guide = guidance.guide
        monkeypatch.setattr(guidance, "guide", self._record_guide)
        for name in ("teacher", "fake"):
            self._wrap(getattr(networks, name), name)

    def _record_guide(self, uncond, cond, scale):
        self.calls[-1]["applied"] = scale
        return self._guide(uncond, cond, scale)

    def _wrap(self, module, name):
        forward = module.forward

        def recorded(x, sigma, cond=None, guidance_scale=None):
            self.calls.append({"network": name, "update": self.update, "cond": cond,
                               "scale": module.guidance_scale if guidance_scale is None else guidance_scale})
            return forward(x, sigma, cond, guidance_scale=guidance_scale)

        module.forward = recorded

    @contextlib.contextmanager
    def during(self, update):
        self.update = update
        yield
        self.update = None

    def scales(self) -> set:
        return {(c["network"], c["update"], c["scale"], c.get("applied", 1.0)) for c in self.calls}


def one_recorded_step(monkeypatch, *overrides):
    config = resolve_config("digits-t2i-sid", overrides=[*SMALL, *overrides])
    networks = build_networks(config)
    recorder = GuidanceRecorder(monkeypatch, networks)
    trainer = Trainer(config, networks, CPU, "fp32")
    for name, update in (("_fake_updates", "fake"), ("_generator_update", "generator")):
        method = getattr(trainer, name)
        monkeypatch.setattr(trainer, name, lambda *a, _m=method, _u=update, **k: _record(recorder, _u, _m, *a, **k))
    stats = trainer.step()
    assert all(torch.isfinite(value) for value in stats.values())
    return recorder, networks


def _record(recorder, update, method, *args, **kwargs):
    with recorder.during(update):
        return method(*args, **kwargs)


def test_each_kappa_reaches_the_call_the_official_code_gives_it(monkeypatch):
    recorder, _ = one_recorded_step(monkeypatch, *KAPPAS)
    # sid_training_loop.py L418-421 (kappa1), L496-499 (kappa2 = kappa3), L503-506 (kappa4); the teacher is never
    # evaluated in the fake update.
    assert recorder.scales() == {("fake", "fake", 1.5, 1.5), ("fake", "generator", 2.5, 2.5),
                                 ("teacher", "generator", 3.5, 3.5)}


def test_the_shorthand_sets_kappa1_to_3_and_a_scale_of_one_skips_guidance(monkeypatch):
    recorder, _ = one_recorded_step(monkeypatch, "fake.guidance_scale=1", "teacher.guidance_scale=2")
    assert recorder.scales() == {("fake", "fake", 1.0, 1.0), ("fake", "generator", 1.0, 1.0),
                                 ("teacher", "generator", 2.0, 2.0)}


def test_prompt_dropout_replaces_prompts_by_the_null_in_the_fake_update_only(monkeypatch):
    recorder, networks = one_recorded_step(monkeypatch, "fake.prompt_dropout=0.5", "train.batch_size=16")
    null = networks.fake.null_condition.embeds[0]

    def dropped(update):
        conds = [c["cond"].embeds for c in recorder.calls if c["network"] == "fake" and c["update"] == update]
        return [bool(torch.equal(row, null)) for cond in conds for row in cond]

    in_fake, in_generator = dropped("fake"), dropped("generator")
    assert len(in_fake) == 16 and 0 < sum(in_fake) < 16  # Half of 16 in expectation; none and all are 2^-16 each.
    assert not any(in_generator)


# ---------------------------------------------------------------------------------------------------------------------
# Config: the names, the shorthand, errors.


def test_shorthand_and_explicit_keys_merge_by_source(tmp_path):
    preset = resolve_config("sd15-sid-lsg")
    assert (preset.fake.train_guidance_scale, preset.fake.generator_loss_guidance_scale) == (2.0, 2.0)
    over = resolve_config("sd15-sid-lsg", overrides=["fake.guidance_scale=4.5"])  # Shorthand over explicit keys.
    assert (over.fake.train_guidance_scale, over.fake.generator_loss_guidance_scale) == (4.5, 4.5)
    one = resolve_config("digits-t2i-sid", overrides=["fake.train_guidance_scale=1"])  # Explicit over shorthand.
    assert (one.fake.train_guidance_scale, one.fake.generator_loss_guidance_scale) == (1.0, 3.0)
    file = tmp_path / "lsg.yaml"
    file.write_text("fake:\n  guidance_scale: 1.5\n")
    assert resolve_config("sd15-sid-lsg", config_file=file).fake.train_guidance_scale == 1.5
    file.write_text("fake:\n  guidance_scale: 1.5\n  generator_loss_guidance_scale: 2\n")
    with pytest.raises(ConfigError, match=r"fake.guidance_scale=1.5 and fake.generator_loss_guidance_scale=2"):
        resolve_config("sd15-sid-lsg", config_file=file)


def test_a_run_saved_with_the_shorthand_resumes_with_the_same_config():
    saved = resolve_config("digits-t2i-sid").model_dump(mode="json")
    explicit = ("train_guidance_scale", "generator_loss_guidance_scale")
    fake = {key: value for key, value in saved["fake"].items() if key not in explicit}
    older = {**saved, "fake": {**fake, "guidance_scale": 3.0}}  # config.yaml as versions with one fake scale wrote it.
    assert validate_config(older) == resolve_config("digits-t2i-sid")


def test_kappas_and_lsg_options_are_refused_without_a_text_to_image_teacher():
    for key in ("fake.train_guidance_scale=2", "fake.generator_loss_guidance_scale=2", "fake.prompt_dropout=0.1"):
        with pytest.raises(ConfigError, match=key.split("=")[0]):
            build_networks(resolve_config("gmm-sid", overrides=[key]))


# ---------------------------------------------------------------------------------------------------------------------
# Noise levels and the fake-score weighting.


def test_uniform_timesteps_are_the_teachers_own_levels_of_each_timestep_in_range():
    config = resolve_config("sd15-sid-lsg").objective.sigma
    scheduler = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    teacher = ((1 - scheduler.alphas_cumprod.double()) / scheduler.alphas_cumprod.double()).sqrt()
    assert torch.equal(ddpm_sigmas(config), teacher)
    sigma = sample_sigma(config, 100_000, torch.Generator().manual_seed(0))
    index = torch.searchsorted(teacher.float(), sigma)
    assert torch.equal(teacher.float()[index], sigma)  # Every draw is exactly one level.
    counts = torch.bincount(index, minlength=1000)
    assert counts[:20].sum() == 0 and counts[980:].sum() == 0 and bool((counts[20:980] > 0).all())  # [20, 980).
    assert counts[20:980].float().std() / counts[20:980].float().mean() < 0.15  # Uniform: ~104 each, sd ~10.
    adapter_schedule = DDPMSigmaSchedule.from_scheduler(build_sd().scheduler)  # The network sees that very timestep.
    assert torch.allclose(adapter_schedule.timestep(sigma[:100]), index[:100].float(), atol=1e-3)


def test_uniform_timesteps_of_another_schedule_are_refused_for_the_teacher():
    config = resolve_config("digits-t2i-sid", overrides=["fake.sigma.kind=uniform_timestep",
                                                         "fake.sigma.beta_schedule=linear"])
    with pytest.raises(ConfigError, match="fake.sigma.kind=uniform_timestep .* teacher's schedule differs"):
        build_networks(config, prompts=False)


def test_null_sigma_data_makes_the_fake_loss_the_epsilon_mse():
    x_g, noise, eps_hat = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    sigma = torch.tensor([0.03, 1.0, 14.6])
    predicts_eps_hat = lambda x, s, c: x - s.reshape(-1, 1, 1, 1) * eps_hat  # noqa: E731 An epsilon network.
    loss = fake_score_loss(predicts_eps_hat, x_g, sigma, noise, sigma_data=None)
    assert torch.allclose(loss, (eps_hat - noise).pow(2).flatten(1).sum(1), rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# End to end: the presets on a tiny SD pipeline, and the CLI on the digits teacher.


@pytest.mark.parametrize("preset", ["sd15-sid-lsg", "sd21-sid-lsg"])
def test_lsg_preset_trains_on_a_tiny_sd_pipeline(preset, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "lsg-tiny-sd"
    if not (root / "model_index.json").is_file():
        build_sd().save_pretrained(root)
        (root / "prompts.txt").write_text("a red bicycle\ntwo cats on a sofa\n")
    config = resolve_config(preset, overrides=[f"teacher.path={root}", f"prompts.path={root / 'prompts.txt'}",
                                               "teacher.image_size=null", "train.batch_size=2", "train.batch_gpu=null",
                                               "train.device=cpu"])
    trainer = Trainer(config, build_networks(config), CPU, "fp32")
    for _ in range(2):
        assert all(torch.isfinite(value) for value in trainer.step().values())


@pytest.mark.e2e
def test_distill_cli_with_separate_kappas_on_the_digits_teacher(cli, tmp_path):
    run = tmp_path / "run"
    kappas = [arg for key in KAPPAS for arg in ("--set", key)]
    result = cli.invoke("distill", "--preset", "digits-t2i-sid", "--out", run, *kappas,
                        "--set", "objective.sigma.kind=uniform_timestep", "--set", "fake.sigma.kind=uniform_timestep",
                        "--set", "fake.prompt_dropout=0.1", "--set", "fake.sigma_data=null",
                        "--set", "train.max_steps=2", "--set", "train.batch_size=2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["step"] == 2
    saved = RunDir(run).read_config()
    assert (saved.fake.train_guidance_scale, saved.fake.generator_loss_guidance_scale,
            saved.teacher.guidance_scale) == (1.5, 2.5, 3.5)
    assert saved.objective.sigma.kind == "uniform_timestep" and saved.fake.sigma_data is None
