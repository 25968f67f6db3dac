"""A text encoder that transformers loads without its weights is refused, and the shipped ones load in any version.

transformers 5.17 reads a CLIP checkpoint saved without the `text_model.` prefix into CLIPTextModelWithProjection as
random weights (5.25 maps it); a teacher with a random text encoder trains a student that ignores its prompts. The
shipped encoders use the prefixed names (every version reads them), and loading compares each encoder with its files.
"""

from __future__ import annotations

import pytest
import torch

from onestep_cli.config import resolve_asset_path

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from onestep_cli.denoisers.diffusers.loading import (DiffusersLoadError, check_text_encoder_weights,  # noqa: E402
                                                     load_pipeline)
from onestep_cli.denoisers.diffusers.weights_check import unloaded_weights, weight_files  # noqa: E402
from onestep_cli.digits.t2i_teacher import save_hub_layout  # noqa: E402

SD_TEACHER = resolve_asset_path("@assets/digits_t2i_teacher")
FLOW_TEACHER = resolve_asset_path("@assets/digits_flow_teacher")


def file_keys(folder) -> set[str]:
    from safetensors import safe_open

    keys = set()
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as file:
            keys |= set(file.keys())
    return keys


@pytest.mark.parametrize("teacher", [SD_TEACHER, FLOW_TEACHER], ids=["sd", "flow"])
def test_shipped_text_encoders_use_the_models_own_names(teacher):
    config = transformers.CLIPTextConfig.from_pretrained(teacher / "text_encoder")
    names = set(transformers.CLIPTextModelWithProjection(config).state_dict())
    expected = names if teacher == FLOW_TEACHER else names - {"text_projection.weight"}
    assert file_keys(teacher / "text_encoder") == expected


def test_a_text_encoder_left_random_is_refused():
    pipeline = load_pipeline(SD_TEACHER)
    check_text_encoder_weights(pipeline, SD_TEACHER)  # As loaded: every tensor matches its file.
    with torch.no_grad():  # What a transformers version that does not map the file's names leaves.
        pipeline.text_encoder.get_input_embeddings().weight.normal_()
    with pytest.raises(DiffusersLoadError, match="text_encoder.*without its saved weights"):
        check_text_encoder_weights(pipeline, SD_TEACHER)


def test_unprefixed_files_match_a_prefixed_model(tmp_path):
    config = transformers.CLIPTextConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=8, projection_dim=8)
    torch.manual_seed(0)
    plain = transformers.CLIPTextModel(config)
    plain.save_pretrained(tmp_path / "plain")
    loaded = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "plain")
    saved = {name.split(".", 1)[-1] if name.startswith("text_model.") else name
             for name in file_keys(tmp_path / "plain")}
    shared = [name for name in loaded.state_dict() if name.split(".", 1)[-1] in saved]
    assert shared and unloaded_weights(loaded, tmp_path / "plain") == []
    fresh = transformers.CLIPTextModelWithProjection(config)  # What a version that does not map the names leaves.
    random = [name for name in shared if not torch.equal(fresh.state_dict()[name], loaded.state_dict()[name])]
    assert random and sorted(unloaded_weights(fresh, tmp_path / "plain")) == sorted(random)


def test_save_hub_layout_prefixes_every_name(tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "model.safetensors"
    weights = {"embeddings.token_embedding.weight": torch.ones(2), "text_model.final_layer_norm.weight": torch.zeros(1)}
    save_file(weights, str(path), metadata={"format": "pt"})
    save_hub_layout(path)
    assert set(load_file(str(path))) == {"text_model.embeddings.token_embedding.weight",
                                         "text_model.final_layer_norm.weight"}
