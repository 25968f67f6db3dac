"""Loading EDM-format `.pkl` snapshots: real layouts load, smuggled code is refused before it runs.

The snapshots are written here, without EDM's code, by a pickler that emits what EDM's `torch_utils.persistence`
emits: each module as `torch_utils.persistence._reconstruct_persistent_obj(meta)` with `meta` holding the module's
source, class name and state (including `_init_kwargs`), ModuleDicts as plain objects, tensors through torch's own
reducers, and numpy scalars where EDM has them. `tests/fixtures/edm_make_reference.py` checks the same loader on
snapshots pickled by EDM's real persistence module.
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import subprocess

import numpy as np
import pytest
import torch

from onestep_cli.denoisers.edm import EDMLoadError, convert_snapshot, load_edm_snapshot, load_edm_weights
from onestep_cli.denoisers.edm.layers import UNetBlock
from test_edm_networks import CONFIGS, build, make_inputs

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny convolutions run faster on one thread.


def _reconstruct_persistent_obj(meta):  # pragma: no cover - only its name is written, as EDM's hook
    raise AssertionError("never called")


class _EDMStylePickler(pickle._Pickler):
    """Pickles our modules in EDM's persistence format, naming EDM's hook without importing EDM."""

    def __init__(self, file, module_src: str = "# EDM's networks.py source would be here\n", class_names=None):
        super().__init__(file, protocol=4)
        self.module_src = module_src
        self.class_names = class_names or {}

    def reducer_override(self, obj):
        if isinstance(obj, torch.nn.Module) and not isinstance(obj, torch.nn.ModuleDict):
            state = dict(obj.__dict__)
            state["_init_args"] = ()
            state["_init_kwargs"] = dict(getattr(obj, "init_kwargs", {}))
            if isinstance(obj, UNetBlock):
                state["skip_scale"] = np.float64(obj.skip_scale)  # EDM stores np.sqrt(0.5) here
            class_name = self.class_names.get(type(obj).__name__, type(obj).__name__)
            meta = dict(type="class", version=6, module_src=self.module_src, class_name=class_name, state=state)
            return _reconstruct_persistent_obj, (meta,)
        return NotImplemented

    def save(self, obj, save_persistent_id=True):
        if obj is _reconstruct_persistent_obj:
            self.write(pickle.GLOBAL + b"torch_utils.persistence\n_reconstruct_persistent_obj\n")
            return
        super().save(obj, save_persistent_id)


def write_snapshot(path, data, **pickler_kwargs):
    """Write `data` (a dict holding our modules) to `path` the way EDM's training loop pickles snapshots."""
    buffer = io.BytesIO()
    _EDMStylePickler(buffer, **pickler_kwargs).dump(data)
    path.write_bytes(buffer.getvalue())
    return path


class _Persistent:
    """A non-network persistent object, as EDM stores its loss function and augmentation pipeline."""

    def __init__(self, class_name, state):
        self.class_name, self.state = class_name, state

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src="", class_name=self.class_name, state=self.state)
        return _reconstruct_persistent_obj, (meta,)


class _Smuggle:
    """Unpickles as `func(*args)`: the classic pickle exploit."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def training_snapshot(net):
    """The dict EDM's training loop pickles: the network plus loss, augmentation pipe and dataset arguments."""
    return dict(ema=net, loss_fn=_Persistent("EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)),
                augment_pipe=_Persistent("AugmentPipe", dict(p=0.12, xflip=1e8)),
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="cifar10.zip"))


@pytest.mark.parametrize("name", ["ddpmpp_cond_aug_vp", "ncsnpp_uncond_ve", "adm_cond_aug_edm"])
def test_snapshot_loads_and_matches_source(name, tmp_path):
    net = build(name)
    marker = tmp_path / "source-ran"
    # The embedded source would create a marker if anything executed it.
    path = write_snapshot(tmp_path / "network-snapshot.pkl", training_snapshot(net),
                          module_src=f"open({str(marker)!r}, 'w').close()\n")
    loaded = load_edm_snapshot(path)
    assert type(loaded) is type(net) and not loaded.training
    assert loaded.init_kwargs == net.init_kwargs
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    inputs = make_inputs(name)
    assert torch.equal(loaded(**inputs), net(**inputs))
    assert not marker.exists()


def test_bare_network_pickle_loads(tmp_path):
    net = build("adm_uncond_edm")
    loaded = load_edm_snapshot(write_snapshot(tmp_path / "net.pkl", net))
    inputs = make_inputs("adm_uncond_edm")
    assert torch.equal(loaded(**inputs), net(**inputs))


