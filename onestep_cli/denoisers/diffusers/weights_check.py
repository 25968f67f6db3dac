"""Refuse a pipeline's text encoder that its library loaded without its weights.

transformers versions disagree on reading a checkpoint whose key names lack the model's prefix: a CLIPTextModel
saved by transformers 5 has keys `embeddings.*`, while CLIPTextModelWithProjection (SD3's text encoders) names them
`text_model.embeddings.*`. transformers 5.25 adds the prefix; 5.17 leaves those weights randomly initialised and only
prints a table. A teacher with a random text encoder still trains, on conditions unrelated to its prompts, so a
student learns to ignore them: nothing fails, the results are wrong. So after loading, each text encoder's weights are
compared with the tensors in its files.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHECKED_BYTES = 64 * 2**20  # Read back at most this much of a component's files: a misnamed layout misses them all.


def weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The safetensors files of a component folder that from_pretrained reads (`variant`: `model.<variant>...`)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if variant:
        return [path for path in files if f".{variant}." in path.name or f".{variant}-" in path.name]
    return [path for path in files if path.name.count(".") == 1]


def unloaded_weights(module: torch.nn.Module, folder: Path, variant: str | None = None) -> list[str]:
    """Names of `module`'s tensors whose loaded values differ from the same tensor in `folder`'s files, reading
    up to CHECKED_BYTES in file order. A file key matches the module's key of the same name, else the one key that
    adds a prefix to it, else itself without its first part: the layouts transformers versions map between."""
    from safetensors import safe_open

    state = module.state_dict()
    differing, read = [], 0
    for path in weight_files(folder, variant):
        with safe_open(str(path), framework="pt") as file:
            for key in sorted(file.keys()):
                name = _module_key(key, state)
                if name is None:
                    continue
                stored, loaded = file.get_tensor(key), state[name].detach().cpu()
                if stored.shape != loaded.shape or not torch.equal(stored.to(loaded.dtype), loaded):
                    differing.append(name)
                read += stored.numel() * stored.element_size()
                if read >= CHECKED_BYTES:
                    return differing
    return differing


def _module_key(key: str, state: dict) -> str | None:
    if key in state:
        return key
    prefixed = [name for name in state if name.endswith("." + key)]
    if len(prefixed) == 1:
        return prefixed[0]
    shorter = key.split(".", 1)[-1]
    return shorter if shorter in state else None
