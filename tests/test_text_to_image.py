"""Text-to-image distillation end to end on tiny random pipelines of the real classes: the four presets with every
objective, which weights each step moves (full and LoRA), `onestep sample --prompts`, `onestep export` and its
diffusers round trip, and the messages for a teacher or prompt file that is not there.

No downloads: the pipelines are built from config by tests/test_diffusers_adapters.py's builders.
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from onestep_cli.config import resolve_config, validate_config  # noqa: E402
from onestep_cli.denoisers.generator import OneStepGenerator  # noqa: E402
from onestep_cli.runs.loading import load_generator_source  # noqa: E402
from onestep_cli.engine.loop import distill  # noqa: E402
from onestep_cli.denoisers.blocks import blocks  # noqa: E402
from onestep_cli.runs.networks import build_networks  # noqa: E402
from onestep_cli.engine.trainer import Trainer, make_optimizer  # noqa: E402
from onestep_cli.sampling import generate_text_to_image  # noqa: E402

from host_data import tensors_from_host_data  # noqa: E402
from test_export_lora import readme_namespace  # noqa: E402
from test_diffusers_adapters import build_pixart, build_sana, build_sd, build_sd3, build_sdxl  # noqa: E402

PRESET_TEACHERS = {"sd15-sid": "sd", "sdxl-sim": "sdxl", "sdxl-dmd2": "sdxl", "pixart-sim": "pixart", "sd3-sim": "sd3",
                   "sana-sid": "sana"}
OBJECTIVES = ("sim", "sid", "dmd", "di")
PROMPTS = ["a red bicycle", "two cats on a sofa", "an astronaut riding a horse"]
TINY = ["train.batch_size=2", "train.max_steps=2", "train.fake_updates_per_step=1", "teacher.dtype=float32",
        "train.precision=fp32", "train.device=cpu", "train.gradient_checkpointing=false", "train.parallelism=auto",
        "train.checkpoint_every=2", "train.tick_every=1"]
CPU = torch.device("cpu")


def _tiny_pixart():
    """PixArt-α's real schedule (linear betas 1e-4..0.02, DPM-Solver) on the tiny transformer."""
    pipeline = build_pixart()
    pipeline.register_modules(scheduler=diffusers.DPMSolverMultistepScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000))
    return pipeline


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # Tiny networks: one thread (conftest.py).


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Folders of the tiny pipelines by name, and a prompt file."""
    root = tmp_path_factory.mktemp("t2i")
    folders = {}
    for name, build in {"sd": build_sd, "sdxl": build_sdxl, "pixart": _tiny_pixart, "sd3": build_sd3,
                        "sana": build_sana}.items():
        build().save_pretrained(root / name)
        folders[name] = root / name
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return {"root": root, "prompts": prompts, **folders}


def tiny_config(tiny, preset, *extra):
    return resolve_config(preset, overrides=[f"teacher.path={tiny[PRESET_TEACHERS[preset]]}",
                                             f"prompts.path={tiny['prompts']}", *TINY, *extra])


def with_objective(config, name):
    """`config` with objective `name`, keeping the preset's sigma distribution (the teacher's sigma range)."""
    data = config.model_dump(mode="json")
    data["objective"] = {"name": name, "sigma": data["objective"]["sigma"]}
    return validate_config(data)


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before, module):
    return {name for name, p in module.named_parameters() if not torch.equal(before[name], p.detach())}


# ---------------------------------------------------------------------------------------------------------------------
# Training steps.

@pytest.mark.parametrize("preset", list(PRESET_TEACHERS))
def test_preset_runs_two_steps_of_every_objective(tiny, preset):
    config = tiny_config(tiny, preset)
    assert config.teacher.kind == "diffusers" and config.eval.metrics == []
    networks = build_networks(config)
    assert networks.data_shape == (4, 8, 8) and networks.label_dim == 0
    for name in OBJECTIVES:
        trainer = Trainer(with_objective(config, name), copy.deepcopy(networks), CPU, "fp32")
        for _ in range(2):
            stats = trainer.step()
            assert all(torch.isfinite(value) for value in stats.values()), (preset, name, stats)


def test_prompts_are_drawn_per_sample_and_cached_in_the_run(tiny, tmp_path):
    config = tiny_config(tiny, "sd15-sid")
    networks = build_networks(config, run_dir=tmp_path)
    assert (tmp_path / "prompts.safetensors").is_file()
    cond = networks.sample_condition(64, torch.Generator().manual_seed(0), CPU)
    assert len(cond) == 64 and len(torch.unique(cond.embeds.flatten(1), dim=0)) == len(PROMPTS)  # Each drawn.


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_each_step_moves_only_its_own_network(tiny, lora_rank):
    """With the other optimizer idle, a step moves exactly one network; the teacher never moves; LoRA runs move only
    adapter weights, and the fake score's frozen base weights stay frozen after the generator step."""
    config = tiny_config(tiny, "sd15-sid", f"generator.lora_rank={lora_rank}", f"fake.lora_rank={lora_rank}")
    networks = build_networks(config)
    for moving in ("generator", "fake"):
        trainer = Trainer(config, copy.deepcopy(networks), CPU, "fp32")
        idle = trainer.opt_fake if moving == "generator" else trainer.opt_generator
        idle.step = lambda *args, **kwargs: None
        if moving == "generator":  # A fake score equal to the teacher gives SiD's generator no gradient at all.
            with torch.no_grad():
                for parameter in trainer.fake.parameters():
                    parameter.add_(1e-3 * torch.randn_like(parameter))
        modules = {"teacher": trainer.teacher, "generator": trainer.generator, "fake": trainer.fake}
        before = {key: snapshot(module) for key, module in modules.items()}
        stats = trainer.step()
        assert all(torch.isfinite(value) for value in stats.values())
        moved = {key: changed(before[key], module) for key, module in modules.items()}
        assert moved[moving] and not moved["teacher"], moved
        assert not moved["generator" if moving == "fake" else "fake"], moved
        if lora_rank:
            assert all("lora_" in name for name in moved[moving]), moved[moving]
            trainable = [name for name, p in trainer.fake.named_parameters() if p.requires_grad]
            assert trainable and all("lora_" in name for name in trainable)


