"""Diffusers teachers as sigma-unit denoisers: schedule mapping against diffusers' own scheduler, guidance, the SD /
SDXL / PixArt adapters on tiny random pipelines saved and reloaded from disk, prompt files, caches and load errors.

No downloads: every network is a tiny random instance of the real class, built from config (ENVIRONMENT.md).
"""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
from torch import nn

from onestep_cli.denoisers.diffusers import (Conditioning, DDPMSigmaSchedule, DiffusersDenoiser, DiffusersLoadError,
                                             FlowDenoiser, FlowSigmaSchedule, GuidedDenoiser, PromptFileError,
                                             UNetDenoiser, encode_prompts_cached, guide, load_diffusers_teacher,
                                             load_prompt_cache, null_condition, read_prompts, resolve_pretrained)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


# ---------------------------------------------------------------------------------------------------------------------
# Tiny pipelines of the real classes.

def _clip_tokenizer():
    """A byte-level CLIP tokenizer with no merges: real tokenisation rules, a 514-token vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable + [256 + n for n in range(256 - len(printable))]
    chars = [chr(c) for c in codes]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def _clip_config(**extra):
    return transformers.CLIPTextConfig(vocab_size=600, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=77, bos_token_id=512,
                                       eos_token_id=513, pad_token_id=513, **extra)


def _vae():
    return diffusers.AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, sample_size=16)


def _unet(**extra):
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, norm_num_groups=32, **{"cross_attention_dim": 32, **extra})


def build_sd(prediction_type: str = "epsilon"):
    torch.manual_seed(0)
    return diffusers.StableDiffusionPipeline(
        vae=_vae(), text_encoder=transformers.CLIPTextModel(_clip_config()), tokenizer=_clip_tokenizer(),
        unet=_unet(), scheduler=diffusers.DDIMScheduler(prediction_type=prediction_type, clip_sample=False,
                                                        steps_offset=1, **SD_BETAS),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_sdxl():
    torch.manual_seed(0)
    unet = _unet(cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=32 + 6 * 8)
    return diffusers.StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=transformers.CLIPTextModel(_clip_config()),
        text_encoder_2=transformers.CLIPTextModelWithProjection(_clip_config(projection_dim=32)),
        tokenizer=_clip_tokenizer(), tokenizer_2=_clip_tokenizer(), unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(**SD_BETAS))


def _t5():
    """A unigram T5 tokenizer over letters, and a 2-layer T5 encoder."""
    letters = [(c, -float(i)) for i, c in enumerate("▁abcdefghijklmnopqrstuvwxyz")]
    tokenizer = transformers.T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *letters],
                                         extra_ids=0)
    return tokenizer, transformers.T5EncoderModel(transformers.T5Config(vocab_size=64, d_model=32, d_ff=37, d_kv=8,
                                                                        num_layers=2, num_heads=4))


def build_pixart():
    torch.manual_seed(0)
    tokenizer, text_encoder = _t5()
    transformer = diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        use_additional_conditions=False)
    scheduler = diffusers.DDIMScheduler(clip_sample=False, steps_offset=1, **SD_BETAS)
    return diffusers.PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=_vae(),
                                         transformer=transformer, scheduler=scheduler)


def build_sd3():
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=64)
    tokenizer_3, text_encoder_3 = _t5()
    vae = _vae()
    vae.register_to_config(shift_factor=0.0609)  # SD3's VAE shift (its pipeline needs a number there).
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=transformers.CLIPTextModelWithProjection(_clip_config(projection_dim=32)),
        text_encoder_2=transformers.CLIPTextModelWithProjection(_clip_config(projection_dim=32)),
        tokenizer=_clip_tokenizer(), tokenizer_2=_clip_tokenizer(), text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3)


def build_sana():
    """SANA's parts at toy size: a linear-attention SanaTransformer2DModel, a 1-layer Gemma-2 with a character-level
    Gemma tokenizer, a 3-level DC-AE (32 px -> 8x8x4), and the flow-matching Euler scheduler."""
    torch.manual_seed(0)
    chars = ["▁", *"abcdefghijklmnopqrstuvwxyz0123456789,.:'-"]
    tokenizer = transformers.GemmaTokenizer(
        vocab={token: i for i, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *chars])}, merges=[])
    text_encoder = transformers.Gemma2Model(transformers.Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16))
    transformer = diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
        sample_size=8, patch_size=1)
    levels = ("ResBlock", "ResBlock", "EfficientViTBlock")
    vae = diffusers.AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=levels,
        decoder_block_types=levels, encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407)
    return diffusers.SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                                  scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))


BUILDERS = {"sd-eps": build_sd, "sd-v": lambda: build_sd("v_prediction"), "sdxl": build_sdxl, "pixart": build_pixart,
            "sd3": build_sd3}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> folder of each tiny pipeline written with save_pretrained (built once per module)."""
    root = tmp_path_factory.mktemp("pipelines")
    folders = {}
    for name, build in BUILDERS.items():
        build().save_pretrained(root / name)
        folders[name] = root / name
    return folders


