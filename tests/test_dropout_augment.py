"""generator.dropout, fake.dropout and fake.augment_p: the copies of an EDM teacher get the configured dropout, the
teacher stays deterministic, each trained network drops out only in its own update (SiD), and EDM's geometric
augmentation (its CIFAR-10 ops and 9-label layout) reaches only the fake score's training."""

from __future__ import annotations

import math

import pytest
import torch

from onestep_cli.config import ConfigError, resolve_config
from onestep_cli.denoisers.edm import EDMPrecond
from onestep_cli.denoisers.edm.augment import (AUGMENT_DIM, SYM6, TRANSLATE_STD, Augmentation, augment,
                                               draw_augmentation, identity_augmentation)
from onestep_cli.denoisers.edm.layers import UNetBlock
from onestep_cli.runs.networks import build_networks
from onestep_cli.engine.trainer import Trainer, training_mode
from onestep_cli.objectives import fake_score_loss

TINY = ["train.batch_size=4", "train.device=cpu", "train.precision=fp32", "train.ema_halflife_kimg=null"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_teacher(augment_dim: int = AUGMENT_DIM, dropout: float = 0.1) -> EDMPrecond:
    """A small unconditional DDPM++ under EDM preconditioning (8x8 RGB), frozen as build_teacher leaves one.

    EDM initialises the convolution after each dropout near zero; random weights of unit gain make dropout visible.
    """
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=3, model_type="SongUNet", model_channels=16, channel_mult=[1, 2],
                     num_blocks=1, attn_resolutions=[4], dropout=dropout, augment_dim=augment_dim)
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if parameter.ndim >= 2:
                parameter.copy_(torch.randn_like(parameter) / math.sqrt(parameter[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
            else:
                parameter.copy_(0.1 * torch.randn_like(parameter))
    return net.requires_grad_(False).eval()


def networks_for(*overrides, teacher=None):
    config = resolve_config("digits-sim", overrides=[*TINY, *overrides])
    return config, build_networks(config, teacher=teacher if teacher is not None else tiny_teacher())


def dropouts(network: torch.nn.Module) -> set[float]:
    return {block.dropout for block in network.modules() if isinstance(block, UNetBlock)}


def smooth_images(batch: int = 2, size: int = 16) -> torch.Tensor:
    """Band-limited test images (resampling blurs noise, not these)."""
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    image = torch.stack([torch.sin(x / 3) + torch.cos(y / 4), torch.sin((x + y) / 5), 0.1 * (x - y)])
    return image.expand(batch, -1, -1, -1).clone()


# -- dropout -------------------------------------------------------------------------------------------------------


def test_configured_dropout_reaches_every_block_of_each_copy_and_not_the_teacher():
    _, networks = networks_for("generator.dropout=0.3", "fake.dropout=0.2")
    assert dropouts(networks.generator.denoiser) == {0.3}
    assert dropouts(networks.fake) == {0.2}
    assert dropouts(networks.teacher) == {0.1}
    assert networks.fake.init_kwargs["dropout"] == 0.2 and networks.teacher.init_kwargs["dropout"] == 0.1
    assert len([m for m in networks.fake.modules() if isinstance(m, UNetBlock)]) > 4  # Every block, not just one.


def test_null_dropout_keeps_the_teachers_own_value():
    _, networks = networks_for(teacher=tiny_teacher(dropout=0.13))
    assert dropouts(networks.generator.denoiser) == dropouts(networks.fake) == {0.13}


def test_teacher_stays_in_eval_mode_and_deterministic_while_the_copies_train():
    config, networks = networks_for("generator.dropout=0.5", "fake.dropout=0.5")
    assert not any(m.training for m in networks.teacher.modules())
    assert all(m.training for m in networks.fake.modules())
    assert all(m.training for m in networks.generator.modules())
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 2.0])
    trainer = Trainer(config, networks, torch.device("cpu"), "fp32")
    trainer.step()
    assert not any(m.training for m in trainer.teacher.modules())
    assert torch.equal(trainer.teacher(x, sigma), trainer.teacher(x, sigma))
    assert all(m.training for m in trainer.fake.modules()) and all(m.training for m in trainer.generator.modules())


def test_fake_dropout_makes_training_forwards_random_and_eval_forwards_equal():
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 2.0])
    _, networks = networks_for("fake.dropout=0.5")
    fake = networks.fake
    with torch.no_grad():
        assert not torch.allclose(fake(x, sigma), fake(x, sigma))
        with training_mode(fake, False):
            assert torch.equal(fake(x, sigma), fake(x, sigma))
    assert fake.training  # training_mode puts it back.
    _, networks = networks_for("fake.dropout=0.0")  # The value, not the mode alone, decides.
    with torch.no_grad():
        assert torch.equal(networks.fake(x, sigma), networks.fake(x, sigma))


