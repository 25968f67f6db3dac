"""Checkpoints written atomically (temp folder, then rename) and found again on resume.

A checkpoint is a folder `checkpoints/step-XXXXXXXX/` with safetensors weights (one file per network), the
optimizer tensors and RNG states in `optimizers.safetensors`, and `state.json` holding the step, the optimizers'
non-tensor state and a SHA-256 of every file. A folder is complete only once renamed into place, and it is trusted
only while every file matches its hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"
PARTIAL_PREFIX = ".partial-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, with the folder and the reason."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flatten_optimizer(prefix: str, state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and a JSON-able remainder."""
    tensors, scalars = {}, {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(prefix: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    head = f"{prefix}.state."
    for name, value in tensors.items():
        if name.startswith(head):
            index, key = name[len(head):].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    root: Path, step: int, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
    rng_states: dict[str, torch.Tensor], extra: dict, keep: int,
) -> Path:
    """Write a checkpoint for `step` under `root` atomically; keep only the newest `keep` complete ones."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f"{PARTIAL_PREFIX}{checkpoint_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, module in modules.items():
        weights = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(weights, str(tmp / f"{name}.safetensors"))
    opt_tensors, opt_meta = {}, {}
    for name, optimizer in optimizers.items():
        tensors, meta = flatten_optimizer(name, optimizer.state_dict())
        opt_tensors.update(tensors)
        opt_meta[name] = meta
    opt_tensors.update({f"rng.{k}": v.cpu().contiguous() for k, v in rng_states.items()})
    save_file(opt_tensors, str(tmp / "optimizers.safetensors"))
    files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
    state = {"step": step, **extra, "optimizers": opt_meta, "files": files}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for path in tmp.iterdir():
        _fsync(path)
    if final.exists():  # A re-run of the same step (e.g. after a crash right after the rename): replace it.
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete (renamed-into-place) checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def remove_partial_checkpoints(root: Path) -> None:
    """Delete temp folders left by a save that was killed before its rename."""
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(PARTIAL_PREFIX):
                shutil.rmtree(path, ignore_errors=True)


def read_checkpoint(folder: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Return (state, {module name: state dict}, optimizer-and-RNG tensors), verifying every file's hash."""
    state_path = folder / "state.json"
    try:
        state = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"Checkpoint {folder} has no readable state.json ({exc}).") from None
    for name, expected in state.get("files", {}).items():
        path = folder / name
        if not path.is_file() or _sha256(path) != expected:
            raise CheckpointError(f"Checkpoint {folder}: file {name} is missing or does not match its recorded hash.")
    modules = {p.stem: load_file(str(p)) for p in folder.glob("*.safetensors") if p.name != "optimizers.safetensors"}
    return state, modules, load_file(str(folder / "optimizers.safetensors"))


def find_latest_checkpoint(root: Path, warn=print):
    """The newest checkpoint that reads back intact, as read_checkpoint's tuple plus its folder, or None."""
    for folder in reversed(list_checkpoints(root)):
        try:
            return (*read_checkpoint(folder), folder)
        except CheckpointError as exc:
            warn(f"{exc} Falling back to the previous checkpoint.")
    return None
