"""Load EDM-format `.pkl` snapshots (EDM's and SiD's) without running any code from the file.

EDM pickles each network through `torch_utils.persistence`: every module is stored as a call to
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, where `meta` carries the module's source code, its class
name and its state (parameters, buffers, child modules and the constructor's `init_kwargs`). Unpickling such a file
normally `exec`s that source. Here a restricted unpickler resolves only a short list of globals, maps the persistence
hook to a function that merely records `class_name` and `state`, and refuses everything else before it can run. The
network is then rebuilt from our own classes and the recorded tensors are loaded into it.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import pickle
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ...errors import MissingFileError
from .precond import PRECOND_TYPES, EDMLoadError, _Precond, build_precond

try:  # numpy >= 2 moved the scalar constructor; pickles from numpy 1 still name the old module.
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # pragma: no cover
    from numpy.core.multiarray import scalar as _numpy_scalar


@dataclass
class _Record:
    """What the unpickler builds in place of a module: its class name and pickled state; nothing is executed."""

    class_name: str
    state: dict


class _ModuleDictRecord(_Record):
    """Stands in for `torch.nn.ModuleDict`, which EDM pickles as a plain object (its class, then its state)."""

    def __setstate__(self, state: dict) -> None:
        self.class_name = "ModuleDict"
        self.state = state


def _load_storage(data: bytes):
    """Stands in for `torch.storage._load_from_bytes`: the same bytes, read by torch's weights-only unpickler."""
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals an EDM network snapshot needs and refuses all others."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self._path = path
        self._allowed = {
            ("torch_utils.persistence", "_reconstruct_persistent_obj"): self._reconstruct,
            ("torch.nn.modules.container", "ModuleDict"): _ModuleDictRecord,
            ("torch.storage", "_load_from_bytes"): _load_storage,
            ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "scalar"): _numpy_scalar,
            ("numpy._core.multiarray", "scalar"): _numpy_scalar,
        }

    def find_class(self, module: str, name: str):
        allowed = self._allowed.get((module, name))
        if allowed is None:
            raise EDMLoadError(
                f"Refusing to load {self._path}: it references `{module}.{name}`, which is not part of an EDM "
                f"network snapshot, so nothing from the file was run. Only EDM/SiD snapshots can be loaded; if this "
                f"file should be one, re-export its network with EDM's own code in an environment you trust.")
        return allowed

    def _reconstruct(self, meta) -> _Record:
        """Our `_reconstruct_persistent_obj`: keep the class name and state, never the embedded source code."""
        if not (isinstance(meta, dict) and meta.get("type") == "class" and isinstance(meta.get("class_name"), str)
                and isinstance(meta.get("state"), dict)):
            raise EDMLoadError(f"{self._path} holds a persistent object in an unknown layout (expected EDM's "
                               f"torch_utils.persistence meta with type='class', class_name and state); is it an EDM "
                               f"snapshot?")
        return _Record(meta["class_name"], meta["state"])


