"""The engine's recipe mechanics that the official SiD and DMD2 loops fix: the order of updates, the learning-rate
warm-up, gradient clipping in the reference's units, the EMA's ramp-up, the micro-batch split and SIM's automatic c.
(The losses, noise levels and EMA arithmetic are held against recorded outputs of the official code in
tests/test_reference_sid_dmd2.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import yaml

import onestep_cli.engine.trainer as trainer_module
from onestep_cli.config import ConfigError, SIMObjectiveConfig, resolve_config
from onestep_cli.runs.networks import build_networks
from onestep_cli.engine.parallel import batch_split
from onestep_cli.runs.run_dir import RunDir
from onestep_cli.engine.switches import use_cuda_graph
from onestep_cli.engine.trainer import Trainer
from onestep_cli.runtime.distributed import DistEnv
from onestep_cli.objectives import build_objective, fake_score_loss

CPU = torch.device("cpu")
DIGITS = ["train.batch_size=8", "train.cuda_graph=false", "eval.metrics=[]"]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def digits_trainer(preset: str, *overrides: str) -> Trainer:
    config = resolve_config(preset, overrides=[*DIGITS, *overrides])
    return Trainer(config, build_networks(config), CPU, "fp32")


def record_fake_samples(monkeypatch) -> list[torch.Tensor]:
    """The generated samples each fake-score update trains on, in order."""
    seen = []

    def recording(fake, x_g, *args, **kwargs):
        seen.append(x_g.detach().clone())
        return fake_score_loss(fake, x_g, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "fake_score_loss", recording)
    return seen


def test_generator_first_trains_the_first_fake_update_on_the_generator_updates_own_samples(monkeypatch):
    run = digits_trainer("digits-dmd", "train.fake_updates_per_step=3")
    assert run.config.train.update_order == "generator_first"  # DMD2's order, as the preset ships it.
    seen = record_fake_samples(monkeypatch)
    drawn = []
    run.generator_train.register_forward_hook(  # Only the generator update runs it with gradients.
        lambda module, args, out: drawn.append(out.detach().clone()) if torch.is_grad_enabled() else None)
    before = [p.detach().clone() for p in run.generator.parameters()]
    run.step()
    assert any(not torch.equal(p, q) for p, q in zip(run.generator.parameters(), before))  # The generator moved.
    assert len(drawn) == 1 and len(seen) == 3
    torch.testing.assert_close(seen[0], drawn[0], rtol=0, atol=0)  # Pre-update samples, same latents and labels.
    for later in seen[1:]:  # Fresh latents from the updated generator.
        assert not torch.allclose(later, drawn[0])


def test_fake_first_updates_the_fake_score_before_the_generator(monkeypatch):
    run = digits_trainer("digits-sid")
    assert run.config.train.update_order == "fake_first"
    order = []
    monkeypatch.setattr(run, "_fake_updates", lambda *a, **k: order.append("fake") or (torch.zeros(()),) * 2)
    original = run._generator_update
    monkeypatch.setattr(run, "_generator_update", lambda *a: order.append("generator") or original(*a))
    run.step()
    assert order == ["fake", "generator"]


def test_learning_rate_warms_up_over_fake_updates_as_dmd2_counts_its_iterations():
    # DMD2 (train_edm.py): iteration i makes one fake update, and a generator update every k-th; both schedulers
    # give lr * min(1, i / W) at iteration i, starting from 0.
    k, warmup, lr = 3, 7.5, 1e-4
    run = digits_trainer("digits-dmd", f"train.fake_updates_per_step={k}", f"train.lr_warmup_iterations={warmup}",
                         f"train.lr={lr}")
    used = {"generator": [], "fake": []}
    for name, optimizer in run.optimizers().items():
        step = optimizer.step
        optimizer.step = lambda *a, _step=step, _name=name, _opt=optimizer, **kw: (
            used[_name].append(_opt.param_groups[0]["lr"]), _step(*a, **kw))[1]
    for _ in range(4):
        run.step()
    assert used["generator"] == pytest.approx([lr * min(1, c * k / warmup) for c in range(4)])
    assert used["fake"] == pytest.approx([lr * min(1, i / warmup) for i in range(4 * k)])
    assert not use_cuda_graph("auto", "bf16", DistEnv(), False, torch.device("cuda"), lr_warmup=True)


def test_gradient_clipping_acts_on_the_gradient_of_the_per_element_mean_loss():
    # onestep sums each sample's loss over its D elements; DMD2 averages over them and clips that gradient at 10.
    clip = 1e-3  # Small enough to be active in both units.
    run = digits_trainer("digits-dmd", f"train.grad_clip={clip}")
    elements = math.prod(run.data_shape)
    x_g = torch.randn(8, *run.data_shape)
    sigma, noise = torch.full((8,), 1.3), torch.randn_like(x_g)

    def micro_loss(index, part):
        return fake_score_loss(run.fake, x_g[part], sigma[part], noise[part]).mean()

    reference = [p for p in run.fake.parameters() if p.requires_grad]
    (micro_loss(0, slice(None)) / elements).backward()  # DMD2's reduction: the mean over every element.
    torch.nn.utils.clip_grad_norm_(reference, clip)
    theirs = [p.grad.clone() for p in reference if p.grad is not None]

    run._update(micro_loss, run.fake_train, run.fake, run.opt_fake, run.scaler_fake)  # Gradients before its step.
    ours = [p.grad for p in reference if p.grad is not None]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a / elements, b, rtol=1e-5, atol=1e-12)
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in theirs])) == pytest.approx(clip, rel=1e-4)


def test_the_ema_starts_as_the_generator_and_ramps_its_half_life_up():
    run = digits_trainer("digits-sid", "train.ema_halflife_kimg=500")
    initial = [p.detach().clone() for p in run.ema.module.parameters()]
    run.step()
    for ema, generator in zip(run.ema.module.parameters(), run.generator.parameters()):
        torch.testing.assert_close(ema, generator, rtol=0, atol=0)  # Half-life 0 at 0 images: a copy.
    assert any(not torch.equal(e, s) for e, s in zip(run.ema.module.parameters(), initial))
    previous = [p.detach().clone() for p in run.ema.module.parameters()]
    run.step()  # 8 images seen: half-life 0.4 images, beta = 0.5^(8 / 0.4).
    beta = 0.5 ** (8 / (0.05 * 8))
    for ema, generator, old in zip(run.ema.module.parameters(), run.generator.parameters(), previous):
        torch.testing.assert_close(ema, beta * old + (1 - beta) * generator, rtol=1e-6, atol=1e-7)


def test_without_ramp_up_the_ema_keeps_the_initialisation():
    run = digits_trainer("digits-sid", "train.ema_halflife_kimg=500", "train.ema_rampup_ratio=null")
    initial = [p.detach().clone() for p in run.ema.module.parameters()]
    run.step()
    beta = 0.5 ** (8 / 500_000)
    for ema, generator, start in zip(run.ema.module.parameters(), run.generator.parameters(), initial):
        torch.testing.assert_close(ema, beta * start + (1 - beta) * generator, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("batch, processes, batch_gpu, expected", [
    (8192, 1, 16, (16, 512)), (8192, 8, 16, (16, 64)), (280, 7, 40, (40, 1)), (280, 1, 40, (40, 7)),
    (256, 1, None, (256, 1)), (64, 1, 128, (64, 1)),
])
def test_batch_gpu_derives_the_accumulation_rounds_as_edm(batch, processes, batch_gpu, expected):
    train = resolve_config("digits-sid", overrides=[f"train.batch_size={batch}",
                                                    f"train.batch_gpu={batch_gpu if batch_gpu else 'null'}"]).train
    assert batch_split(train, processes) == expected


def test_batch_gpu_errors_name_the_values():
    train = resolve_config("digits-sid", overrides=["train.batch_size=96", "train.batch_gpu=40"]).train
    with pytest.raises(ConfigError,
                       match=r"train.batch_gpu 40 must divide .* 96 / 1 = 96; use a divisor of 96 such as 32"):
        batch_split(train, 1)
    with pytest.raises(ConfigError, match="set only one"):
        resolve_config("digits-sid", overrides=["train.batch_gpu=16", "train.grad_accumulation=2"])


def test_imagenet_presets_split_into_their_official_per_gpu_batches():
    for name, per_gpu in [("imagenet64-cond-sid", 16), ("imagenet64-cond-sim", 16), ("imagenet64-cond-dmd", 40)]:
        train = resolve_config(name).train
        for gpus in (1, 2, 4, 8) if name != "imagenet64-cond-dmd" else (1, 7):
            micro, rounds = batch_split(train, gpus)
            assert micro == per_gpu and micro * rounds * gpus == train.batch_size, (name, gpus)


def test_sim_auto_c_is_the_square_root_of_the_data_dimension():
    torch.manual_seed(0)
    x_g = torch.randn(4, 1, 8, 8)
    teacher = lambda x, s, c=None: 0.9 * x  # noqa: E731 - two distinct denoisers are enough.
    fake = lambda x, s, c=None: 0.8 * x + 0.01  # noqa: E731
    sigma, noise = torch.tensor([0.5, 1.0, 2.0, 4.0]), torch.randn_like(x_g)
    auto = build_objective(SIMObjectiveConfig(huber_c="auto")).generator_loss(x_g, sigma, noise, teacher, fake)
    eight = build_objective(SIMObjectiveConfig(huber_c=8.0)).generator_loss(x_g, sigma, noise, teacher, fake)
    one = build_objective(SIMObjectiveConfig(huber_c=1.0)).generator_loss(x_g, sigma, noise, teacher, fake)
    torch.testing.assert_close(auto, eight, rtol=0, atol=0)
    assert not torch.allclose(auto, one)
    assert resolve_config("digits32-sim").objective.huber_c == "auto"


def test_a_run_saved_with_the_old_fake_sigma_keys_still_loads(tmp_path):
    config = resolve_config("digits-sid")
    data = config.model_dump(mode="json")
    del data["fake"]["sigma"]
    data["fake"].update(sigma_mean_log=-1.0, sigma_std_log=1.5)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    loaded = RunDir(tmp_path).read_config()
    assert (loaded.fake.sigma.kind, loaded.fake.sigma.mean_log, loaded.fake.sigma.std_log) == ("lognormal", -1.0, 1.5)


def test_a_check_across_a_section_reads_as_its_own_sentence():
    with pytest.raises(ConfigError) as error:
        resolve_config("digits-sid", overrides=["train.batch_gpu=16", "train.grad_accumulation=2"])
    assert str(error.value) == ("Invalid configuration: train.batch_gpu=16 and train.grad_accumulation=2 both set the "
                                "micro-batch; set only one (batch_gpu derives the accumulation rounds).")