def test_each_network_drops_out_only_in_its_own_update_as_in_sid():
    config, networks = networks_for("generator.dropout=0.2", "fake.dropout=0.2")
    trainer = Trainer(config, networks, torch.device("cpu"), "fp32")
    seen = {"generator": [], "fake": []}
    trainer.generator.register_forward_pre_hook(lambda m, a: seen["generator"].append(
        (torch.is_grad_enabled(), m.denoiser.training)))
    trainer.fake.register_forward_pre_hook(lambda m, a: seen["fake"].append(
        (any(p.requires_grad for p in m.parameters()), m.training)))
    trainer.step()
    # Generator: eval when it makes the fake score's samples (no grad), training in its own update (grad).
    assert set(seen["generator"]) == {(False, False), (True, True)}
    # Fake score: training in its own update (trainable), eval inside the generator loss (frozen).
    assert set(seen["fake"]) == {(True, True), (False, False)}


def test_dropout_is_refused_where_there_is_no_edm_block_to_set():
    with pytest.raises(ConfigError, match=r"generator\.dropout=0\.2 applies to copies of EDM teachers.*MLPDenoiser"):
        build_networks(resolve_config("gmm-sid", overrides=["generator.dropout=0.2"]))
    config = resolve_config("sd15-sid", overrides=["fake.dropout=0.1", "teacher.path=/no/such/pipeline"])
    with pytest.raises(ConfigError, match=r"fake\.dropout=0\.1: this applies only to EDM teachers"):
        build_networks(config)  # Refused before the (missing) pipeline is loaded.
    config = resolve_config("sd15-sid", overrides=["fake.augment_p=0.12", "teacher.path=/no/such/pipeline"])
    with pytest.raises(ConfigError, match=r"fake\.augment_p=0\.12: this applies only to EDM teachers.*Remove it \("):
        build_networks(config)
    config = resolve_config("sd15-sid", overrides=["generator.dropout=0", "fake.augment_p=1", "teacher.path=/none"])
    with pytest.raises(ConfigError, match=r"generator\.dropout=0\.0, fake\.augment_p=1\.0: these apply .*Remove them"):
        build_networks(config)


@pytest.mark.parametrize("assignment, needle", [
    ("fake.dropout=1.5", "Key 'fake.dropout' has value 1.5"),
    ("generator.dropout=-0.1", "Key 'generator.dropout' has value -0.1"),
    ("fake.augment_p=2", "Key 'fake.augment_p' has value 2"),
])
def test_out_of_range_values_are_config_errors_naming_the_key(assignment, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve_config("digits-sim", overrides=[assignment])


def test_cli_dry_run_rejects_dropout_of_one_and_a_half(cli):
    result = cli.invoke("distill", "--set", "fake.dropout=1.5", "--dry-run")
    assert result.exit_code == 2
    assert "fake.dropout" in result.stderr and "1.5" in result.stderr
    ok = cli.invoke("distill", "--set", "fake.dropout=0.13", "--set", "fake.augment_p=0.12", "--dry-run")
    assert ok.exit_code == 0 and "dropout: 0.13" in ok.stdout and "augment_p: 0.12" in ok.stdout


# -- augmentation --------------------------------------------------------------------------------------------------


def test_symlet_filter_is_orthonormal_so_the_identity_resampling_is_exact():
    h = torch.tensor(SYM6, dtype=torch.float64)
    assert h.sum().item() == pytest.approx(math.sqrt(2), abs=1e-12)
    for shift in range(len(SYM6) // 2):
        assert (h[: len(h) - 2 * shift] * h[2 * shift:]).sum().item() == pytest.approx(float(shift == 0), abs=1e-11)


def test_labels_follow_edms_layout():
    aug = identity_augmentation(3)
    aug.xflip = torch.tensor([1.0, 0.0, 0.0])
    aug.yflip = torch.tensor([0.0, 1.0, 0.0])
    aug.scale = torch.tensor([0.5, 0.0, 0.0])
    aug.rotate = torch.tensor([0.0, math.pi / 2, 0.0])
    aug.aniso = torch.tensor([0.0, 0.0, 2.0])
    aug.aniso_angle = torch.tensor([0.0, 0.0, math.pi / 6])
    aug.translate = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.25, -1.0]])
    expected = torch.tensor([
        [1, 0, 0.5, 0, 0, 0, 0, 0, 0],                                       # x-flip; scale w
        [0, 1, 0, -1, 1, 0, 0, 0, 0],                                        # y-flip; rotation: cos - 1, sin
        [0, 0, 0, 0, 0, 2 * math.cos(math.pi / 6), 2 * math.sin(math.pi / 6), 0.25, -1],  # stretch; translation
    ])
    assert aug.labels().shape == (3, AUGMENT_DIM)
    torch.testing.assert_close(aug.labels(), expected, atol=1e-6, rtol=0)