@pytest.mark.parametrize("preset", ["sd15-sid", "pixart-sim"])
def test_gradient_checkpointing_on_diffusers_blocks(tiny, preset):
    config = tiny_config(tiny, preset, "train.gradient_checkpointing=true")
    networks = build_networks(config)
    assert len(blocks(networks.generator)) == (5 if preset == "sd15-sid" else 2)  # 2 down, mid, 2 up; 2 layers.
    trainer = Trainer(config, networks, CPU, "fp32")
    assert all(torch.isfinite(value) for value in trainer.step().values())


def test_gradient_checkpointing_of_the_teacher_alone_changes_no_number(tiny):
    from torch.distributed._composable.contract import _get_registry

    def checkpointed(network):
        return [bool(_get_registry(block) and "checkpoint" in _get_registry(block)) for block in blocks(network)]

    results = {}
    for setting in ("false", "[teacher]"):
        torch.manual_seed(0)
        config = tiny_config(tiny, "pixart-sim", f"train.gradient_checkpointing={setting}")
        trainer = Trainer(config, build_networks(config), CPU, "fp32")
        stats = trainer.step()
        results[setting] = (stats, [p.detach().clone() for p in trainer.generator.parameters()])
        assert checkpointed(trainer.teacher) == [setting != "false"] * 2
        assert not any(checkpointed(trainer.generator) + checkpointed(trainer.fake))
    (plain, plain_weights), (recomputed, recomputed_weights) = results.values()
    for key in plain:
        torch.testing.assert_close(recomputed[key], plain[key], rtol=1e-6, atol=0)
    for before, after in zip(plain_weights, recomputed_weights):
        torch.testing.assert_close(after, before, rtol=1e-6, atol=0)


def test_gradient_checkpointing_names_only_known_networks(tiny):
    with pytest.raises(Exception, match="gradient_checkpointing"):
        tiny_config(tiny, "pixart-sim", "train.gradient_checkpointing=[teacher, decoder]")


# ---------------------------------------------------------------------------------------------------------------------
# The CLI: distill, sample, export; and the diffusers round trip.

