"""train.compile, train.cuda_graph and train.channels_last at `auto` (engine/switches.py): what they resolve to for
each kind of run, the one line a run prints about it, run.json's record, the presets that set them, the compile
cache under ONESTEP_HOME and `onestep bench`'s report. CPU only: the CUDA cases are the pure resolution function's."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from onestep_cli.config import ConfigError, list_presets, resolve_config
from onestep_cli.denoisers.blocks import network_family
from onestep_cli.engine.switches import resolve_switches
from onestep_cli.runtime import compile_cache

AUTO = dict(compile="auto", cuda_graph="auto", channels_last="auto")
CPU_REASON = "the device is the CPU (they are CUDA settings)"


def resolved(device="cuda", world_size=1, parallelism="ddp", precision="bf16", family="edm_unet", **settings):
    switches = resolve_switches(**{**AUTO, **settings}, device_type=device, precision=precision, family=family,
                                world_size=world_size, parallelism=parallelism)
    return (switches.compile, switches.cuda_graph, switches.channels_last), switches.reasons


@pytest.mark.parametrize("device, world_size, parallelism, precision, family, expected, off_reasons", [
    # One CUDA device: EDM U-Nets get all three, in bf16 and in fp32 (the CIFAR-10 presets).
    ("cuda", 1, "ddp", "bf16", "edm_unet", (True, True, True), {}),
    ("cuda", 1, "ddp", "fp32", "edm_unet", (True, True, True), {}),
    # Transformers stay eager until the tracking check has passed compile and the graph on every one of them;
    # U-Nets of diffusers and MLPs: graph only.
    ("cuda", 1, "ddp", "bf16", "diffusers_transformer", (False, False, False),
     {"compile": "not yet verified by the tracking check on every diffusers transformer",
      "cuda_graph": "not yet verified by the tracking check on every diffusers transformer",
      "channels_last": "not 4-D"}),
    ("cuda", 2, "ddp", "bf16", "diffusers_transformer", (False, False, False),
     {"compile": "not yet verified", "cuda_graph": "one process, not 2"}),
    ("cuda", 1, "ddp", "bf16", "diffusers_unet", (False, True, False), {"compile": "not measured on diffusers U-Nets"}),
    ("cuda", 1, "ddp", "fp32", "mlp", (False, True, False), {"channels_last": "not measured on MLP denoisers"}),
    # Where the graph cannot apply, EDM U-Nets stay eager: compile gains nothing without it, NHWC is slower eagerly.
    ("cuda", 2, "ddp", "bf16", "edm_unet", (False, False, False),
     {"cuda_graph": "one process, not 2", "compile": "compile gains nothing", "channels_last": "eagerly 33% slower"}),
    ("cuda", 1, "ddp", "fp16", "edm_unet", (False, False, False), {"cuda_graph": "GradScaler decides on the host"}),
    ("cuda", 4, "fsdp", "bf16", "diffusers_transformer", (False, False, False),
     {"cuda_graph": "FSDP gathers and frees shards", "compile": "not yet verified by the tracking check"}),
    ("cuda", 4, "fsdp", "bf16", "edm_unet", (False, False, False), {"cuda_graph": "FSDP"}),
    # Anything but CUDA: eager, whatever the network (CI's runs stay as they were).
    ("cpu", 1, "ddp", "fp32", "edm_unet", (False, False, False), {name: CPU_REASON for name in AUTO}),
    ("cpu", 2, "ddp", "fp32", "diffusers_transformer", (False, False, False), {"compile": CPU_REASON}),
    ("mps", 1, "ddp", "fp32", "edm_unet", (False, False, False), {"compile": "the device is a mps device"}),
])
def test_auto_resolves_per_device_processes_sharding_precision_and_network(device, world_size, parallelism,
                                                                           precision, family, expected, off_reasons):
    switches, reasons = resolved(device, world_size, parallelism, precision, family)
    assert switches == expected
    for name, phrase in off_reasons.items():
        assert phrase in reasons[name]
    on = {name for name, value in zip(AUTO, switches) if value}
    assert not on & set(reasons)  # A reason only for a switch that is off.


def test_explicit_true_and_false_override_auto():
    assert resolved("cpu", compile=True, channels_last=True)[0] == (True, False, True)  # As asked (CPU ignores NHWC).
    (compile_, graph, nhwc), reasons = resolved("cuda", compile=False)
    assert (compile_, graph, nhwc) == (False, True, False) and reasons["compile"] == "train.compile=false"
    assert resolved("cuda", cuda_graph=False)[0] == (False, False, False)  # EDM: compile and NHWC follow the graph.
    assert resolved("cuda", 2, compile=True, channels_last=True)[0] == (True, False, True)
    assert resolved("cuda", family="diffusers_unet", compile=True)[0] == (True, True, False)
    assert resolved("cuda", family="diffusers_transformer", compile=True, cuda_graph=True)[0] == (True, True, False)
    with pytest.raises(ConfigError, match=r"train.cuda_graph is set, but it runs one process, not 2"):
        resolved("cuda", 2, cuda_graph=True)


def test_a_compile_probe_that_fails_turns_auto_compile_off_with_its_reason():
    switches = resolve_switches(**AUTO, device_type="cuda", precision="bf16", family="edm_unet",
                                compile_failure="BackendCompilerFailed: no Triton")
    assert (switches.compile, switches.cuda_graph, switches.channels_last) == (False, True, False)
    assert switches.reasons["compile"] == "torch.compile does not work here (BackendCompilerFailed: no Triton)"


def test_the_engine_line_names_each_switch_and_why_one_is_off():
    fsdp = resolve_switches("auto", "auto", "auto", device_type="cuda", precision="bf16", world_size=2,
                            parallelism="fsdp", family="diffusers_transformer")
    assert fsdp.describe() == (
        "engine: compile off, CUDA graph off, channels_last off. compile off: not yet verified by the tracking check "
        "on every diffusers transformer (docs/benchmarks.md); true turns it on. "
        "CUDA graph off: FSDP gathers and frees shards from the host around every block (use "
        "train.parallelism=ddp); it runs one process, not 2 (drop --gpus or the launcher). channels_last off: a "
        "transformer's activations are not 4-D images.")
    one_gpu = resolve_switches("auto", "auto", "auto", device_type="cuda", precision="bf16",
                               family="diffusers_transformer")
    assert one_gpu.describe().startswith(
        "engine: compile off, CUDA graph off, channels_last off. compile and CUDA graph off: not yet verified by "
        "the tracking check on every diffusers transformer")
    fast = resolve_switches("auto", "auto", "auto", device_type="cuda", precision="bf16", family="edm_unet")
    assert fast.describe() == "engine: compile on, CUDA graph on, channels_last on."
    cpu = resolve_switches("auto", "auto", "auto", device_type="cpu", precision="fp32", family="edm_unet")
    assert cpu.describe() == f"engine: compile off, CUDA graph off, channels_last off: {CPU_REASON}."
    assert cpu.record() == {"compile": False, "cuda_graph": False, "channels_last": False, "network": "edm_unet",
                            "reasons": {name: CPU_REASON for name in AUTO}}


def test_network_families_are_told_apart_by_the_modules_a_network_holds():
    from onestep_cli.bench.rows import build_network
    from onestep_cli.denoisers.mlp import MLPDenoiser

    def named(name):
        return type(name, (torch.nn.Module,), {})()

    assert network_family(build_network("ddpmpp-cifar10", tiny=True)) == "edm_unet"
    assert network_family(MLPDenoiser(2)) == "mlp"
    assert network_family(torch.nn.Sequential(named("UNet2DConditionModel"))) == "diffusers_unet"
    assert network_family(torch.nn.Sequential(named("PixArtTransformer2DModel"))) == "diffusers_transformer"
    assert network_family(torch.nn.Linear(2, 2)) == "other"


def test_every_image_preset_leaves_the_switches_to_auto_and_gmm_keeps_them_off():
    for name in list_presets():
        train = resolve_config(name).train
        switches = (train.compile, train.cuda_graph, train.channels_last)
        assert switches == ((False,) * 3 if name.startswith("gmm-") else ("auto",) * 3), name


def test_a_switch_given_another_value_is_refused_naming_the_key(cli):
    result = cli.invoke("distill", "--preset", "digits-sim", "--set", "train.compile=yes please", "--dry-run")
    assert result.exit_code == 2
    assert "Key 'train.compile' has value 'yes please': expected true, false or auto" in " ".join(result.output.split())


@pytest.fixture
def clean_compile_cache(monkeypatch, tmp_path):
    """ONESTEP_HOME in tmp_path, TORCHINDUCTOR_CACHE_DIR unset; both (and inductor's switches) restored afterwards."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("ONESTEP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(compile_cache.CACHE_DIR_ENV, "restored afterwards")  # Recorded, so that undo restores it...
    monkeypatch.delenv(compile_cache.CACHE_DIR_ENV)  # ...even after the code under test sets it.
    saved = []
    for module, name, forcing_env in compile_cache.CACHE_SWITCHES:
        config = functorch_config if module.startswith("torch._functorch") else inductor_config
        saved.append((config, name, getattr(config, name)))
        setattr(config, name, False)
        if forcing_env:
            monkeypatch.delenv(forcing_env, raising=False)
    yield tmp_path / "home"
    for config, name, value in saved:  # torch's config modules are restored by assignment, not by monkeypatch.
        setattr(config, name, value)


def test_compiled_kernels_are_cached_under_onestep_home(clean_compile_cache):
    import torch._inductor.config as inductor_config

    folder = compile_cache.use_persistent_compile_cache()
    assert folder == clean_compile_cache / "inductor" and folder.is_dir()
    assert os.environ[compile_cache.CACHE_DIR_ENV] == str(folder)
    assert inductor_config.fx_graph_cache and inductor_config.autotune_local_cache


def test_a_users_own_inductor_cache_is_kept(clean_compile_cache, monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.CACHE_DIR_ENV, str(tmp_path / "mine"))
    assert compile_cache.use_persistent_compile_cache() == tmp_path / "mine"
    assert os.environ[compile_cache.CACHE_DIR_ENV] == str(tmp_path / "mine")
    assert not (clean_compile_cache / "inductor").exists()


def test_a_run_says_once_what_auto_chose_and_records_it_in_run_json(cli, tmp_path):
    run = tmp_path / "run"
    result = cli.invoke("distill", "--preset", "digits-sim", "--set", "train.max_steps=2", "--set",
                        "train.batch_size=8", "--set", "train.tick_every=1", "--set", "eval.metrics=[]", "--out", run)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("engine:")]
    assert lines == [f"engine: compile off, CUDA graph off, channels_last off: {CPU_REASON}."]
    engine = json.loads((run / "run.json").read_text())["engine"]
    assert engine["network"] == "edm_unet" and not any(engine[name] for name in AUTO)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["compile"] == "auto"  # The request, as given.