@pytest.fixture(scope="module")
def teachers(saved):
    return {name: load_diffusers_teacher(folder) for name, folder in saved.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Schedule mapping against diffusers' scheduler.

def test_sd_schedule_landmarks():
    schedule = DDPMSigmaSchedule.from_scheduler(diffusers.DDPMScheduler(**SD_BETAS))
    assert schedule.sigmas[625].item() == pytest.approx(2.50, abs=0.01)
    assert schedule.sigma_max == pytest.approx(14.61, abs=0.01)
    assert schedule.sigma_min == pytest.approx(0.0292, abs=1e-4)
    t = torch.tensor([0, 1, 500, 625, 998, 999])
    assert torch.allclose(schedule.timestep(schedule.sigmas[t]), t.float(), atol=1e-4)
    # Between levels: linear in log-sigma, so the geometric mean of two neighbours sits half-way.
    midpoint = (schedule.sigmas[625] * schedule.sigmas[626]).sqrt()
    assert schedule.timestep(midpoint).item() == pytest.approx(625.5, abs=1e-4)
    assert schedule.sigma_at(625.5).item() == pytest.approx(midpoint.item(), rel=1e-9)
    # Outside the table the timestep clamps.
    assert schedule.timestep(torch.tensor([1e-4, 80.0])).tolist() == [0.0, 999.0]


class StubUNet(nn.Module):
    """Stands in for a UNet: records its inputs and returns a preset target (the true eps or v)."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.target = target
        self.weight = nn.Parameter(torch.zeros(()))
        self.config = type("Config", (), {"sample_size": target.shape[-1], "in_channels": target.shape[1],
                                          "addition_embed_type": None})()

    def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=False, **_):
        self.seen = (sample, timestep)
        return (self.target + self.weight,)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_mapping_matches_scheduler_add_noise(prediction_type):
    scheduler = diffusers.DDPMScheduler(prediction_type=prediction_type, **SD_BETAS)
    schedule = DDPMSigmaSchedule.from_scheduler(scheduler)
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 10, 250, 625, 900, 999])
    x0, eps = torch.randn(6, 4, 8, 8, generator=gen), torch.randn(6, 4, 8, 8, generator=gen)
    x_vp_true = scheduler.add_noise(x0, eps, t)
    target = eps if prediction_type == "epsilon" else scheduler.get_velocity(x0, eps, t)

    sigma = schedule.sigmas[t].float()
    x = x0 + sigma.view(-1, 1, 1, 1) * eps
    stub = StubUNet(target)
    denoiser = UNetDenoiser(stub, schedule, prediction_type)
    x0_hat = denoiser(x, sigma, Conditioning(embeds=torch.zeros(6, 77, 32)))

    x_vp, timestep = stub.seen
    assert torch.allclose(x_vp, x_vp_true, atol=1e-5, rtol=1e-5)
    assert torch.allclose(timestep, t.float(), atol=1e-3)
    # Large sigma amplifies float32 rounding of x (|x| ~ sigma): compare relative to it.
    tolerance = 1e-5 * (1 + sigma.view(-1, 1, 1, 1))
    assert ((x0_hat - x0).abs() <= tolerance).all()


def test_denoiser_agrees_with_ddim_pred_original_sample(teachers):
    """With real tiny UNets: our x0 equals diffusers' own x0 estimate from the same network output."""
    for name in ("sd-eps", "sd-v"):
        teacher = teachers[name]
        scheduler, unet = diffusers.DDIMScheduler.from_config(teacher.pipeline.scheduler.config), teacher.pipeline.unet
        scheduler.set_timesteps(1000)
        cond = teacher.encoder.encode(["a red bicycle", "two cats"])
        gen = torch.Generator().manual_seed(1)
        x0, eps = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
        t = torch.tensor([625, 999])
        x_vp = scheduler.add_noise(x0, eps, t)
        sigma = teacher.denoiser.schedule.sigmas[t].float()
        with torch.no_grad():
            output = unet(x_vp, t, encoder_hidden_states=cond.embeds).sample
            truth = torch.stack([scheduler.step(output[i:i + 1], int(t[i]), x_vp[i:i + 1]).pred_original_sample[0]
                                 for i in range(2)])
            ours = teacher.denoiser(x0 + sigma.view(-1, 1, 1, 1) * eps, sigma, cond)
        assert torch.allclose(ours, truth, atol=1e-4 * (1 + sigma.max().item())), name


def test_flow_adapter_recovers_x0_from_true_velocity():
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0.1, 0.5, 0.9])
    stub_class = type("SD3Transformer2DModel", (StubUNet,), {
        "forward": lambda self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict:
        (setattr(self, "seen", (hidden_states, timestep)), (self.target + self.weight,))[1]})
    stub = stub_class(eps - x0)
    denoiser = FlowDenoiser(stub, FlowSigmaSchedule())
    sigma = t / (1 - t)
    x = x0 + sigma.view(-1, 1, 1, 1) * eps
    x0_hat = denoiser(x, sigma, Conditioning(embeds=torch.zeros(3, 5, 8), pooled=torch.zeros(3, 8)))
    x_flow, timestep = stub.seen
    assert torch.allclose(x_flow, (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps, atol=1e-6)
    assert torch.allclose(timestep, t * 1000, atol=1e-3)
    assert torch.allclose(x0_hat, x0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Guidance and null conditions.

class EmbedShift(DiffusersDenoiser):
    """D(x, sigma, c) = x + mean(c.embeds): easy to predict under guidance."""

    def forward(self, x, sigma, cond=None):
        cond = self.resolve_condition(cond, x.shape[0], x.dtype, x.device)
        return x + cond.embeds.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_guidance_arithmetic():
    denoiser = EmbedShift(nn.Linear(1, 1))
    null = Conditioning(embeds=torch.full((1, 3, 2), -1.0))
    denoiser.set_null_condition(null)
    cond = Conditioning(embeds=torch.stack([torch.full((3, 2), 2.0), torch.full((3, 2), 5.0)]))
    x, sigma = torch.zeros(2, 1, 2, 2), torch.tensor([1.0, 3.0])
    for batch_branches in (True, False):
        guided = GuidedDenoiser(denoiser, guidance_scale=3.0, batch_branches=batch_branches)
        assert torch.allclose(guided(x, sigma, cond, guidance_scale=1.0), denoiser(x, sigma, cond))
        expected = torch.tensor([-1 + 3 * (2 + 1.0), -1 + 3 * (5 + 1.0)]).view(-1, 1, 1, 1).expand_as(x)
        assert torch.allclose(guided(x, sigma, cond), expected)
        assert torch.allclose(guided(x, sigma, None), torch.full_like(x, -1.0))
    assert torch.allclose(guide(torch.ones(2), torch.full((2,), 3.0), 0.0), torch.ones(2))


def test_null_condition_modes():
    empty = Conditioning(embeds=torch.randn(1, 4, 3), mask=torch.tensor([[1, 0, 0, 0]]), pooled=torch.randn(1, 3),
                         time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]]))
    assert null_condition("empty_prompt", empty) is not None
    assert torch.equal(null_condition("empty_prompt", empty).embeds, empty.embeds)
    zeros = null_condition("zeros", empty)
    assert not zeros.embeds.any() and not zeros.pooled.any()
    assert torch.equal(zeros.time_ids, empty.time_ids) and torch.equal(zeros.mask, empty.mask)
    assert not null_condition("auto", empty, pipeline_default="zeros").embeds.any()
    with pytest.raises(ValueError, match="empty_prompt"):
        null_condition("none", empty)


