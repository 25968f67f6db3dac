"""Checkpoints written atomically by every rank together, and found again (verified) on resume.

A checkpoint is a folder `checkpoints/step-XXXXXXXX/` with `state.json` (step, kimg, optimizer hyper-parameters,
scalers, the parallelism it was written under, a SHA-256 of every other file and one of its own content) next to the
tensors, in one of two formats:

- full (single process and DDP, where every rank holds everything): rank 0 writes one safetensors file per network
  and `optimizers.safetensors` with the optimizer tensors and every rank's RNG states;
- sharded (FSDP2): each rank writes its shards through torch.distributed.checkpoint (`__RANK_0.distcp`, and rank 0
  the `.metadata` index), which reshards on load, so a run can resume on a different number of GPUs; RNG states go
  to `rng.safetensors`.

Every rank writes into `.partial-step-XXXXXXXX/` and hashes what it wrote; once all have finished, rank 0 writes
state.json, fsyncs and renames the folder into place. A folder is complete only once renamed, and trusted only while
every file matches its hash, so a SIGKILL at any moment leaves at worst a partial folder (removed on resume) or a
corrupt one (skipped, and set aside as `damaged-step-XXXXXXXX` when the run resumes from an older one). A save that
fails for lack of space removes its partial folder and raises a DiskFullError.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import DiskFullError, OnestepError, disk_space
from ..runtime.distributed import SINGLE, DistEnv, all_gather_object, barrier, broadcast_object

PREFIX = "step-"
PARTIAL_PREFIX = ".partial-"
DAMAGED_PREFIX = "damaged-"  # A damaged checkpoint newer than the one a run resumed from, kept for inspection.
STATE_FILE = "state.json"
STATE_HASH = "state_sha256"  # state.json's key for the SHA-256 of its own content (without this key).
OPTIMIZER_FILE = "optimizers.safetensors"
RNG_FILE = "rng.safetensors"
SHARDED_INDEX = ".metadata"  # Written by torch.distributed.checkpoint: marks the sharded format.
# Fault injection for tests: seconds to sleep after each file of a save, so a test can SIGKILL mid-save.
PAUSE_ENV = "ONESTEP_DEBUG_SAVE_PAUSE_S"


class CheckpointError(OnestepError, RuntimeError):
    """A checkpoint that cannot be read, with the folder and the reason."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def partial_dir(root: Path, step: int) -> Path:
    """The temporary folder every rank of a save writes into (the same name on every rank)."""
    return root / f"{PARTIAL_PREFIX}{checkpoint_name(step)}"


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


def _debug_pause() -> None:
    seconds = float(os.environ.get(PAUSE_ENV, "0") or 0)
    if seconds > 0:
        time.sleep(seconds)


@contextlib.contextmanager
def _single_process_quiet():
    """Silence DCP's notice that it runs without a process group: one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def hash_files(folder: Path, names: list[str]) -> dict[str, str]:
    return {name: _sha256(folder / name) for name in names}


def state_digest(state: dict) -> str:
    """SHA-256 of state.json's content without its own hash, independent of key order and indentation."""
    content = {k: v for k, v in json.loads(json.dumps(state)).items() if k != STATE_HASH}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# -- writing -------------------------------------------------------------------------------------------------------


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


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """`optimizer.load_state_dict`, then each moment tensor takes its parameter's strides: checkpoints store tensors
    contiguous, and the fused CUDA Adam refuses contiguous moments beside channels_last parameters."""
    optimizer.load_state_dict(state_dict)
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


@contextlib.contextmanager
def saving(root: Path, step: int, env: DistEnv):
    """The save of checkpoint `step`: yields its temporary folder (begin_save). A save that fails for lack of space
    raises a DiskFullError after rank 0 has removed the partial folder, leaving the earlier checkpoints as they were."""
    advice = ("The partial checkpoint was removed and the earlier ones are intact: free space there, then run the "
              "same command again to resume from the newest one.")
    try:
        with disk_space(root, f"checkpoint {checkpoint_name(step)}", advice):
            yield begin_save(root, step, env)
    except DiskFullError:
        if env.is_main:
            shutil.rmtree(partial_dir(root, step), ignore_errors=True)
        raise


