"""The PixArt-style digits teacher kit: its T5 tokenizer, and a tiny run saved, reloaded and sampled as users would."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from onestep_cli.digits import captions, pixart_teacher

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_digits_pixart_teacher.py"


def run_script(argv: list[str]) -> dict:
    spec = importlib.util.spec_from_file_location("train_digits_pixart_teacher", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        return module.main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    """A pipeline folder from the script's smoke run (tiny networks, a VAE trained 2 steps, 3 denoiser steps)."""
    folder = tmp_path_factory.mktemp("pixart") / "teacher"
    run_script(["--out", str(folder), "--smoke", "--device", "cpu", "--threads", "1"])
    return folder


def test_tokenizer_encodes_every_grammar_caption_without_unknown_words():
    tokenizer = pixart_teacher.build_tokenizer()
    assert tokenizer.convert_tokens_to_ids(["<pad>", "</s>", "<unk>"]) == [0, 1, 2]
    texts = captions.prompt_list(captions.TRAIN_TEMPLATES) + captions.prompt_list(captions.HELDOUT_TEMPLATES)
    ids = tokenizer(texts).input_ids
    assert all(tokenizer.unk_token_id not in row and row[-1] == tokenizer.eos_token_id for row in ids)
    assert tokenizer.batch_decode(ids, skip_special_tokens=True) == texts
    assert tokenizer.convert_ids_to_tokens(tokenizer("a bold handwritten 7, slanted left").input_ids) == [
        "▁a", "▁bold", "▁handwritten", "▁7", ",", "▁slanted", "▁left", "</s>"]


def test_tokenizer_maps_unknown_words_to_unk():
    tokenizer = pixart_teacher.build_tokenizer()
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a zebra painting the digit 7").input_ids)
    assert tokens == ["▁a", "<unk>", "<unk>", "▁the", "▁digit", "▁7", "</s>"]


def test_smoke_run_writes_a_pixart_pipeline_that_samples_at_32px(tiny_teacher):
    from diffusers import PixArtAlphaPipeline

    training = json.loads((tiny_teacher / "training.json").read_text())
    assert training["denoiser"]["step"] == 3 and training["check"]["num_samples"] == 10
    pipeline = PixArtAlphaPipeline.from_pretrained(tiny_teacher)
    pipeline.set_progress_bar_config(disable=True)
    assert type(pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    images = pipeline(["the digit 3", "a thin handwritten seven"], num_inference_steps=2, guidance_scale=4.5,
                      height=32, width=32, use_resolution_binning=False, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_smoke_run_loads_as_a_onestep_teacher(tiny_teacher):
    from onestep_cli.denoisers.diffusers.loading import load_diffusers_teacher

    teacher = load_diffusers_teacher(tiny_teacher)
    assert teacher.latent_shape == (4, 8, 8) and teacher.encoder.kind == "pixart"
    cond = teacher.encoder.encode(["the digit 7", "a picture of the number two"])
    denoised = teacher.denoiser(torch.randn(2, 4, 8, 8), torch.tensor([0.5, 5.0]), cond)
    assert denoised.shape == (2, 4, 8, 8) and torch.isfinite(denoised).all()


def test_training_embeddings_equal_the_pipelines_up_to_masked_padding(tiny_teacher):
    from diffusers import PixArtAlphaPipeline

    pipeline = PixArtAlphaPipeline.from_pretrained(tiny_teacher)
    texts = ["A bold handwritten 7, slanted left", "", "the digit 0"]
    with torch.no_grad():
        embeds, mask = pixart_teacher.encode_captions(pipeline.tokenizer, pipeline.text_encoder, texts, "cpu")
        padded, padded_mask, _, _ = pipeline.encode_prompt(texts, do_classifier_free_guidance=False, device="cpu")
        latents = torch.randn(3, 4, 8, 8)
        timestep = torch.tensor([10, 500, 990])
        outputs = [pipeline.transformer(latents, encoder_hidden_states=e, encoder_attention_mask=m, timestep=timestep,
                                        added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
                   for e, m in ((embeds, mask), (padded, padded_mask))]
    length = mask.shape[1]
    assert padded.shape[1] == 120 and torch.equal(padded_mask[:, :length], mask) and padded_mask[:, length:].sum() == 0
    torch.testing.assert_close(padded[:, :length] * mask[..., None], embeds * mask[..., None])
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)


def test_a_given_vae_is_shared_not_retrained(tiny_teacher, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "shared"
    run_script(["--out", str(folder), "--smoke", "--vae", str(tiny_teacher / "vae"), "--samples-per-digit", "0",
                "--device", "cpu", "--threads", "1"])
    weights = "vae/diffusion_pytorch_model.safetensors"
    original, shared = load_file(tiny_teacher / weights), load_file(folder / weights)
    assert all(torch.equal(original[name], shared[name]) for name in original)
    training = json.loads((folder / "training.json").read_text())
    assert training["vae"].startswith("loaded from") and "check" not in training


def test_a_vae_folder_without_config_is_refused_with_a_sentence(tmp_path):
    options = pixart_teacher.TrainingOptions(out=tmp_path / "out", vae=tmp_path)
    with pytest.raises(ValueError, match="holds no config.json"):
        options.validate()


def test_the_minutes_budget_ends_training(tiny_teacher, tmp_path):
    folder = tmp_path / "budget"
    training = run_script(["--out", str(folder), "--smoke", "--vae", str(tiny_teacher / "vae"), "--minutes", "0",
                           "--steps", "50", "--samples-per-digit", "0", "--device", "cpu", "--threads", "1"])
    assert training["denoiser"]["step"] == 1 and (folder / "model_index.json").is_file()
