"""DMD2's GAN term: its losses against their closed form, the head on the bottleneck of EDM and diffusers U-Nets, where
its gradients go, the real images it reads, and a run that uses it, resumed and from the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from onestep_cli.config import ConfigError, resolve_config
from onestep_cli.denoisers.bottleneck import NoBottleneckError, bottleneck_features, find_bottleneck
from onestep_cli.denoisers.edm import build_precond
from onestep_cli.denoisers.mlp import MLPDenoiser
from onestep_cli.engine.real_images import load_gan_data, load_real_images
from onestep_cli.engine.trainer import Trainer
from onestep_cli.errors import InputError, MissingFileError
from onestep_cli.objectives.gan import (GANTerm, attach_discriminator_head, discriminator_head, discriminator_loss,
                                        generator_gan_loss, head_groups)
from onestep_cli.runs.checkpoint import find_resume_checkpoint
from onestep_cli.runs.networks import build_networks
from onestep_cli.runs.run_dir import RunDir

CPU = torch.device("cpu")
DIGITS = "@assets/digits_real/digits8.npz"
TINY = ["train.batch_size=4", "train.fake_updates_per_step=1", "train.cuda_graph=false", "eval.metrics=[]",
        f"gan.data={DIGITS}"]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def gan_trainer(*overrides: str) -> Trainer:
    config = resolve_config("digits-dmd", overrides=[*TINY, *overrides])
    return Trainer(config, build_networks(config), CPU, "fp32")


def tiny_edm(model_type: str, resolution: int = 16):
    kwargs = dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
    return build_precond("EDMPrecond", dict(img_resolution=resolution, img_channels=1, label_dim=0,
                                            model_type=model_type, **kwargs))


# ---------------------------------------------------------------------------------------------------------------------
# Losses


def test_losses_are_the_non_saturating_softplus_pair():
    logits_real, logits_fake = torch.tensor([0.0, 2.0, -3.0]), torch.tensor([-1.0, 0.5, 4.0])
    softplus = lambda v: math.log(1 + math.exp(v))
    expected_d = [softplus(f) + softplus(-r) for r, f in zip(logits_real.tolist(), logits_fake.tolist())]
    expected_g = [softplus(-f) for f in logits_fake.tolist()]
    torch.testing.assert_close(discriminator_loss(logits_real, logits_fake), torch.tensor(expected_d))
    torch.testing.assert_close(generator_gan_loss(logits_fake), torch.tensor(expected_g))
    # At logit 0 the classifier is undecided: log 2 per image it sees.
    assert discriminator_loss(torch.zeros(1), torch.zeros(1)).item() == pytest.approx(2 * math.log(2))


def test_the_weighted_losses_carry_dmd2s_weights_times_the_element_count():
    fake = tiny_edm("SongUNet", 8)
    attach_discriminator_head(fake, (1, 8, 8), seed=0)
    config = resolve_config("digits-dmd", overrides=[f"gan.data={DIGITS}", "gan.gen_cls_loss_weight=0.25",
                                                     "gan.guidance_cls_loss_weight=0.5"]).gan
    term = GANTerm(config, fake, (1, 8, 8))
    x, real = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    sigma, noise = torch.full((3,), 0.7), torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        logits = term.logits(fake, x, sigma, noise)
        logits_real = term.logits(fake, real, sigma, noise)
        weighted, mean = term.generator_loss(fake, x, sigma, noise)
        weighted_d, stats = term.discriminator_loss(fake, real, None, sigma, noise, x, None, sigma, noise)
    # DMD2 adds 0.25 * mean(softplus) to losses averaged over the 64 elements; onestep's are sums over them.
    torch.testing.assert_close(weighted, 0.25 * 64 * torch.nn.functional.softplus(-logits))
    torch.testing.assert_close(mean, torch.nn.functional.softplus(-logits).mean())
    torch.testing.assert_close(weighted_d, 0.5 * 64 * discriminator_loss(logits_real, logits))
    torch.testing.assert_close(stats["realism_real"], torch.sigmoid(logits_real).mean())


# ---------------------------------------------------------------------------------------------------------------------
# The head on the bottleneck


def test_head_is_dmd2s_cls_pred_branch_for_imagenet_and_sdxl():
    # DMD2: 768 channels at 8x8 (edm_guidance.py L47-56), 1280 at 32x32 for SDXL (sd_guidance.py L107-122).
    with torch.device("meta"):
        imagenet, sdxl = discriminator_head(768, (8, 8)), discriminator_head(1280, (32, 32))
    convs = lambda head: [(m.kernel_size, m.stride, m.padding, m.out_channels) for m in head
                          if isinstance(m, torch.nn.Conv2d)]
    halve, last, logit = ((4, 4), (2, 2), (1, 1)), ((4, 4), (4, 4), (0, 0)), ((1, 1), (1, 1), (0, 0), 1)
    assert convs(imagenet) == [(*halve, 768), (*last, 768), logit]
    assert convs(sdxl) == [(*halve, 1280)] * 3 + [(*last, 1280), logit]
    assert all(m.num_groups == 32 for m in imagenet if isinstance(m, torch.nn.GroupNorm))


def test_a_narrow_heads_groups_keep_sixteen_channels_each():
    """DMD2's GroupNorm(32) on the 64-channel bottleneck of the digits teachers normalises pairs of channels at the
    1x1 map, which leaves the logit little but their signs; narrow heads keep 16 channels a group instead."""
    assert [head_groups(c) for c in (768, 1280, 512, 256, 128, 64, 48, 24, 8)] == [32, 32, 32, 16, 8, 4, 3, 1, 1]
    with torch.device("meta"):
        digits32 = discriminator_head(64, (4, 4))
    assert [m.num_groups for m in digits32 if isinstance(m, torch.nn.GroupNorm)] == [4]


@pytest.mark.parametrize("model_type", ["SongUNet", "DhariwalUNet"])
def test_edm_bottleneck_is_the_last_encoder_blocks_output(model_type):
    fake = tiny_edm(model_type)
    bottleneck = find_bottleneck(fake)
    assert bottleneck.module is list(fake.model.enc.values())[-1]
    x = torch.randn(2, 1, 16, 16, requires_grad=True)
    features = bottleneck_features(fake, bottleneck, x, torch.full((2,), 1.0))
    assert features.shape == (2, bottleneck.channels, *bottleneck.size(16, 16)) == (2, 64, 8, 8)
    head = attach_discriminator_head(fake, (1, 16, 16), seed=0)
    logits = head(features).reshape(2)
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # The generator's gradient path runs through the encoder.
    assert all(p.grad is None for p in fake.model.dec.parameters())  # The decoder takes no part.


def test_diffusers_unet_bottleneck_is_its_mid_block_output():
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, norm_num_groups=32, cross_attention_dim=32)

    class Adapter(torch.nn.Module):  # Stands for DiffusersDenoiser: the U-Net inside a sigma-unit wrapper.
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, x, sigma, cond):
            return self.unet(x, sigma * 10, encoder_hidden_states=cond).sample

    adapter = Adapter()
    bottleneck = find_bottleneck(adapter)
    assert bottleneck.module is unet.mid_block and bottleneck.channels == 64 and bottleneck.size(8, 8) == (4, 4)
    features = bottleneck_features(adapter, bottleneck, torch.randn(2, 4, 8, 8), torch.ones(2), torch.randn(2, 3, 32))
    assert features.shape == (2, 64, 4, 4)
    assert attach_discriminator_head(adapter, (4, 8, 8), seed=0)(features).shape == (2, 1, 1, 1)


def test_a_network_without_a_bottleneck_is_refused():
    with pytest.raises(NoBottleneckError, match="U-Net bottleneck"):
        find_bottleneck(MLPDenoiser(2, 16, 1, 8, 0.5))


# ---------------------------------------------------------------------------------------------------------------------
# Where the gradients go


def test_discriminator_loss_trains_the_head_and_fake_score_but_never_the_generator():
    run = gan_trainer()
    generator = [p.detach().clone() for p in run.generator.parameters()]
    head = [p.detach().clone() for p in run.fake.gan_head.parameters()]
    _, real_batches = run._gan_inputs(run._gan_host_inputs())
    stats: dict = {}
    run._fake_updates([torch.full((4,), 1.0)], [], real_batches=real_batches, gan_stats=stats)
    assert all(torch.equal(p, q) for p, q in zip(run.generator.parameters(), generator))
    assert all(p.grad is None for p in run.generator.parameters())
    assert all(not torch.equal(p, q) for p, q in zip(run.fake.gan_head.parameters(), head))
    assert {"loss_gan_discriminator", "realism_real", "realism_fake"} <= set(stats)


def test_generator_gan_loss_moves_the_generator_but_not_the_head():
    def generator_step(weight):
        run = gan_trainer(f"gan.gen_cls_loss_weight={weight}")
        head = [p.detach().clone() for p in run.fake.gan_head.parameters()]
        gan_sigma, _ = run._gan_inputs(run._gan_host_inputs())
        stats: dict = {}
        run._generator_update(torch.full((4,), 1.0), gan_sigma=gan_sigma, gan_stats=stats)
        assert all(torch.equal(p, q) for p, q in zip(run.fake.gan_head.parameters(), head))
        assert all(p.grad is None for p in run.fake.gan_head.parameters())
        assert all(p.requires_grad for p in run.fake.gan_head.parameters())  # Unfrozen again for its own update.
        return [p.detach().clone() for p in run.generator.parameters()], stats

    without, _ = generator_step(0.0)
    with_gan, stats = generator_step(1.0)
    assert "loss_gan_generator" in stats
    assert any(not torch.equal(p, q) for p, q in zip(with_gan, without))  # The GAN loss changed the update.


# ---------------------------------------------------------------------------------------------------------------------
# Real images


def write_grey_pngs(folder, count=3, size=8):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(count)]
    for index, array in enumerate(arrays):
        Image.fromarray(array).save(folder / f"{index}.png")
    return np.stack(arrays)


def test_real_images_load_from_a_folder_and_from_an_npz(tmp_path):
    arrays = write_grey_pngs(tmp_path / "pngs")
    from_folder = load_real_images(tmp_path / "pngs", "pngs", (1, 8, 8), label_dim=0)
    assert torch.equal(from_folder.images[:, 0], torch.from_numpy(arrays)) and from_folder.labels is None
    np.savez(tmp_path / "real.npz", samples=arrays[..., None], labels=np.array([3, 1, 4]))
    from_npz = load_real_images(tmp_path / "real.npz", "real.npz", (1, 8, 8), label_dim=10)
    assert torch.equal(from_npz.images, from_folder.images) and from_npz.labels.tolist() == [3, 1, 4]
    images, labels = from_npz.draw(5, torch.Generator().manual_seed(0))
    assert images.shape == (5, 1, 8, 8) and labels.shape == (5, 10) and -1 <= images.min() <= images.max() <= 1


def test_the_shipped_digits_are_sklearns_digits():
    from onestep_cli.digits.data import load_digits_images

    config = resolve_config("digits-dmd", overrides=[f"gan.data={DIGITS}"])
    real = load_gan_data(config, (1, 8, 8), 10)
    images, labels = load_digits_images(8)
    assert torch.equal(real.labels, labels)
    assert (real.images.float() / 127.5 - 1 - images).abs().max() <= 0.5 / 127.5 + 1e-6  # uint8 rounding only.
    preset = resolve_config("digits32-dmd2-gan")  # The GAN preset's own real images, at its teacher's 32x32.
    real32 = load_gan_data(preset, (1, 32, 32), 10)
    assert real32.images.shape == (1797, 1, 32, 32) and torch.equal(real32.labels, labels)


def test_bad_real_images_are_errors_that_name_gan_data(tmp_path):
    with pytest.raises(MissingFileError, match=r"gan.data nowhere.npz does not exist.*digits8.npz"):
        load_real_images(tmp_path / "nowhere.npz", "nowhere.npz", (1, 8, 8), 0)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="gan.data notes.txt is neither a folder of images nor an .npz"):
        load_real_images(tmp_path / "notes.txt", "notes.txt", (1, 8, 8), 0)
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="gan.data broken.npz cannot be used as real images"):
        load_real_images(tmp_path / "broken.npz", "broken.npz", (1, 8, 8), 0)
    write_grey_pngs(tmp_path / "pngs")
    with pytest.raises(InputError, match="8x8 images but the teacher makes 16x16"):
        load_real_images(tmp_path / "pngs", "pngs", (1, 16, 16), 0)
    with pytest.raises(InputError, match="no class labels, and the teacher is class-conditional"):
        load_real_images(tmp_path / "pngs", "pngs", (1, 8, 8), 10)
    np.savez(tmp_path / "colour.npz", samples=np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(InputError, match="colour images but the teacher makes grey ones"):
        load_real_images(tmp_path / "colour.npz", "colour.npz", (1, 8, 8), 0)


def test_gan_is_refused_where_it_cannot_run():
    t2i = resolve_config("digits-t2i-dmd", overrides=[f"gan.data={DIGITS}"])
    with pytest.raises(ConfigError, match="text-to-image teacher"):
        load_gan_data(t2i, (4, 8, 8), 0)
    config = resolve_config("digits-dmd", overrides=TINY)
    with pytest.raises(ConfigError, match="set train.parallelism=ddp"):
        Trainer(config, build_networks(config), CPU, "fp32", parallelism="fsdp")


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and the command line


def test_resume_restores_the_head_and_the_real_image_stream(tmp_path):
    first = gan_trainer()
    run = RunDir(tmp_path / "run")
    run.prepare(first.config)
    first.step()
    first.save(run)
    state, folder = find_resume_checkpoint(run.checkpoints)
    assert any(key.startswith("gan_head.") for key in load_file(str(folder / "fake.safetensors")))
    resumed = gan_trainer()
    resumed.load(state, folder)
    for a, b in zip(first.fake.gan_head.state_dict().values(), resumed.fake.gan_head.state_dict().values()):
        assert torch.equal(a, b)
    expected, got = first.step(), resumed.step()  # The same real images, noise and updates from here on.
    for key in ("loss_gan_discriminator", "loss_gan_generator", "loss_fake", "loss_generator"):
        assert torch.equal(expected[key], got[key]), key
    for a, b in zip(first.fake.gan_head.parameters(), resumed.fake.gan_head.parameters()):
        assert torch.equal(a, b)


def test_cli_distills_digits_with_the_gan_term(cli, tmp_path):
    out = tmp_path / "run"
    result = cli.invoke("distill", "--preset", "digits-dmd", "--set", "gan.gen_cls_loss_weight=3e-3", "--set",
                        f"gan.data={DIGITS}", "--set", "train.max_steps=2", "--set", "train.batch_size=4", "--set",
                        "train.tick_every=1", "--set", "train.fake_updates_per_step=2", "--out", str(out))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert all(math.isfinite(record[key]) for key in ("loss_gan_generator", "loss_gan_discriminator",
                                                          "realism_real", "realism_fake"))
    weights = load_file(str(out / "checkpoints" / "step-00000002" / "fake.safetensors"))
    assert any(key.startswith("gan_head.") for key in weights)


def test_cli_names_a_missing_gan_data_and_leaves_no_run_behind(cli, tmp_path):
    out = tmp_path / "run"
    result = cli.invoke("distill", "--preset", "digits-dmd", "--set", f"gan.data={tmp_path / 'missing.npz'}",
                        "--out", str(out))
    assert result.exit_code != 0 and "gan.data" in result.stderr and "does not exist" in result.stderr
    assert not out.exists()


def test_under_train_compile_the_hooked_bottleneck_block_stays_eager(monkeypatch):
    import torch._dynamo

    import onestep_cli.runtime.precision as precision

    for name in ("suppress_errors", "recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):  # compile_blocks raises them: restored after the test.
            monkeypatch.setattr(torch._dynamo.config, name, getattr(torch._dynamo.config, name))
    compiled = []
    monkeypatch.setattr(precision, "compile_failure", lambda device: None)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, **kwargs: compiled.append(module))
    run = gan_trainer("train.compile=true")
    bottleneck = run.gan.bottleneck.module
    assert compiled and all(module is not bottleneck for module in compiled)
    assert any(module is block for module in compiled for block in run.fake.model.dec.values())
