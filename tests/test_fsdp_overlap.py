"""train.fsdp_reshard_after_forward and train.fsdp_prefetch: how FSDP2's all-gathers overlap with compute.

Neither changes the maths. Resharding or keeping a block's gathered parameters, or gathering them earlier, moves the
same bits: the all-gather concatenates the shards (no arithmetic), forward and backward then run the same kernels on
the same tensors in the same order, and the gradients' reduce-scatters are untouched. So on two gloo processes the
losses, gradient norms and weights match the default bitwise, not only to float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from onestep_cli.config import ConfigError, resolve_config, validate_config
from onestep_cli.engine.parallel import check_reshard_after_forward, prefetch_plan
from onestep_cli.runs.run_dir import resumable

STEPS = 3
TOLERANCE = 1e-5  # Against one process: two sum the batch's gradients in another order (test_distributed.py's).
# (train.fsdp_reshard_after_forward, train.fsdp_prefetch); the first is the default the others are compared with.
SETTINGS = [(True, 0), (False, 0), (True, 2), (False, 1)]


def tiny_teacher(folder: Path) -> Path:
    """A class-free EDM SongUNet on 8x8x1 images with 5 U-Net blocks (the units FSDP shards and prefetches)."""
    from onestep_cli.denoisers.edm import build_precond, save_edm_weights

    torch.manual_seed(0)
    teacher = build_precond("EDMPrecond", dict(img_resolution=8, img_channels=1, model_type="SongUNet",
                                               model_channels=4, channel_mult=[1], num_blocks=1,
                                               attn_resolutions=[], dropout=0.0))
    return save_edm_weights(teacher, folder)


def config_for(teacher: Path, reshard_after_forward, prefetch: int):
    # DMD2's order (generator first, then fake updates whose samples come from no_grad forwards) with an EMA: forwards
    # that no backward follows, which leave gathered parameters behind under false (and always for the root).
    return validate_config({
        "teacher": {"kind": "edm", "path": str(teacher)},
        "objective": {"name": "dmd"},
        "train": {"batch_size": 4, "parallelism": "fsdp", "fake_updates_per_step": 2,
                  "update_order": "generator_first", "ema_halflife_kimg": 0.001,
                  "fsdp_reshard_after_forward": reshard_after_forward, "fsdp_prefetch": prefetch},
        "eval": {"metrics": []}})


def train(config, env=None, parallelism: str = "ddp"):
    """STEPS steps of a Trainer on the CPU; returns it and its statistics."""
    from onestep_cli.engine.trainer import Trainer
    from onestep_cli.runs.networks import build_networks
    from onestep_cli.runtime.distributed import SINGLE

    trainer = Trainer(config, build_networks(config), torch.device("cpu"), "fp32", env or SINGLE, parallelism)
    return trainer, [{key: value.item() for key, value in trainer.step().items()} for _ in range(STEPS)]


def full_weights(trainer) -> dict[str, list]:
    """Generator, fake score and EMA parameters as nested lists (gathered from their shards under FSDP)."""
    from torch.distributed.tensor import DTensor

    return {name: [(p.full_tensor() if isinstance(p, DTensor) else p).tolist() for p in module.parameters()]
            for name, module in (("generator", trainer.generator), ("fake", trainer.fake), ("ema", trainer.ema.module))}


def train_each_setting(rank: int, folder: Path) -> None:
    """One rank of the group: a few steps under every setting; rank 0 writes what each gave."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from onestep_cli.engine.loop import engine_record
    from onestep_cli.runtime.distributed import current

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=2)
    prefetches = []  # (blocks prefetched in forward, in backward) as shard() asks FSDP2 for them.
    forward_prefetch, backward_prefetch = (FSDPModule.set_modules_to_forward_prefetch,
                                           FSDPModule.set_modules_to_backward_prefetch)
    FSDPModule.set_modules_to_forward_prefetch = lambda self, modules: (
        prefetches.append(("forward", len(modules))), forward_prefetch(self, modules))
    FSDPModule.set_modules_to_backward_prefetch = lambda self, modules: (
        prefetches.append(("backward", len(modules))), backward_prefetch(self, modules))
    results = []
    for reshard_after_forward, prefetch in SETTINGS:
        prefetches.clear()
        config = config_for(folder / "teacher", reshard_after_forward, prefetch)
        trainer, stats = train(config, current(), "fsdp")
        weights = full_weights(trainer)
        trainer.generator(torch.zeros(1, 1, 8, 8), None).sum()  # A forward with grad, its backward not yet run.
        first_block = next(m for m in trainer.generator.modules() if isinstance(m, FSDPModule)
                           and m is not trainer.generator)
        kept_gathered = not isinstance(next(first_block.parameters()), DTensor)
        results.append({"stats": stats, "weights": weights, "kept_gathered": kept_gathered,
                        "prefetches": prefetches[:], "engine": engine_record(trainer)})
        del trainer
    if rank == 0:
        (folder / "results.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.mark.e2e
def test_fsdp_overlap_settings_train_bitwise_as_the_default_on_two_processes(tmp_path, one_thread):
    tiny_teacher(tmp_path / "teacher")
    # The default itself trains what one process trains: every parameter, the roots' included, in every update (the
    # fake score's root kept the frozen state of the generator update while FSDP2 kept it gathered).
    one_process = full_weights(train(config_for(tmp_path / "teacher", True, 0))[0])
    # Forked, the workers start with this process's modules already imported (one intra-op thread: fork-safe).
    mp.start_processes(train_each_setting, args=(tmp_path,), nprocs=2, start_method="fork")
    results = json.loads((tmp_path / "results.json").read_text())
    default = results[0]
    for name, parameters in one_process.items():
        for index, (expected, got) in enumerate(zip(parameters, default["weights"][name])):
            difference = (torch.tensor(expected) - torch.tensor(got)).abs().max().item()
            assert difference <= TOLERANCE, f"{name} parameter {index} differs by {difference}"
    assert default["engine"]["fsdp"] == {"reshard_after_forward": True, "prefetch": 0} and not default["prefetches"]
    assert not default["kept_gathered"]
    assert len(default["stats"]) == STEPS and default["stats"][-1]["loss_generator"] != 0
    for (reshard_after_forward, prefetch), result in zip(SETTINGS[1:], results[1:]):
        setting = f"reshard_after_forward={reshard_after_forward}, prefetch={prefetch}"
        assert result["stats"] == default["stats"], setting
        assert result["weights"] == default["weights"], setting
        assert result["engine"]["fsdp"] == {"reshard_after_forward": reshard_after_forward, "prefetch": prefetch}
        assert result["kept_gathered"] == (not reshard_after_forward), setting
        # Each of the 4 sharded networks (generator, fake, EMA, teacher) asks for both directions once per block.
        calls = result["prefetches"]
        assert len(calls) == (4 * 2 * 5 if prefetch else 0), setting
        assert max((count for _, count in calls), default=0) == prefetch, setting


def test_prefetch_plan_names_the_next_blocks_in_forward_and_the_previous_in_backward():
    assert prefetch_plan(4, 1) == [([1], []), ([2], [0]), ([3], [1]), ([], [2])]
    assert prefetch_plan(4, 2) == [([1, 2], []), ([2, 3], [0]), ([3], [1, 0]), ([], [2, 1])]
    assert prefetch_plan(1, 3) == [([], [])]


@pytest.mark.parametrize("override, message", [
    ("train.fsdp_reshard_after_forward=1", "Key 'train.fsdp_reshard_after_forward' has value 1: 1 would reshard to "
                                           "one process, which is false"),
    ("train.fsdp_reshard_after_forward=auto", "Key 'train.fsdp_reshard_after_forward' has value 'auto': expected "
                                              "true, false or a number of processes"),
    ("train.fsdp_reshard_after_forward=0", "has value 0: expected true, false or a number of processes"),
    ("train.fsdp_prefetch=-1", "Key 'train.fsdp_prefetch' has value -1: Input should be greater than or equal to 0"),
    ("train.fsdp_prefetch=true", "Key 'train.fsdp_prefetch' has value True: Input should be a valid integer"),
])
def test_bad_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config("gmm-sid", overrides=[override])


def test_a_group_size_must_divide_the_processes_and_both_keys_may_change_on_resume():
    train = resolve_config("gmm-sid", overrides=["train.fsdp_reshard_after_forward=4"]).train
    assert train.fsdp_reshard_after_forward == 4
    check_reshard_after_forward(4, 8)
    check_reshard_after_forward(8, 8)  # FSDP2 reads the whole group as true.
    with pytest.raises(ConfigError, match=r"train.fsdp_reshard_after_forward=3 must divide the 8 processes .* use a "
                                          r"divisor of 8 such as 4 \(the GPUs of one node\), true"):
        check_reshard_after_forward(3, 8)
    with pytest.raises(ConfigError, match="=4 must divide the 2 processes into groups to reshard to after forward; "
                                          "use true"):
        check_reshard_after_forward(4, 2)
    assert resumable("train.fsdp_reshard_after_forward") and resumable("train.fsdp_prefetch")


def test_the_launcher_refuses_a_group_size_before_starting_any_worker(cli, tmp_path):
    result = cli.invoke("distill", "--preset", "gmm-sid", "--gpus", "4", "--set", "train.parallelism=fsdp",
                        "--set", "train.fsdp_reshard_after_forward=3", "--out", tmp_path / "run")
    assert result.exit_code == 2 and not (tmp_path / "run").exists()
    assert "train.fsdp_reshard_after_forward=3 must divide the 4 processes" in " ".join(result.stderr.split())


def test_an_unsharded_run_says_once_that_it_ignores_them(cli, tmp_path, one_thread):
    run = tmp_path / "run"
    result = cli.invoke("distill", "--preset", "gmm-sid", "--set", "train.max_steps=1", "--set", "eval.metrics=[]",
                        "--set", "train.fsdp_reshard_after_forward=false", "--set", "train.fsdp_prefetch=2",
                        "--out", run)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "fsdp" in line]
    assert notes == ["engine: train.fsdp_reshard_after_forward=false and train.fsdp_prefetch=2 ignored: the networks "
                     "are not sharded (one process); they apply under train.parallelism=fsdp on several processes."]
    assert "fsdp" not in json.loads((run / "run.json").read_text())["engine"]
    quiet = cli.invoke("distill", "--preset", "gmm-sid", "--set", "train.max_steps=1", "--set", "eval.metrics=[]",
                       "--out", tmp_path / "default")
    assert quiet.exit_code == 0 and "fsdp" not in quiet.stderr