def load_edm_snapshot(path: str | os.PathLike, key: str = "ema") -> _Precond:
    """The network stored under `key` of an EDM/SiD `.pkl` snapshot, rebuilt as our EDMPrecond/VPPrecond/VEPrecond.

    Nothing from the file is executed (see the module docstring). The result is in eval mode, on the CPU, in float32.
    Raises EDMLoadError naming the file when it references anything outside an EDM network snapshot, lacks `key`,
    or holds a network we do not support.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"EDM snapshot {path} does not exist; pass the path of a network-snapshot-*.pkl file.")
    with open(path, "rb") as file, warnings.catch_warnings():
        # torch's tensor rebuild helpers warn about TypedStorage, the type EDM's pickles store.
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        try:
            root = _RestrictedUnpickler(file, path).load()
        except EDMLoadError:
            raise
        except Exception as error:
            raise EDMLoadError(f"{path} could not be read as an EDM snapshot ({type(error).__name__}: {error}); check "
                               f"that it is an EDM/SiD network-snapshot .pkl and was copied completely.") from error
    record = _select(root, key, path)
    return _build(record, path)


def _select(root, key: str, path: str) -> _Record:
    """The record under `key` when the file holds a dict (EDM's layout), or the root when it is a bare network."""
    if isinstance(root, dict):
        if key not in root:
            raise EDMLoadError(f"{path} has no {key!r} entry (it has {sorted(map(str, root))}); pass one of those "
                               f"as key.")
        root = root[key]
    if not isinstance(root, _Record) or root.class_name not in PRECOND_TYPES:
        found = root.class_name if isinstance(root, _Record) else type(root).__name__
        raise EDMLoadError(f"{path}[{key!r}] holds a {found}, not one of {', '.join(PRECOND_TYPES)}; "
                           f"only these EDM preconditioned networks can be loaded.")
    return root


def _build(record: _Record, path: str) -> _Precond:
    """Our network for `record`: its `init_kwargs` first built on the meta device (no memory, no initialisation) and
    checked module by module and tensor by tensor against the file, then built for real and loaded. So a small file
    whose arguments describe a huge network is refused before that network takes any memory."""
    init_kwargs = record.state.get("_init_kwargs")
    if not isinstance(init_kwargs, dict):
        raise EDMLoadError(f"{path} does not record the constructor arguments of its {record.class_name}, so it cannot "
                           f"be rebuilt; re-export it with EDM's persistence enabled.")
    init_args = tuple(_plain(v) for v in record.state.get("_init_args") or ())
    kwargs = {k: _plain(v) for k, v in init_kwargs.items()}
    tensors, class_names = {}, {}
    _flatten(record, "", tensors, class_names, path)
    try:
        with torch.device("meta"), _at_most_modules(2 * len(class_names) + 16, path):
            skeleton = build_precond(record.class_name, kwargs, init_args)
    except ValueError as error:
        if isinstance(error, EDMLoadError):
            raise
        raise EDMLoadError(f"{path}: {error}") from error
    _check_layout(skeleton, tensors, class_names, path)
    net = build_precond(record.class_name, kwargs, init_args)  # Now as large as the tensors the file holds.
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise EDMLoadError(f"{path}: tensor shapes do not match the rebuilt network: {error}") from error
    return net.eval()


@contextlib.contextmanager
def _at_most_modules(limit: int, path: str):
    """Stop building a network once it registers more than `limit` modules: arguments such as a huge num_blocks would
    otherwise loop for hours, even on the meta device."""
    count = 0

    def count_module(module, name, submodule):
        nonlocal count
        count += 1
        if count > limit:
            raise EDMLoadError(f"{path}: its init_kwargs describe a network of more than {limit} modules, far more "
                               "than the file holds; the snapshot is damaged or not supported.")

    handle = torch.nn.modules.module.register_module_module_registration_hook(count_module)
    try:
        yield
    finally:
        handle.remove()


def _check_layout(net: _Precond, tensors: dict, class_names: dict, path: str) -> None:
    """The network rebuilt from the file's arguments has the file's modules and exactly its tensors, shape for
    shape."""
    ours = dict(net.named_modules())
    for name, class_name in class_names.items():
        if name not in ours or type(ours[name]).__name__ != class_name:
            found = type(ours[name]).__name__ if name in ours else "nothing"
            raise EDMLoadError(f"{path}: module {name or '<root>'} is a {class_name} in the snapshot but {found} in "
                               f"our rebuild of its init_kwargs; the snapshot's architecture is not supported.")
    state = net.state_dict()
    missing, unexpected = state.keys() - tensors.keys(), tensors.keys() - state.keys()
    if missing or unexpected:
        raise EDMLoadError(f"{path}: tensors do not match the network rebuilt from its init_kwargs (missing "
                           f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}); the snapshot is not "
                           f"supported.")
    wrong = [f"{name} {tuple(tensors[name].shape)} vs {tuple(ours.shape)}" for name, ours in state.items()
             if tuple(ours.shape) != tuple(tensors[name].shape)]
    if wrong:
        raise EDMLoadError(f"{path}: tensor shapes do not match the network rebuilt from its init_kwargs (file vs "
                           f"rebuild: {', '.join(wrong[:3])}); the snapshot is not supported.")


def _flatten(record: _Record, prefix: str, tensors: dict, class_names: dict, path: str) -> None:
    """Collect `record`'s parameters and persistent buffers as a flat state dict, and each module's class name."""
    class_names[prefix.rstrip(".")] = record.class_name
    state = record.state
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    named = [*(state.get("_parameters") or {}).items(),
             *((k, v) for k, v in (state.get("_buffers") or {}).items() if k not in non_persistent)]
    for name, value in named:
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise EDMLoadError(f"{path}: {prefix}{name} is a {type(value).__name__}, not a tensor; the file is damaged "
                               f"or not an EDM snapshot.")
        tensors[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, _Record):
            raise EDMLoadError(f"{path}: submodule {prefix}{name} is a {type(child).__name__}, which EDM networks "
                               f"never contain; the snapshot is not supported.")
        _flatten(child, f"{prefix}{name}.", tensors, class_names, path)


def _plain(value):
    """`value` with numpy scalars turned into Python numbers, so recorded arguments are plain data."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