def test_drawn_labels_apply_each_op_with_its_chance():
    generator = torch.Generator().manual_seed(0)
    labels = draw_augmentation(4000, 0.5, generator, "cpu").labels()
    assert set(labels[:, 0].tolist()) == {0.0, 1.0} and labels[:, 0].mean().item() == pytest.approx(0.5, abs=0.03)
    assert labels[:, 1].mean().item() == pytest.approx(0.25, abs=0.03)  # p * a fair coin
    for column in (2, 3, 5, 7):  # scale, rotation, stretch, translation: applied with chance p
        assert (labels[:, column] != 0).float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert torch.allclose((labels[:, 3] + 1) ** 2 + labels[:, 4] ** 2, torch.ones(4000), atol=1e-5)
    assert ((labels[:, 7] != 0) == (labels[:, 8] != 0)).all()  # Both translation axes move together.
    none = draw_augmentation(64, 0.0, generator, "cpu")
    assert torch.equal(none.labels(), torch.zeros(64, AUGMENT_DIM))


def test_identity_augmentation_leaves_images_and_gives_zero_labels():
    images = torch.randn(3, 3, 8, 8)
    aug = draw_augmentation(3, 0.0, torch.Generator().manual_seed(1), "cpu")
    torch.testing.assert_close(augment(images, aug), images, atol=1e-5, rtol=0)
    assert torch.equal(aug.labels(), torch.zeros(3, AUGMENT_DIM))


def test_xflip_and_yflip_equal_torch_flip():
    images = torch.randn(2, 3, 8, 8)
    aug = identity_augmentation(2)
    aug.xflip = torch.tensor([1.0, 0.0])
    aug.yflip = torch.tensor([0.0, 1.0])
    out = augment(images, aug)
    torch.testing.assert_close(out[0], images[0].flip(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], images[1].flip(1), atol=1e-5, rtol=0)


EDM_PIVOT = -0.049  # Pixels from the image centre, on each axis, of the point EDM rotates and scales about.


def test_geometric_ops_move_the_image_as_documented():
    images = smooth_images(size=32)
    interior = (slice(None), slice(6, -6), slice(6, -6))
    aug = identity_augmentation(2)  # A quarter turn each way: content below the centre moves right (k=1)...
    aug.rotate = torch.tensor([math.pi / 2, -math.pi / 2])
    out = augment(images, aug)  # ...about EDM_PIVOT, 0.07 pixels from rot90's result: up to 0.031 on these images.
    torch.testing.assert_close(out[0][interior], images[0].rot90(1, (1, 2))[interior], atol=0.04, rtol=0)
    torch.testing.assert_close(out[1][interior], images[1].rot90(-1, (1, 2))[interior], atol=0.04, rtol=0)
    aug = identity_augmentation(2)  # Whole-pixel translations: 4 right and 2 down, 3 up.
    aug.translate = torch.tensor([[4.0, 2.0], [0.0, -3.0]]) / (32 * TRANSLATE_STD)
    out = augment(images, aug)
    torch.testing.assert_close(out[0, :, 2:, 4:], images[0, :, :-2, :-4], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, :, :-3], images[1, :, 3:], atol=1e-5, rtol=0)
    ramp = (torch.arange(32.0) - 15.5).expand(1, 1, 32, 32)  # x measured from the centre
    middle = (0, 0, slice(8, -8), slice(8, -8))
    aug = identity_augmentation(1)
    aug.scale = torch.tensor([5.0])  # 2^(0.2 * 5) = 2: twice the size about EDM_PIVOT, so the ramp is half as steep.
    torch.testing.assert_close(augment(ramp, aug)[middle], (ramp[middle] + EDM_PIVOT) / 2, atol=2e-3, rtol=0)
    aug = identity_augmentation(1)
    aug.aniso = torch.tensor([5.0])  # Stretched 2x along x, squeezed 2x along y.
    torch.testing.assert_close(augment(ramp, aug)[middle], (ramp[middle] + EDM_PIVOT) / 2, atol=2e-3, rtol=0)
    tilted = ramp.transpose(2, 3)  # y measured from the centre
    middle = (0, 0, slice(12, -12), slice(12, -12))
    torch.testing.assert_close(augment(tilted, aug)[middle], 2 * tilted[middle] - EDM_PIVOT, atol=2e-3, rtol=0)