def begin_save(root: Path, step: int, env: DistEnv) -> Path:
    """Rank 0 creates an empty temporary folder for `step`; every rank gets its path once it exists."""
    tmp = partial_dir(root, step)
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(env)
    return tmp


def write_full(folder: Path, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
               rng_tensors: dict[str, torch.Tensor]) -> tuple[list[str], dict]:
    """Full format (one writer): a safetensors file per network, optimizer tensors and RNG states together.

    Returns (files written, JSON-able optimizer remainder for state.json)."""
    written = []
    for name, module in modules.items():
        weights = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(weights, str(folder / f"{name}.safetensors"))
        written.append(f"{name}.safetensors")
        _debug_pause()
    tensors, meta = {}, {}
    for name, optimizer in optimizers.items():
        tensors_of_one, meta[name] = flatten_optimizer(name, optimizer.state_dict())
        tensors.update(tensors_of_one)
    tensors.update({f"rng.{k}": v.cpu().contiguous() for k, v in rng_tensors.items()})
    save_file(tensors, str(folder / OPTIMIZER_FILE))
    written.append(OPTIMIZER_FILE)
    _debug_pause()
    return written, meta


def write_sharded(folder: Path, state: dict, env: DistEnv) -> list[str]:
    """Sharded format: every rank writes its shards with torch.distributed.checkpoint; returns this rank's files."""
    import torch.distributed.checkpoint as dcp

    with _single_process_quiet():
        dcp.save(state, checkpoint_id=str(folder), no_dist=not env.is_distributed)
    _debug_pause()
    mine = [p.name for p in folder.iterdir() if p.name.startswith(f"__{env.rank}_")]
    return sorted(mine + ([SHARDED_INDEX] if env.is_main else []))


def write_rng(folder: Path, rng_tensors: dict[str, torch.Tensor]) -> list[str]:
    save_file({f"rng.{k}": v.cpu().contiguous() for k, v in rng_tensors.items()}, str(folder / RNG_FILE))
    return [RNG_FILE]


