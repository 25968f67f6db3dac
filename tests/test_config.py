"""Config resolution: presets, merging, validation messages."""

import pytest

from onestep_cli.config import ConfigError, list_presets, read_preset, resolve_config, validate_config


def test_every_preset_validates_and_has_a_description():
    presets = list_presets()
    assert {"gmm-sim", "gmm-sid", "gmm-dmd", "gmm-di"} <= set(presets)
    for name, description in presets.items():
        assert description, f"preset {name} has no description"
        resolve_config(name)


def test_default_preset_distils_the_shipped_digits_teacher_with_sim():
    config = resolve_config()
    assert config.objective.name == "sim" and config.teacher.kind == "edm"
    assert config.teacher.resolved_path.is_dir() and (config.teacher.resolved_path / "model.safetensors").is_file()


def test_gmm_teacher_shapes_are_checked():
    data = read_preset("gmm-sim")
    data["teacher"]["stds"] = data["teacher"]["stds"][:3]
    with pytest.raises(ConfigError, match="teacher.stds has 3 entries"):
        validate_config(data)


def test_unknown_nested_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"Unknown key 'objective.huber_k'.*Did you mean 'objective.huber_c'"):
        resolve_config("gmm-sim", overrides=["objective.huber_k=2"])


def test_set_parses_yaml_values():
    config = resolve_config("gmm-sim", overrides=["train.betas=[0.5, 0.9]", "train.grad_clip=null"])
    assert config.train.betas == (0.5, 0.9) and config.train.grad_clip is None
