"""The SD-style digits teacher kit: its tokenizer against open_clip's, caption dropout, and the training script end to
end on tiny networks (train, save, resume bitwise, load with diffusers and with onestep's loader)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from onestep_cli.digits import t2i_teacher as kit
from onestep_cli.digits.captions import HELDOUT_TEMPLATES, DigitPrompt, parse_prompt, prompt_list

diffusers = pytest.importorskip("diffusers")
open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_digits_t2i_teacher as script  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return kit.clip_tokenizer()


def test_tokenizer_matches_open_clip(tokenizer):
    reference = open_clip_tokenizer.SimpleTokenizer()
    captions = ["the digit 7", "a bold handwritten seven, slanted left", "an image of a 3 that is upright",
                "A Thin   digit NINE, slanted right", "number 0 written in regular strokes", ""]
    for caption in captions:
        expected = [reference.sot_token_id, *reference.encode(caption), reference.eot_token_id]
        assert tokenizer(caption).input_ids == expected, caption
    assert len(tokenizer) == kit.CLIP_VOCAB_SIZE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)


def test_every_caption_fits_the_context(tokenizer):
    captions = prompt_list() + prompt_list(HELDOUT_TEMPLATES)
    assert max(len(tokenizer(c).input_ids) for c in captions) <= kit.TOKENIZER_MAX_LENGTH
    assert kit.TokenTable(tokenizer)(["the digit 1", ""]).shape == (2, kit.TOKENIZER_MAX_LENGTH)


def test_caption_dropout_rate():
    prompts = [DigitPrompt(d % 10, "bold", "upright") for d in range(4000)]
    captions = kit.training_captions(prompts, torch.Generator().manual_seed(0), dropout=0.25)
    assert sum(c == "" for c in captions) / len(captions) == pytest.approx(0.25, abs=0.02)
    kept = [(c, p) for c, p in zip(captions, prompts) if c]
    assert all(parse_prompt(c).digit == p.digit for c, p in kept)
    assert "" not in kit.training_captions(prompts[:500], torch.Generator().manual_seed(0), dropout=0.0)


def test_captioned_digits_are_rgb_grey():
    images, prompts = kit.captioned_digits()
    assert images.shape == (1797, 3, 32, 32) and len(prompts) == 1797
    assert torch.equal(images[:, 0], images[:, 2]) and images.min() >= -1 and images.max() <= 1


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke run of the script: 3 denoiser steps, then resumed to 5."""
    out = tmp_path_factory.mktemp("digits_sd")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        script.main(["--out", str(out), "--smoke", "--device", "cpu"])
        first = json.loads((out / "pipeline" / "training.json").read_text())
        resumed = script.main(["--out", str(out), "--smoke", "--device", "cpu", "--denoiser-steps", "5"])
    finally:
        torch.set_num_threads(threads)
    return out, first, resumed


def test_script_trains_each_stage(trained):
    out, first, resumed = trained
    assert first["vae"]["steps"] == 2 and first["denoiser"]["step"] == 3 and resumed["denoiser"]["step"] == 5
    assert first["vae"]["scaling_factor"] > 0 and torch.isfinite(torch.tensor(resumed["denoiser"]["loss"]))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"stage": "vae", "resumed_from": str(out / "vae")} in records
    assert {"stage": "denoiser", "resumed_from": str(out / "denoiser.pt"), "step": 3} in records
    assert 0 <= resumed["check"]["quick_class_accuracy"] <= 1


def test_resumed_training_is_bitwise_the_uninterrupted_one(trained, tmp_path, one_thread):
    out, _, _ = trained
    shutil.copytree(out / "vae", tmp_path / "vae")  # The same autoencoder, so only the denoiser stage runs.
    args = script.parse_args(["--out", str(tmp_path), "--smoke", "--device", "cpu", "--denoiser-steps", "5"])
    images, prompts = kit.captioned_digits()
    log = script.Log(tmp_path / "log.jsonl")
    vae = script.vae_stage(args, images, log)
    task = script.EpsilonTask(args, kit.clip_tokenizer(), images.device)
    averages, _ = script.denoiser_stage(args, task, vae, images, prompts, log)
    state = torch.load(out / "denoiser.pt", weights_only=True)
    for key, module in (("ema_unet", averages["unet"]), ("ema_text_encoder", averages["text_encoder"])):
        for name, tensor in module.state_dict().items():
            assert torch.equal(tensor, state[key][name]), f"{key}.{name}"