def test_null_condition_per_pipeline(teachers):
    sd, sdxl = teachers["sd-eps"], teachers["sdxl"]
    assert sd.null_mode == "empty_prompt"
    assert torch.equal(sd.denoiser.null_condition.embeds, sd.encoder.encode([""]).embeds)
    assert sd.denoiser.null_condition.embeds.abs().sum() > 0
    assert sdxl.null_mode == "zeros"  # SDXL's force_zeros_for_empty_prompt, DMD2's recipe.
    null = sdxl.denoiser.null_condition
    assert not null.embeds.any() and not null.pooled.any() and null.time_ids[0].tolist() == [16, 16, 0, 0, 16, 16]


def test_conditioning_batch_operations(tmp_path):
    cond = Conditioning(embeds=torch.arange(24.0).view(4, 3, 2), mask=torch.ones(4, 3, dtype=torch.long),
                        pooled=torch.arange(8.0).view(4, 2))
    assert len(cond[1:3]) == 2 and torch.equal(cond[-1].pooled, cond.pooled[3:])
    assert torch.equal(Conditioning.cat([cond[:1], cond[1:]]).embeds, cond.embeds)
    dropped = cond.where(torch.tensor([True, False, True, False]), cond[0].zeros_like())
    assert dropped.embeds[1].abs().sum() == 0 and torch.equal(dropped.embeds[2], cond.embeds[2])
    assert len(cond[0].expand(5)) == 5
    with pytest.raises(ValueError, match="batch"):
        Conditioning(embeds=torch.zeros(2, 3, 1), pooled=torch.zeros(3, 1))
    assert Conditioning.from_state_dict(cond.state_dict("c.") , "c.").mask.dtype == torch.long