def test_rotations_pivot_where_edms_do():
    """A half turn maps the image centre to twice EDM_PIVOT (module docstring), on both axes."""
    ramp = (torch.arange(32.0) - 15.5).expand(1, 1, 32, 32)
    middle = (0, 0, slice(8, -8), slice(8, -8))
    aug = identity_augmentation(1)
    aug.rotate = torch.tensor([math.pi])
    for image in (ramp, ramp.transpose(2, 3)):
        torch.testing.assert_close(augment(image, aug)[middle], 2 * EDM_PIVOT - image[middle], atol=2e-3, rtol=0)


def test_augmented_batches_do_not_depend_on_how_they_are_split():
    images = torch.randn(6, 3, 8, 8)
    aug = draw_augmentation(6, 1.0, torch.Generator().manual_seed(3), "cpu")
    whole = augment(images, aug)
    parts = torch.cat([augment(images[:2], aug[:2]), augment(images[2:], aug[2:])])
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=0)
    assert isinstance(aug[2:], Augmentation) and len(aug[2:]) == 4


def test_fake_score_loss_runs_on_augmented_samples_with_their_labels():
    fake = tiny_teacher()
    x_g, noise, sigma = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0.1, 0.5, 2.0, 10.0])
    aug = draw_augmentation(4, 1.0, torch.Generator().manual_seed(0), "cpu")
    augmented = augment(x_g, aug)
    loss = fake_score_loss(fake, augmented, sigma, noise, augment_labels=aug.labels())
    plain = fake_score_loss(fake, augmented, sigma, noise)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    assert not torch.allclose(loss, plain)  # The labels reached the network.


def test_training_with_augment_p_one_feeds_labels_only_to_the_fake_scores_own_update():
    config, networks = networks_for("fake.augment_p=1.0", "fake.dropout=0.0", "generator.dropout=0.0")
    trainer = Trainer(config, networks, torch.device("cpu"), "fp32")
    calls = []
    trainer.fake.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((m.training, kwargs.get("augment_labels"))), with_kwargs=True)
    before = trainer.fake.model.map_augment.weight.clone()
    generator_augment = trainer.generator.denoiser.model.map_augment.weight.clone()
    stats = trainer.step()
    assert all(torch.isfinite(value) for value in stats.values())
    own = [labels for training, labels in calls if training]
    in_generator_loss = [labels for training, labels in calls if not training]
    assert own and all(labels is not None and labels.shape == (4, AUGMENT_DIM) for labels in own)
    assert (own[0][:, 2] != 0).all()  # p = 1: every image scaled, rotated, stretched and moved.
    assert in_generator_loss and all(labels is None for labels in in_generator_loss)
    assert not torch.equal(trainer.fake.model.map_augment.weight, before)  # The fake's augment input trains...
    assert torch.equal(trainer.generator.denoiser.model.map_augment.weight, generator_augment)  # ...G's does not.


def test_augmentation_is_refused_for_a_fake_score_without_augment_inputs():
    with pytest.raises(ConfigError, match=r"fake\.augment_p=0\.5 needs .*\(augment_dim=9.*EDMPrecond has "
                                          r"augment_dim=0"):
        networks_for("fake.augment_p=0.5", teacher=tiny_teacher(augment_dim=0))
    with pytest.raises(ConfigError, match=r"fake\.augment_p=0\.5 .*MLPDenoiser has augment_dim=0"):
        build_networks(resolve_config("gmm-sid", overrides=["fake.augment_p=0.5"]))
    _, networks = networks_for("fake.augment_p=0", teacher=tiny_teacher(augment_dim=0))  # 0 is always fine.
    assert networks.fake.augment_dim == 0
