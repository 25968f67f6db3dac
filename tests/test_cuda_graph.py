"""train.cuda_graph: the step without host synchronisation (checked on the CPU, where it runs eagerly), and the
captured CUDA graph against the same step run eagerly (CUDA only)."""

from __future__ import annotations

import pytest
import torch

from onestep_cli.config import ConfigError, resolve_config
from onestep_cli.runtime.distributed import DistEnv
from onestep_cli.runs.networks import build_networks
from onestep_cli.engine.trainer import NonFiniteError, Trainer
from host_data import tensors_from_host_data
from poisoned_teacher import PoisonedTeacher

SMALL = ["generator.mlp.hidden_dim=32", "fake.mlp.hidden_dim=32", "train.batch_size=64", "eval.metrics=[]"]
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def trainer(*overrides, poisoned=None, device=CPU, precision="fp32") -> Trainer:
    config = resolve_config("gmm-sid", overrides=[*SMALL, *overrides])
    teacher = None
    if poisoned is not None:
        teacher = PoisonedTeacher(build_networks(config).teacher, poisoned).requires_grad_(False).eval()
    return Trainer(config, build_networks(config, teacher=teacher), device, precision)


def test_deferred_checks_train_like_the_eager_step_on_the_cpu():
    with pytest.warns(UserWarning, match="train.cuda_graph is set but the device is the CPU"):
        deferred = trainer("train.cuda_graph=true")
    eager = trainer()
    assert deferred.defer_checks and deferred.step_graph is None
    for _ in range(20):
        a, b = deferred.step(), eager.step()
    # Fused and per-tensor Adam round differently; after 20 steps both runs agree to a few parts in 1e5.
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-3, atol=1e-5), key
    for p, q in zip(deferred.generator.parameters(), eager.generator.parameters()):
        assert torch.allclose(p, q, rtol=1e-3, atol=1e-5)


def test_deferred_checks_skip_nonfinite_updates_on_the_device_and_count_them():
    run = trainer("train.cuda_graph=true", "train.tick_every=100", poisoned=lambda call: call in (3, 4))
    before = {}
    for step in range(1, 7):
        if step == 3:
            before = {k: v.clone() for k, v in run.generator.state_dict().items()}
            adam_steps = [s["step"].clone() for s in run.opt_generator.state.values()]
        run.step()
        if step == 4:  # Steps 3 and 4 changed neither the generator's weights nor Adam's moments and step count.
            for key, value in run.generator.state_dict().items():
                assert torch.equal(value, before[key]), key
            assert all(torch.equal(s["step"], t) for s, t in zip(run.opt_generator.state.values(), adam_steps))
    assert run.nonfinite_total == 2
    assert int(run._nonfinite_streak) == 0  # Reset by the good steps 5 and 6.
    assert any(not torch.equal(v, before[k]) for k, v in run.generator.state_dict().items())


def test_deferred_checks_stop_at_the_next_check_after_the_limit():
    run = trainer("train.cuda_graph=true", "train.tick_every=5", "train.max_consecutive_nonfinite=3",
                  poisoned=lambda call: call >= 2)
    for _ in range(4):  # Steps 2-4 are non-finite, but the host looks only every 5 steps.
        run.step()
    with pytest.raises(NonFiniteError, match=r"4 consecutive steps had NaN/inf .* \(steps 2-5, .*last checkpoint"):
        run.step()
    assert run.nonfinite_total == 4


def test_auto_captures_exactly_where_a_graph_can_apply_and_refuses_nothing():
    from onestep_cli.engine.switches import use_cuda_graph

    cuda, two = torch.device("cuda"), DistEnv(rank=0, world_size=2, local_rank=0)
    assert use_cuda_graph("auto", "bf16", DistEnv(), False, cuda)
    assert use_cuda_graph("auto", "fp32", DistEnv(), False, cuda)
    for precision, env, prompts_on_host, device in [("fp16", DistEnv(), False, cuda), ("bf16", two, False, cuda),
                                                    ("bf16", DistEnv(), True, cuda), ("fp32", DistEnv(), False, CPU)]:
        assert not use_cuda_graph("auto", precision, env, prompts_on_host, device)
    assert not use_cuda_graph("auto", "bf16", DistEnv(), False, cuda, parallelism="fsdp")
    assert not use_cuda_graph(False, "fp16", two, True, cuda)
    with pytest.raises(ConfigError, match="prompts' conditions exceed the 4 GiB kept on the GPU"):
        use_cuda_graph(True, "bf16", DistEnv(), True, cuda)


def test_auto_on_the_cpu_is_the_plain_eager_step_without_a_warning(recwarn):
    run = trainer("train.cuda_graph=auto")
    assert not run.defer_checks and run.step_graph is None
    run.step()
    assert not [w for w in recwarn if "cuda_graph" in str(w.message)]


@pytest.mark.parametrize("precision, env, overrides, reason", [
    ("fp16", DistEnv(), [], "fp16's GradScaler decides on the host"),
    ("fp32", DistEnv(rank=0, world_size=2, local_rank=0), [], "it runs one process, not 2"),
])
def test_cuda_graph_refuses_what_cannot_be_one_static_graph(precision, env, overrides, reason):
    config = resolve_config("gmm-sid", overrides=[*SMALL, "train.cuda_graph=true", *overrides])
    with pytest.raises(ConfigError, match=reason + r".*Set train.cuda_graph=false"):
        Trainer(config, build_networks(config), CPU, precision, env)


def edm_trainer(objective: str, graph: bool, augment_p: float, device, precision: str = "bf16") -> Trainer:
    """A Trainer on tiny random-init DDPM++ networks (augmentation labels of size 9, as EDM's CIFAR-10)."""
    from onestep_cli.bench.rows import build_network
    from onestep_cli.config import validate_config

    config = validate_config({
        "teacher": {"kind": "edm", "path": "random-init"},  # Never read: the networks are passed in.
        "generator": {"sigma_init": 2.5}, "objective": {"name": objective}, "fake": {"augment_p": augment_p},
        "train": {"batch_size": 8, "lr": 1e-4, "precision": precision, "device": device.type,
                  "fused_optimizer": True, "cuda_graph": graph},
        "eval": {"metrics": []}})
    networks = build_networks(config, teacher=build_network("ddpmpp-cifar10", tiny=True))
    return Trainer(config, networks, device, precision)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("objective, augment_p", [("sid", 0.0), ("dmd", 0.0), ("sid", 0.12)])
def test_captured_step_matches_the_eager_step_on_an_edm_network(objective, augment_p):
    cuda = torch.device("cuda")
    eager, graphed = (edm_trainer(objective, graph, augment_p, cuda) for graph in (False, True))
    assert graphed.step_graph is not None and eager.step_graph is None
    for step in range(6):
        torch.manual_seed(step)  # Dropout's masks: the same draws in both runs.
        a = eager.step()
        torch.manual_seed(step)
        b = graphed.step()
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), (step, key, a[key], b[key])
    assert graphed.step_graph.captured
    for p, q in zip(eager.generator.parameters(), graphed.generator.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6)


def test_the_captured_part_of_the_step_builds_no_tensor_from_host_data():
    # A CUDA graph cannot record a copy from host memory; tests/host_data.py finds such constructions on the CPU.
    run = edm_trainer("sid", True, 0.12, CPU, precision="fp32")
    sigmas = [torch.full((8,), 1.5), torch.full((8,), 2.0)]
    assert tensors_from_host_data(lambda: run._iteration([*sigmas, torch.ones(1)])) == []