def test_folder_loads_with_diffusers(trained):
    out, _, _ = trained
    pipeline = diffusers.StableDiffusionPipeline.from_pretrained(out / "pipeline", local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a bold 4, slanted left", num_inference_steps=2, guidance_scale=3.0, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    assert isinstance(pipeline.scheduler, diffusers.DDIMScheduler)
    assert pipeline.tokenizer("the digit 7").input_ids == kit.clip_tokenizer()("the digit 7").input_ids
    assert not (out / "pipeline" / "tokenizer" / "tokenizer.json").exists()


def test_folder_loads_as_a_onestep_teacher(trained):
    from onestep_cli.denoisers.diffusers.loading import load_diffusers_teacher

    out, first, _ = trained
    teacher = load_diffusers_teacher(out / "pipeline")
    assert teacher.latent_shape == (4, 8, 8)
    assert teacher.vae_scaling_factor == pytest.approx(first["vae"]["scaling_factor"])
    assert teacher.sigma_max == pytest.approx(14.61, abs=0.01)  # SD 1.5's schedule.
    assert teacher.decode(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 32, 32)


def test_rectified_flow_objective_saves_an_sd3_pipeline_linking_the_sd_teacher(tmp_path, one_thread):
    """`--objective rectified_flow`: the same loop trains an SD3 transformer on the SD-style teacher's latents and
    frozen text encoder; the folder links to that teacher's files, loads with StableDiffusion3Pipeline (no T5) and as
    a onestep flow teacher, and its text conditions are the pipeline's own."""
    from onestep_cli.denoisers.diffusers import FlowDenoiser
    from onestep_cli.denoisers.diffusers.loading import load_diffusers_teacher
    from onestep_cli.digits import flow_teacher

    summary = script.main(["--out", str(tmp_path), "--smoke", "--device", "cpu", "--objective", "rectified_flow",
                           "--denoiser-steps", "2"])
    folder = tmp_path / "pipeline"
    assert summary["denoiser"]["step"] == 2 and torch.isfinite(torch.tensor(summary["denoiser"]["loss"]))
    assert not (tmp_path / "vae").exists()  # No autoencoder stage: the SD-style teacher's is used.
    sd_teacher = script.SHIPPED_SD_TEACHER
    assert (folder / "vae" / flow_teacher.VAE_WEIGHTS).resolve() == (sd_teacher / "vae" / flow_teacher.VAE_WEIGHTS)
    assert (folder / "text_encoder" / flow_teacher.TEXT_ENCODER_SHARD).resolve() == \
        sd_teacher / "text_encoder" / "model.safetensors"
    assert (folder / "tokenizer").resolve() == sd_teacher / "tokenizer" and (folder / "text_encoder_2").is_symlink()

    pipeline = flow_teacher.load_pipeline(folder)
    assert isinstance(pipeline, diffusers.StableDiffusion3Pipeline) and pipeline.text_encoder_3 is None
    sd = diffusers.StableDiffusionPipeline.from_pretrained(sd_teacher, local_files_only=True)
    ids = sd.tokenizer(["a bold 4"], padding="max_length", max_length=kit.TOKENIZER_MAX_LENGTH,
                       return_tensors="pt").input_ids
    hidden = sd.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    embeds, pooled = flow_teacher.encode_caption_table(pipeline, ["a bold 4"])
    torch.testing.assert_close(embeds, torch.cat([hidden, hidden], dim=-1))  # Both CLIP slots: the SD teacher's.
    assert pooled.shape == (1, 2 * sd.text_encoder.config.hidden_size)

    teacher = load_diffusers_teacher(folder, max_sequence_length=flow_teacher.MAX_SEQUENCE_LENGTH)
    assert isinstance(teacher.denoiser, FlowDenoiser) and teacher.latent_shape == (4, 8, 8)
    assert teacher.encoder.encode(["the digit 7"]).embeds.shape == (1, kit.TOKENIZER_MAX_LENGTH, 2 * 32)