@pytest.fixture(scope="module")
def sd_run(cli, tiny):
    run = tiny["root"] / "run-sd15"
    result = cli.invoke("distill", "--preset", "sd15-sid", "--set", f"teacher.path={tiny['sd']}", "--set",
                        f"prompts.path={tiny['prompts']}", *[part for item in TINY for part in ("--set", item)],
                        "--out", run, "--json")
    assert result.exit_code == 0, result.output
    assert (run / "prompts.safetensors").is_file() and (run / "export" / "generator.safetensors").is_file()
    return run


@pytest.mark.e2e
def test_sample_writes_an_image_per_prompt_and_seed_and_a_grid(cli, tiny, sd_run, tmp_path):
    out = tmp_path / "samples"
    result = cli.invoke("sample", sd_run, "--prompts", tiny["prompts"], "--seeds", "0-1", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in out.glob("p*.png"))
    assert pngs == [f"p{i:04d}-s{s:06d}.png" for i in range(3) for s in (0, 1)]
    from PIL import Image

    assert Image.open(out / "p0000-s000000.png").size == (16, 16)
    assert Image.open(out / "grid.png").size == (2 * 18 + 2, 3 * 18 + 2)
    meta = json.loads((out / "samples.json").read_text())
    assert meta["prompts"] == PROMPTS and meta["images"][3] == {"file": "p0001-s000001.png", "prompt": PROMPTS[1],
                                                                "seed": 1}
    reference = cli.invoke("sample", sd_run, "--prompts", tiny["prompts"], "--seeds", "0", "--teacher", "--steps", "2",
                           "--out", tmp_path / "teacher", "--json")
    assert reference.exit_code == 0 and json.loads(reference.stdout)["model"] == "teacher", reference.output
    missing = cli.invoke("sample", sd_run, "--seeds", "0", "--out", tmp_path / "x")
    assert missing.exit_code != 0 and "--prompts FILE" in missing.output


def _pipeline_images(folder, prompt, seeds, **extra):
    pipeline = diffusers.DiffusionPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    images = [pipeline(prompt, num_inference_steps=1, guidance_scale=1.0, output_type="pt",
                       generator=torch.Generator().manual_seed(seed), **extra).images for seed in seeds]
    return pipeline, torch.cat(images)