# ---------------------------------------------------------------------------------------------------------------------
# Real tiny pipelines, saved and loaded back.

@pytest.mark.parametrize("name", list(BUILDERS))
def test_tiny_pipeline_round_trip_with_input_gradient(teachers, name):
    teacher = teachers[name]
    assert teacher.latent_shape == (4, 8, 8)
    assert teacher.vae_scaling_factor == pytest.approx(0.18215)
    sigma_max = 999.0 if name == "sd3" else 14.61  # Flow: t_max = 0.999; DDPM: SD's scaled-linear schedule.
    assert 0 < teacher.sigma_min < 0.05 and teacher.sigma_max == pytest.approx(sigma_max, abs=0.01)
    cond = teacher.encoder.encode(["a photo of a cat", "an astronaut riding a horse"])
    x = (2.5 * torch.randn(2, 4, 8, 8)).requires_grad_()
    x0 = teacher.denoiser(x, torch.full((2,), 2.5), cond)
    assert x0.shape == x.shape and x0.dtype == torch.float32 and torch.isfinite(x0).all()
    x0.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    guided = teacher.guided(4.5)(x.detach(), torch.tensor([2.5, 1.0]), cond)
    assert torch.isfinite(guided).all()
    assert teacher.decode(x0.detach()).shape == (2, 3, 16, 16)


def test_copies_lora_checkpointing_and_bf16(teachers, saved):
    """What the engine will do with a teacher: copy it, add LoRA, checkpoint activations; bf16 weights too."""
    from peft import LoraConfig

    teacher = teachers["sd-eps"]
    teacher.denoiser.zero_grad(set_to_none=True)
    fake = copy.deepcopy(teacher.denoiser)
    assert torch.equal(fake.null_condition.embeds, teacher.denoiser.null_condition.embeds)
    assert not any(name.startswith("null_") for name in fake.state_dict())
    fake.model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    fake.model.enable_gradient_checkpointing()
    fake.train()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    fake(x, torch.tensor([0.5, 5.0]), None).square().mean().backward()
    lora = [p for name, p in fake.model.named_parameters() if "lora" in name]
    assert lora and all(p.grad is not None for p in lora) and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.denoiser.parameters())

    half = load_diffusers_teacher(saved["sd-eps"], torch_dtype=torch.bfloat16)
    x0 = half.denoiser(torch.randn(1, 4, 8, 8), torch.tensor([2.5]), half.encoder.encode(["a cat"]))
    assert half.denoiser.model_dtype == torch.bfloat16 and x0.dtype == torch.float32 and torch.isfinite(x0).all()


def test_pixart_drops_learned_sigma(teachers):
    teacher = teachers["pixart"]
    assert teacher.pipeline.transformer.config.out_channels == 8
    cond = teacher.encoder.encode(["a cat"])
    assert cond.mask is not None and cond.mask.shape == cond.embeds.shape[:2]
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([2.5])
    with torch.no_grad():
        x0 = teacher.denoiser(x, sigma, cond)
        timestep = teacher.denoiser.timestep(sigma)
        raw = teacher.pipeline.transformer(x / (1 + 2.5**2) ** 0.5, encoder_hidden_states=cond.embeds,
                                           encoder_attention_mask=cond.mask, timestep=timestep,
                                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert raw.shape[1] == 8
    assert torch.allclose(x0, x - 2.5 * raw[:, :4], atol=1e-5)


def test_sdxl_passes_added_cond_kwargs(teachers):
    teacher = teachers["sdxl"]
    cond = teacher.encoder.encode(["a cat", "a dog"])
    assert cond.pooled.shape == (2, 32) and cond.embeds.shape == (2, 77, 64)
    assert cond.time_ids.tolist() == [[16, 16, 0, 0, 16, 16]] * 2  # 8 latent px x VAE factor 2.
    seen = {}
    hook = teacher.pipeline.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs["added_cond_kwargs"]), with_kwargs=True)
    try:
        teacher.denoiser(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), cond)
    finally:
        hook.remove()
    assert torch.equal(seen["text_embeds"], cond.pooled) and torch.equal(seen["time_ids"], cond.time_ids)
    with pytest.raises(ValueError, match="pooled"):
        teacher.denoiser(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), Conditioning(embeds=cond.embeds))