def test_a_compiling_run_shows_it_and_records_the_cache_and_old_runs_resume_under_auto(cli, tmp_path, monkeypatch,
                                                                                       clean_compile_cache):
    """The first step's compilation is announced and timed; run.json names the cache. A run written before the
    switches had `auto` (compile false) resumes with them changed: they do not change the training maths."""
    import onestep_cli.engine.trainer as trainer_module

    compiled = []

    def compile_blocks(networks, device, eager=()):  # torch.compile takes minutes here; sets the cache as it.
        compile_cache.use_persistent_compile_cache()
        compiled.append(len(networks))
        return True

    monkeypatch.setattr(trainer_module, "compile_blocks", compile_blocks)
    run = tmp_path / "run"
    gmm = ["distill", "--preset", "gmm-sim", "--set", "train.tick_every=1", "--set", "eval.metrics=[]", "--out", run]
    first = cli.invoke(*gmm, "--set", "train.max_steps=1")
    assert first.exit_code == 0 and not compiled and "engine:" not in first.stderr  # Nothing left to auto: no line.
    result = cli.invoke(*gmm, "--set", "train.max_steps=2", "--set", "train.compile=true",
                        "--set", "train.channels_last=auto", "--set", "train.cuda_graph=auto")
    assert result.exit_code == 0, result.output
    stderr = result.stderr
    assert "Resuming" in stderr and compiled == [3]
    assert [line for line in stderr.splitlines() if line.startswith("engine:")] == [
        f"engine: compile on, CUDA graph off, channels_last off. CUDA graph and channels_last off: {CPU_REASON}."]
    assert "compiling the networks' blocks in the first step" in stderr and "compiled: the first step took" in stderr
    assert stderr.index("compiling the networks'") < stderr.index("compiled: the first step") < stderr.index("loss_gen")
    engine = json.loads((run / "run.json").read_text())["engine"]
    assert engine["compile"] and engine["compile_cache"] == str(clean_compile_cache / "inductor")