def commit(root: Path, tmp: Path, step: int, state: dict, hashes: dict[str, str], keep: int, env: DistEnv) -> Path:
    """Rank 0 records the hashes in state.json, fsyncs and renames `tmp` into place, then prunes to the newest
    `keep` (this one always kept); every rank returns once the checkpoint is visible."""
    final = root / checkpoint_name(step)
    if env.is_main:
        state = {"step": step, **state, "files": dict(sorted(hashes.items()))}
        state[STATE_HASH] = state_digest(state)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        for path in tmp.iterdir():
            _fsync(path)
        _debug_pause()
        if final.exists():  # A re-run of the same step (e.g. after a crash right after the rename): replace it.
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
        others = [path for path in list_checkpoints(root) if path != final]
        for old in others[:max(len(others) - (keep - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return final


def gather_hashes(hashes: dict[str, str], env: DistEnv) -> dict[str, str]:
    merged = {}
    for part in all_gather_object(hashes, env):
        merged.update(part)
    return merged


# -- finding and reading -------------------------------------------------------------------------------------------


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


def read_state(folder: Path) -> dict:
    try:
        return json.loads((folder / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"Checkpoint {folder} has no readable {STATE_FILE} ({exc}).") from None


def is_sharded(folder: Path) -> bool:
    return (folder / SHARDED_INDEX).is_file()


def verify_checkpoint(folder: Path, env: DistEnv = SINGLE) -> str | None:
    """None when every file matches its recorded hash, else the reason; the ranks hash a share each and agree."""
    try:
        state = read_state(folder)
        expected = state.get("files", {})
        names = sorted(expected)
        problems = [f"file {name} is missing or does not match its recorded hash"
                    for name in names[env.rank::env.world_size]
                    if not (folder / name).is_file() or _sha256(folder / name) != expected[name]]
        if not names:
            problems.append(f"{STATE_FILE} lists no files")
        # Checkpoints written before state.json held its own hash stay readable, trusted as they were then.
        if STATE_HASH in state and state[STATE_HASH] != state_digest(state):
            problems.append(f"{STATE_FILE} was changed after it was written (its content does not match its "
                            "recorded hash)")
    except CheckpointError as exc:
        problems = [str(exc)]
    found = sorted({p for part in all_gather_object(problems, env) for p in part})
    return None if not found else f"Checkpoint {folder}: {'; '.join(found)}."


def read_checkpoint(folder: Path, verify: bool = True
                    ) -> tuple[dict, dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """A full-format checkpoint as (state, {module name: state dict}, optimizer-and-RNG tensors)."""
    if verify and (problem := verify_checkpoint(folder)):
        raise CheckpointError(problem)
    state = read_state(folder)
    if is_sharded(folder):
        raise CheckpointError(f"Checkpoint {folder} is sharded (written under FSDP); read it with read_sharded.")
    modules = {p.stem: load_file(str(p)) for p in folder.glob("*.safetensors") if p.name != OPTIMIZER_FILE}
    return state, modules, load_file(str(folder / OPTIMIZER_FILE))


def read_sharded(folder: Path, state: dict) -> None:
    """Fill `state` (nested dicts of tensors, plain or DTensor) in place from a sharded checkpoint, resharding to
    however many ranks load it (also a single process)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(folder), no_dist=not (dist.is_available() and dist.is_initialized()))
    except CheckpointException as exc:  # One (error, traceback) per failing rank.
        reasons = "; ".join(sorted({str(failure[0] if isinstance(failure, tuple) else failure)
                                    for failure in exc.failures.values()}))
        raise CheckpointError(f"Checkpoint {folder} does not fit this run's networks ({reasons}); it was written for "
                              "another configuration or version of onestep.") from None


def read_rng(folder: Path) -> dict[str, torch.Tensor]:
    """The `rng.*` tensors of either format, keys without the prefix."""
    path = folder / (RNG_FILE if is_sharded(folder) else OPTIMIZER_FILE)
    return {k[len("rng."):]: v for k, v in load_file(str(path)).items() if k.startswith("rng.")}


def find_latest_checkpoint(root: Path, warn=print, env: DistEnv = SINGLE) -> tuple[dict, Path] | None:
    """The newest checkpoint whose files all match their hashes, as (state, folder), or None; every rank agrees.

    A damaged newest checkpoint (truncated, corrupted, half-deleted, state.json edited) is reported through `warn`
    and skipped."""
    folders = broadcast_object(list_checkpoints(root), env)
    for index in reversed(range(len(folders))):
        problem = verify_checkpoint(folders[index], env)
        if problem is None:
            return read_state(folders[index]), folders[index]
        warn(f"Warning: {problem} " + ("Falling back to the previous checkpoint." if index else
                                       "No earlier checkpoint remains."))
    return None


def find_resume_checkpoint(root: Path, warn=print, env: DistEnv = SINGLE) -> tuple[dict, Path] | None:
    """The checkpoint a run resumes from (find_latest_checkpoint), or None when it has none.

    Damaged checkpoints newer than it are moved aside by rank 0 (`damaged-step-XXXXXXXX`), so that the run's new
    checkpoints, with lower step numbers, are not pruned in their favour. When every checkpoint is damaged the run
    does not start over silently: a CheckpointError says so."""
    latest = find_latest_checkpoint(root, warn, env)
    newer = [p for p in list_checkpoints(root) if latest is None or p.name > latest[1].name]
    if latest is None and newer:
        names = ", ".join(folder.name for folder in newer)
        raise CheckpointError(
            f"No usable checkpoint in {root}: {names} {'is' if len(newer) == 1 else 'are all'} damaged (see the "
            f"warnings above). To start this run over from step 0, move that folder away (e.g. `mv {root} "
            f"{root}.damaged`) and run the same command again; to keep the progress, restore the checkpoints from a "
            "copy.")
    if env.is_main:
        for folder in newer:
            aside = root / f"{DAMAGED_PREFIX}{folder.name}"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(folder, aside)
            warn(f"Note: moved the damaged {folder.name} aside to {aside}, so that it does not take the place of "
                 "the checkpoints this run writes; delete it once you no longer need it.")
    barrier(env)
    return latest
