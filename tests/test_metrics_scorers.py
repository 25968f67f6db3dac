"""Each scorer's whole pipeline (preprocessing, tokenisation, network, head, normalisation) on tiny random-weight
models of the real classes, against the same computation written out independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from onestep_cli.eval import MetricContext, compute_metrics
from onestep_cli.eval.clip import AestheticScore, CLIPImageFeatures, CLIPScore
from onestep_cli.eval.imagereward import (REWARD_MEAN, REWARD_STD, ImageRewardScore, official_to_ours,
                                          vision_config_from_state)
from onestep_cli.eval.inception import InceptionProbabilities, inception_input
from onestep_cli.eval.distances import inception_score
from onestep_cli.eval.transformers_models import DINOv2Features, PickScore
from test_metrics_tiny_models import (CLIP_IMAGE_SIZE, aesthetic_head, official_imagereward_state, random_images,
                                      reference_imagereward, tiny_open_clip)

PROMPTS = ["a photo of a cat", "a red car on the grass", "the big blue dog"]
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(autouse=True)
def _cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ONESTEP_HOME", str(tmp_path / "onestep-home"))


@pytest.fixture()
def ctx(tiny_weights):
    return MetricContext(weights=tiny_weights, batch_size=2)


@pytest.fixture(scope="module")
def images():
    return random_images(3, 40, 48, seed=11)  # Not square and not the network size: resize and crop are exercised.


def clip_pixels(images: np.ndarray, size: int) -> torch.Tensor:
    """OpenAI CLIP's preprocessing written out: PIL bicubic resize of the short side, centre crop, mean/std."""
    pipeline = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                                   transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    return torch.stack([pipeline(Image.fromarray(a)) for a in images])


@torch.no_grad()
def test_aesthetic_is_the_head_on_normalised_clip_embeddings(ctx, images):
    model, head = tiny_open_clip(), aesthetic_head()
    embedding = model.encode_image(clip_pixels(images, CLIP_IMAGE_SIZE))
    expected = head(embedding / embedding.norm(dim=-1, keepdim=True))[:, 0].numpy()
    ours = AestheticScore(ctx).extract(images)[:, 0]
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    result = compute_metrics(["aesthetic"], images, context=ctx)["aesthetic"]
    assert result.value == pytest.approx(expected.mean(), rel=1e-5)
    assert result.provenance["weights"]["origin"] == "user path" and result.provenance["num_samples"] == 3


@torch.no_grad()
def test_clip_score_is_100_times_clamped_cosine_with_open_clip_tokens(ctx, images):
    import open_clip

    model = tiny_open_clip()
    image = model.encode_image(clip_pixels(images, CLIP_IMAGE_SIZE))
    text = model.encode_text(open_clip.tokenize(PROMPTS))
    expected = (100 * torch.nn.functional.cosine_similarity(image, text).clamp(min=0)).numpy()
    np.testing.assert_allclose(CLIPScore(ctx).extract(images, PROMPTS)[:, 0], expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_fd_clip_features_are_unnormalised_image_embeddings(ctx, images):
    expected = tiny_open_clip().encode_image(clip_pixels(images, CLIP_IMAGE_SIZE)).numpy()
    np.testing.assert_allclose(CLIPImageFeatures(ctx).extract(images), expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_pickscore_is_logit_scale_times_cosine_of_clipmodel_embeddings(ctx, images, tiny_weights):
    from pathlib import Path

    from transformers import CLIPModel, CLIPProcessor

    folder = Path(tiny_weights["pickscore"])
    model = CLIPModel.from_pretrained(folder / "model").eval()
    processor = CLIPProcessor.from_pretrained(folder / "processor")
    pixels = processor(images=[Image.fromarray(a) for a in images], return_tensors="pt")["pixel_values"]
    assert pixels.shape[-2:] == (CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE)
    tokens = processor(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    image = model.vision_model(pixel_values=pixels).pooler_output @ model.visual_projection.weight.t()
    text = model.text_model(**tokens).pooler_output @ model.text_projection.weight.t()
    expected = model.logit_scale.exp() * torch.nn.functional.cosine_similarity(image, text)
    np.testing.assert_allclose(PickScore(ctx).extract(images, PROMPTS)[:, 0], expected.numpy(), rtol=1e-5)


@torch.no_grad()
def test_imagereward_matches_an_independent_forward_on_the_official_layout(ctx, images):
    scorer = ImageRewardScore(ctx)
    tokens = scorer.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens.input_ids.shape == (3, 35)
    assert tokens.input_ids[0, :8].tolist() == [2, 5, 6, 7, 5, 8, 3, 0]  # [CLS] a photo of a cat [SEP] [PAD]
    assert len(scorer.tokenizer) == 21  # 19 words + [DEC] + [ENC], as BLIP's 30522 + 2.
    raw = reference_imagereward(official_imagereward_state(), clip_pixels(images, 32), tokens.input_ids,
                                tokens.attention_mask)
    expected = ((raw - REWARD_MEAN) / REWARD_STD).numpy()
    np.testing.assert_allclose(scorer.extract(images, PROMPTS)[:, 0], expected, rtol=1e-4, atol=1e-5)
    assert scorer.provenance["unused_weights"] == ["text_proj", "vision_proj"]


def test_imagereward_mapping_uses_every_parameter_and_reads_the_vit_size():
    state = official_imagereward_state()
    renamed, unused = official_to_ours(state)
    assert sorted(unused) == sorted(k for k in state if "_proj." in k)
    assert not any("position_ids" in k for k in renamed)
    config = vision_config_from_state(state)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.image_size,
            config.patch_size, config.layer_norm_eps) == (128, 2, 2, 32, 16, 1e-6)


@torch.no_grad()
def test_dinov2_features_follow_edm2_preprocessing(ctx, images, tiny_weights):
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(tiny_weights["dinov2"]).eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", antialias=True) / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    expected = model(pixel_values=x).last_hidden_state[:, 0]  # The layer-normed CLS token.
    np.testing.assert_allclose(DINOv2Features(ctx).extract(images), expected.numpy(), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_inception_score_runs_the_logits_network_without_output_bias(ctx, images, tiny_weights):
    net = torch.jit.load(tiny_weights["inception_logits"])
    probs = net(inception_input(images, "edm"), no_output_bias=True).double().numpy()
    np.testing.assert_allclose(InceptionProbabilities(ctx).extract(images), probs, rtol=1e-6)
    result = compute_metrics(["is"], images, context=ctx)["is"]
    assert result.value == pytest.approx(inception_score(probs)[0], rel=1e-6)
    assert result.provenance["mode"] == "edm" and "no output bias" in result.provenance["features"]


def test_prompt_metrics_without_prompts_say_so(ctx, images):
    from onestep_cli.eval import MetricError

    with pytest.raises(MetricError, match="--prompts FILE"):
        compute_metrics(["clip_score"], images, context=ctx)