def test_convert_snapshot_round_trip(tmp_path):
    net = build("ncsnpp_skip_cond_edm")
    out_dir = convert_snapshot(write_snapshot(tmp_path / "snap.pkl", training_snapshot(net)), tmp_path / "export")
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "model.safetensors"]
    inputs = make_inputs("ncsnpp_skip_cond_edm")
    assert torch.equal(load_edm_weights(out_dir)(**inputs), net(**inputs))


SMUGGLED = {
    "os.system": lambda marker: _Smuggle(os.system, f"touch {marker}"),
    "builtins.eval": lambda marker: _Smuggle(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
    "builtins.exec": lambda marker: _Smuggle(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
    "subprocess.Popen": lambda marker: _Smuggle(subprocess.Popen, ["touch", str(marker)]),
}


def _global_name(smuggle: _Smuggle) -> str:
    return f"{smuggle.func.__module__}.{smuggle.func.__qualname__}"


@pytest.mark.parametrize("where", ["before_network", "inside_init_kwargs", "after_network"])
@pytest.mark.parametrize("kind", SMUGGLED)
def test_smuggled_callable_is_refused_before_it_runs(kind, where, tmp_path):
    marker = tmp_path / "pwned"
    smuggle = SMUGGLED[kind](marker)
    net = build("ddpmpp_uncond_edm")
    if where == "inside_init_kwargs":
        net.init_kwargs = dict(net.init_kwargs, dropout=smuggle)
        data = training_snapshot(net)
    elif where == "before_network":
        data = dict(payload=smuggle, **training_snapshot(net))
    else:
        data = dict(training_snapshot(net), payload=smuggle)
    path = write_snapshot(tmp_path / "evil.pkl", data)

    with pytest.raises(EDMLoadError) as error:
        load_edm_snapshot(path)
    assert f"`{_global_name(smuggle)}`" in str(error.value) and str(path) in str(error.value)
    assert not marker.exists()


def test_torch_module_class_is_refused(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(dict(ema=torch.nn.Linear(2, 2))))
    with pytest.raises(EDMLoadError, match=r"`torch\.nn\.modules\.linear\.Linear`"):
        load_edm_snapshot(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_code_inside_tensor_bytes_is_refused(tmp_path):
    # EDM stores tensor data as torch.save bytes; ours reads them with torch's weights-only unpickler.
    marker = tmp_path / "pwned"
    inner = pickle.dumps(_Smuggle(os.system, f"touch {marker}"))
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(dict(ema=_Smuggle(torch.storage._load_from_bytes, inner))))
    with pytest.raises(EDMLoadError, match="could not be read as an EDM snapshot"):
        load_edm_snapshot(path)
    assert not marker.exists()


def test_missing_key_and_unsupported_class_are_explained(tmp_path):
    net = build("adm_uncond_edm")
    path = write_snapshot(tmp_path / "snap.pkl", training_snapshot(net))
    with pytest.raises(EDMLoadError, match=r"no 'G_ema' entry .*'augment_pipe', 'dataset_kwargs', 'ema', 'loss_fn'"):
        load_edm_snapshot(path, key="G_ema")
    with pytest.raises(EDMLoadError, match="holds a EDMLoss, not one of EDMPrecond, VPPrecond, VEPrecond"):
        load_edm_snapshot(path, key="loss_fn")

    renamed = write_snapshot(tmp_path / "iddpm.pkl", dict(ema=net), class_names={"EDMPrecond": "iDDPMPrecond"})
    with pytest.raises(EDMLoadError, match="iDDPMPrecond"):
        load_edm_snapshot(renamed)


def test_layout_mismatch_is_explained(tmp_path):
    net = build("adm_uncond_edm")
    net.init_kwargs = dict(net.init_kwargs, num_blocks=2)  # recorded arguments no longer match the tensors
    with pytest.raises(EDMLoadError, match="not supported"):
        load_edm_snapshot(write_snapshot(tmp_path / "snap.pkl", dict(ema=net)))


def test_not_a_pickle_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_edm_snapshot(tmp_path / "nope.pkl")
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"not a pickle at all")
    with pytest.raises(EDMLoadError, match="junk.pkl could not be read as an EDM snapshot"):
        load_edm_snapshot(junk)


def test_every_config_round_trips(tmp_path):
    for name in CONFIGS:
        net = build(name)
        loaded = load_edm_snapshot(write_snapshot(tmp_path / f"{name}.pkl", training_snapshot(net)))
        inputs = make_inputs(name)
        assert torch.equal(loaded(**inputs), net(**inputs)), name