# ---------------------------------------------------------------------------------------------------------------------
# Prompt files and the embedding cache.

def test_prompt_files_in_three_formats(tmp_path):
    (tmp_path / "p.txt").write_text("a red bicycle\n\n  two cats  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a red bicycle", "two cats"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red bicycle"}\n\n{"caption": "two cats", "id": 3}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a red bicycle", "two cats"]
    coco = {"images": [{"id": 1}], "annotations": [{"image_id": 1, "id": 7, "caption": "A dog on a beach. "},
                                                  {"image_id": 1, "id": 8, "caption": "a sandy dog"}]}
    (tmp_path / "captions_val2017.json").write_text(json.dumps(coco))
    assert read_prompts(tmp_path / "captions_val2017.json") == ["A dog on a beach.", "a sandy dog"]


def test_prompt_file_errors(tmp_path):
    with pytest.raises(PromptFileError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    with pytest.raises(PromptFileError, match="line 2 is not valid JSON"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "nokey.jsonl").write_text('{"text": "no key"}\n')
    with pytest.raises(PromptFileError, match="'prompt' or 'caption'"):
        read_prompts(tmp_path / "nokey.jsonl")
    (tmp_path / "other.json").write_text('{"images": []}')
    with pytest.raises(PromptFileError, match="COCO"):
        read_prompts(tmp_path / "other.json")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(PromptFileError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "p.csv").write_text("a,b\n")
    with pytest.raises(PromptFileError, match=".csv"):
        read_prompts(tmp_path / "p.csv")


def test_prompt_embedding_cache(teachers, tmp_path, monkeypatch):
    teacher = teachers["pixart"]
    path = tmp_path / "prompts.safetensors"
    first = teacher.encode_prompts(["a cat", "a dog"], path)
    assert path.is_file() and first.prompts == ["a cat", "a dog"]
    loaded = load_prompt_cache(path)
    assert torch.equal(loaded.conditions.embeds, first.conditions.embeds)
    assert torch.equal(loaded.conditions.mask, first.conditions.mask) and len(loaded.empty) == 1

    def no_encoding(prompts):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(teacher.encoder, "encode", no_encoding)
    assert torch.equal(encode_prompts_cached(teacher.encoder, ["a cat", "a dog"], path).conditions.embeds,
                       first.conditions.embeds)
    monkeypatch.undo()
    changed = encode_prompts_cached(teacher.encoder, ["a bird"], path, dtype=torch.float16)
    assert changed.prompts == ["a bird"] and load_prompt_cache(path).conditions.embeds.dtype == torch.float16


# ---------------------------------------------------------------------------------------------------------------------
# Missing weights.

def test_missing_folder_and_uncached_hub_id_fail_fast(tmp_path):
    with pytest.raises(DiffusersLoadError, match="does not exist"):
        resolve_pretrained(tmp_path / "no-such-teacher")
    (tmp_path / "not-a-pipeline").mkdir()
    with pytest.raises(DiffusersLoadError, match="no model_index.json"):
        resolve_pretrained(tmp_path / "not-a-pipeline")
    start = time.perf_counter()
    message = r"'onestep-tests/no-such-model' is neither a local folder nor in the local Hugging Face cache.*hf downl"
    with pytest.raises(DiffusersLoadError, match=message):
        load_diffusers_teacher("onestep-tests/no-such-model")
    assert time.perf_counter() - start < 5


def test_incomplete_folder_names_it(saved, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved["sd-eps"], broken)
    for weights in (broken / "unet").glob("diffusion_pytorch_model*"):
        weights.unlink()
    with pytest.raises(DiffusersLoadError, match="broken"):
        load_diffusers_teacher(broken)