@pytest.mark.e2e
def test_export_round_trip_matches_onestep_sample(cli, tiny, sd_run, tmp_path):
    out = tmp_path / "export"
    result = cli.invoke("export", sd_run, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    assert (out / "model_index.json").is_file() and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    samples = tmp_path / "samples"
    assert cli.invoke("sample", sd_run, "--prompts", tiny["prompts"], "--seeds", "3,7", "--out", samples).exit_code == 0
    pipeline, images = _pipeline_images(out, PROMPTS[2], [3, 7])
    assert type(pipeline).__name__ == "StableDiffusionPipeline"
    assert type(pipeline.scheduler).__name__ == "EulerDiscreteScheduler"
    from PIL import Image

    ours = np.stack([np.asarray(Image.open(samples / f"p0002-s{seed:06d}.png")) for seed in (3, 7)])
    theirs = (images.permute(0, 2, 3, 1).numpy() * 255).round()
    assert np.abs(ours.astype(np.float64) - theirs).max() <= 1  # Same pixels up to uint8 rounding.

    weights = tmp_path / "weights"
    assert cli.invoke("export", sd_run, "--out", weights, "--format", "safetensors").exit_code == 0
    info = json.loads((weights / "generator.json").read_text())
    assert info["network_class"] == "UNet2DConditionModel" and info["sigma_init"] == 2.5
    again = cli.invoke("export", sd_run, "--out", out)
    assert again.exit_code != 0 and "not empty" in again.output


@pytest.mark.e2e
@pytest.mark.parametrize("preset", ["sdxl-dmd2", "pixart-sim"])
def test_export_round_trip_sdxl_and_pixart_with_lora(cli, tiny, preset, tmp_path):
    """LoRA runs export merged weights; SDXL's time ids and PixArt's learned-sigma output go through diffusers. Their
    adapter alone (--format lora) loads into the teacher's pipeline as its README.md says: with diffusers'
    `load_lora_weights` for SDXL, with peft for PixArt (whose pipeline has no LoRA loader)."""
    config = tiny_config(tiny, preset, "train.max_steps=1", "generator.lora_rank=4", "fake.lora_rank=4",
                         "train.generator_lr=1e-2", "train.ema_halflife_kimg=null")  # Export the raw generator.
    run = tmp_path / "run"
    distill(config, run, progress=False, log=lambda message: None)
    source = load_generator_source(run)
    extra = {"use_resolution_binning": False, "clean_caption": False} if preset == "pixart-sim" else {}
    ours = (generate_text_to_image(source.generator, source.pipeline, [PROMPTS[0]], [5], source.data_shape) + 1) / 2
    teacher_only = OneStepGenerator(source.pipeline.denoiser, source.generator.sigma_init)
    untrained = (generate_text_to_image(teacher_only, source.pipeline, [PROMPTS[0]], [5], source.data_shape) + 1) / 2
    assert (ours - untrained).abs().max() > 1e-3  # The LoRA step did change the generator.
    out = tmp_path / "export"
    assert cli.invoke("export", run, "--out", out).exit_code == 0
    _, images = _pipeline_images(out, PROMPTS[0], [5], **extra)
    assert (images - ours).abs().max() < 1e-4

    adapter = tmp_path / "lora"
    assert cli.invoke("export", run, "--out", adapter, "--format", "lora").exit_code == 0
    assert json.loads((adapter / "onestep.json").read_text())["loader"] == \
        ("peft" if preset == "pixart-sim" else "load_lora_weights")
    namespace = readme_namespace(adapter, prompt=PROMPTS[0], seed=5)
    assert np.abs(np.asarray(namespace["image"], dtype=np.float64) - (ours[0].permute(1, 2, 0).numpy() * 255).round()
                  ).max() <= 1  # The README's own call, PixArt's options included, up to uint8 rounding.
    adapted = namespace["pipe"](PROMPTS[0], num_inference_steps=1, guidance_scale=1.0, output_type="pt",
                                generator=torch.Generator().manual_seed(5), **extra).images
    assert (adapted - ours).abs().max() < 1e-4


@pytest.mark.e2e
@pytest.mark.parametrize("preset", ["sd3-sim", "sana-sid"])
def test_flow_teacher_export_round_trip(cli, tiny, preset, tmp_path):
    """A flow-matching generator reads unit noise as its flow input at t_init; the exported pipeline's flow Euler
    scheduler, called as onestep.json says (sigmas=[t_init], no T5 or the preset's token count), gives the same
    images. The LoRA export, whose scheduler is DDPM-family, is refused with the way out."""
    config = tiny_config(tiny, preset, "train.max_steps=1", "train.generator_lr=1e-2", "train.ema_halflife_kimg=null",
                         "generator.lora_rank=4", "fake.lora_rank=4")
    run = tmp_path / "run"
    distill(config, run, progress=False, log=lambda message: None)
    source = load_generator_source(run)
    assert source.generator.start_scale == 1 + config.generator.sigma_init  # x_t = z at t_init.
    if preset == "sana-sid":  # The null condition is SANA's negative prompt: '' without its instruction.
        *_, negative, negative_mask = source.pipeline.pipeline.encode_prompt(
            "a cat", do_classifier_free_guidance=True, max_sequence_length=config.teacher.max_sequence_length)
        null = source.pipeline.denoiser.null_condition
        assert torch.equal(null.embeds, negative) and torch.equal(null.mask, negative_mask)
        mixed = source.pipeline.encoder.encode(["a cat", "", PROMPTS[0]])  # Each row as encoded alone.
        torch.testing.assert_close(mixed.embeds[1], null.embeds[0])
        torch.testing.assert_close(mixed.embeds[2], source.pipeline.encoder.encode([PROMPTS[0]]).embeds[0])
    ours = (generate_text_to_image(source.generator, source.pipeline, [PROMPTS[0]], [5], source.data_shape) + 1) / 2
    out = tmp_path / "export"
    assert cli.invoke("export", run, "--out", out).exit_code == 0
    info = json.loads((out / "onestep.json").read_text())
    t_init = 999 / 1000
    assert f"sigmas=[{t_init}]" in info["call"] and info["prediction_type"] == "flow_prediction"
    assert f"max_sequence_length={config.teacher.max_sequence_length}" in info["call"]
    extra = dict(use_resolution_binning=False, height=32, width=32) if preset == "sana-sid" else {}  # Not 1024 px.
    pipeline = diffusers.DiffusionPipeline.from_pretrained(out)
    pipeline.set_progress_bar_config(disable=True)
    assert type(pipeline.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    images = pipeline(PROMPTS[0], sigmas=[t_init], guidance_scale=1.0, output_type="pt",
                      max_sequence_length=config.teacher.max_sequence_length,
                      generator=torch.Generator().manual_seed(5), **extra).images
    assert (images - ours).abs().max() < 1e-4
    refused = cli.invoke("export", run, "--out", tmp_path / "lora", "--format", "lora")
    assert refused.exit_code != 0 and "--format diffusers" in " ".join(refused.output.split())


# ---------------------------------------------------------------------------------------------------------------------
# Messages.

def test_missing_teacher_and_prompts_give_the_promised_messages(cli, tiny, tmp_path):
    run = tmp_path / "run"
    uncached = cli.invoke("distill", "--preset", "sdxl-dmd2", "--set", f"prompts.path={tiny['prompts']}", "--out", run)
    assert uncached.exit_code != 0
    text = " ".join(uncached.output.split())
    assert "'stabilityai/stable-diffusion-xl-base-1.0' is neither a local folder nor in the local Hugging Face" \
           in text and "hf download stabilityai/stable-diffusion-xl-base-1.0" in text
    assert not run.exists()  # A failed teacher load leaves no run directory behind.
    missing = cli.invoke("distill", "--preset", "sd15-sid", "--set", f"teacher.path={tmp_path / 'nowhere'}",
                         "--set", f"prompts.path={tiny['prompts']}", "--out", run)
    assert missing.exit_code != 0 and "does not exist" in missing.output
    no_prompts = cli.invoke("distill", "--preset", "sd15-sid", "--set", f"teacher.path={tiny['sd']}", "--out", run)
    assert no_prompts.exit_code != 0 and "prompts.path" in " ".join(no_prompts.output.split())
    tokens = cli.invoke("distill", "--preset", "sd15-sid", "--set", f"teacher.path={tiny['sd']}", "--set",
                        f"prompts.path={tiny['prompts']}", "--set", "teacher.max_sequence_length=8", "--out", run)
    assert tokens.exit_code != 0 and "CLIP encoders only" in " ".join(tokens.output.split())
    gmm_lora = cli.invoke("distill", "--preset", "gmm-sim", "--set", "generator.lora_rank=4", "--out", run)
    assert gmm_lora.exit_code != 0 and "only apply to text-to-image teachers" in " ".join(gmm_lora.output.split())


@pytest.mark.e2e
def test_eval_generates_prompt_images_in_memory_as_sample_writes_them(cli, tiny, sd_run, tiny_weights, tmp_path):
    """`onestep eval RUN --prompts FILE --seeds ...` on a text-to-image run: the images of every prompt with every
    seed, generated in memory, score as the PNGs `onestep sample --prompts` writes (paired in file-name order)."""
    out = tmp_path / "samples"
    assert cli.invoke("sample", sd_run, "--prompts", tiny["prompts"], "--seeds", "0-1", "--out", out).exit_code == 0
    per_image = tmp_path / "per-image.txt"
    per_image.write_text("".join(f"{p}\n" for p in PROMPTS for _ in range(2)))
    weight_args = [part for key, path in tiny_weights.items() for part in ("--weights", f"{key}={path}")]
    results = {}
    for name, source, extra in [("memory", sd_run, ["--prompts", tiny["prompts"], "--seeds", "0-1"]),
                                ("files", out, ["--prompts", per_image]),
                                ("recorded", out, [])]:  # The prompts samples.json records.
        result = cli.invoke("eval", source, "--metrics", "clip_score", *extra, *weight_args, "--device", "cpu",
                            "--json")
        assert result.exit_code == 0, result.output
        results[name] = json.loads(result.stdout)
    memory, files, recorded = results["memory"], results["files"], results["recorded"]
    assert recorded["metrics"]["clip_score"] == files["metrics"]["clip_score"]
    assert recorded["provenance"]["clip_score"]["prompt_pairing"]["prompts"] == str(out / "samples.json")
    assert memory["provenance"]["common"]["num_images"] == 6 == files["provenance"]["common"]["num_images"]
    assert memory["metrics"]["clip_score"] == pytest.approx(files["metrics"]["clip_score"], abs=1e-4)
    assert "prompt i of --prompts with seed j" in memory["provenance"]["common"]["text_to_image"]
    missing = cli.invoke("eval", sd_run, "--metrics", "clip_score", *weight_args, "--device", "cpu")
    assert missing.exit_code != 0 and "--prompts FILE" in missing.output


# ---------------------------------------------------------------------------------------------------------------------
# train.cuda_graph with prompts: their conditions live on the training device, so the step has no host round trip.

def test_prompt_draws_are_the_same_rows_placed_on_the_device_or_kept_on_the_host(tiny, monkeypatch):
    from onestep_cli.denoisers.diffusers.training import PromptSampler

    config = tiny_config(tiny, "pixart-sim")
    sampler = build_networks(config).sample_condition
    kept = PromptSampler(sampler.conditions.map(lambda value: value.clone()))
    monkeypatch.setattr(PromptSampler, "DEVICE_BYTES", 0)
    kept.place(torch.device("meta"))  # Too big for the (patched) budget: stays on the CPU.
    assert kept.conditions.embeds.device == CPU and kept.draws_on_host(torch.device("meta"))
    assert not sampler.draws_on_host(CPU) and not sampler.draws_on_host(torch.device("cpu", 0))
    draw = lambda s: s(5, torch.Generator().manual_seed(3), CPU)
    torch.testing.assert_close(draw(kept).embeds, draw(sampler).embeds, rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["pixart-sim", "sd15-sid"])
def test_text_to_image_step_with_deferred_checks_equals_the_plain_step(tiny, preset):
    runs = {}
    for graph in ("false", "true"):
        config = tiny_config(tiny, preset, f"train.cuda_graph={graph}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "the device is the CPU: the step runs eagerly".
            trainer = Trainer(config, build_networks(config), CPU, "fp32")
        assert trainer.defer_checks == (graph == "true")
        # Deferred checks use the fused Adam; the plain CPU step gets it too (Adam's update of a near-zero gradient
        # is sensitive to rounding, so the per-tensor one would differ in a few elements).
        trainer.opt_generator = make_optimizer(config, trainer.generator.parameters(), config.train.lr, fused=True)
        trainer.opt_fake = make_optimizer(config, trainer.fake.parameters(), config.train.lr, fused=True)
        runs[graph] = [trainer.step() for _ in range(3)], [p.detach().clone() for p in trainer.generator.parameters()]
    (plain, plain_weights), (deferred, deferred_weights) = runs["false"], runs["true"]
    for plain_stats, deferred_stats in zip(plain, deferred):
        for key in plain_stats:
            torch.testing.assert_close(deferred_stats[key], plain_stats[key], rtol=0, atol=0)
    for before, after in zip(plain_weights, deferred_weights):
        torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_the_text_to_image_step_builds_no_tensor_from_host_data(tiny):
    # As tests/test_cuda_graph.py checks for the EDM step (tests/host_data.py says why).
    config = tiny_config(tiny, "pixart-sim", "train.cuda_graph=true")  # Its optimizer: fused, as on a GPU.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the device is the CPU: the step runs eagerly".
        trainer = Trainer(config, build_networks(config), CPU, "fp32")
    sigmas = [torch.full((2,), 1.5), torch.full((2,), 2.0)]
    assert tensors_from_host_data(lambda: trainer._iteration([*sigmas, torch.ones(1)])) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_captured_text_to_image_step_matches_the_eager_step(tiny, monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    trainers = []
    for graph in ("false", "true"):
        config = tiny_config(tiny, "pixart-sim", f"train.cuda_graph={graph}", "train.fused_optimizer=true",
                             "train.device=cuda")
        trainers.append(Trainer(config, build_networks(config), cuda, "fp32"))
    eager, graphed = trainers
    assert graphed.step_graph is not None
    for step in range(5):
        a, b = eager.step(), graphed.step()
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), (step, key, a[key], b[key])
    assert graphed.step_graph.captured
    for p, q in zip(eager.generator.parameters(), graphed.generator.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6)
