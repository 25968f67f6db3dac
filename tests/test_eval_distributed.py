"""`onestep eval --gpus 2` on CPU: two gloo processes under torch.distributed.run share the images of image metrics.

Each process generates (or reads) a contiguous run of whole batches and extracts their features; rank 0 gathers them in
seed order and computes the metrics, which must equal the one-process result: the same values, seeds and provenance,
except `processes`. Only rank 0 prints, so `--json` is still one JSON object, and an error on rank 1 is reported once.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from onestep_cli.eval.image_eval import shard_bounds

METRICS = "fd_digits,class_accuracy"
BATCH = 8  # Small batches, so that 40 images make 5 batches to split (3 + 2) and 41 make 6 (3 + 3, the last of 1).

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def evaluate(cli, source: Path, *args, gpus: int = 1, batch: int = BATCH) -> dict:
    """Two processes through the console script; the one-process reference in this process (on one thread, as each
    worker), where a new interpreter would add only its start-up."""
    command = ["eval", source, "--metrics", METRICS, "--batch", batch, *args, "--gpus", gpus, "--json"]
    if gpus == 1:
        result = cli.invoke(*command)
        assert result.exit_code == 0, result.output
    else:
        result = cli.run(*command)
    assert result.stdout.lstrip().startswith("{")
    return json.loads(result.stdout)  # Raises on anything besides exactly one JSON value.


def without_processes(result: dict) -> dict:
    result = copy.deepcopy(result)
    del result["provenance"]["common"]["processes"]
    del result["metrics"]  # Compared to 1e-12 instead.
    return result


def assert_same_result(one: dict, two: dict) -> None:
    assert one["provenance"]["common"]["processes"] == 1 and two["provenance"]["common"]["processes"] == 2
    assert one["metrics"].keys() == two["metrics"].keys() == set(METRICS.split(","))
    for name, value in one["metrics"].items():
        assert abs(two["metrics"][name] - value) <= 1e-12, (name, value, two["metrics"][name])
    assert without_processes(two) == without_processes(one)


@pytest.fixture(scope="module")
def run(cli, tmp_path_factory) -> Path:
    """A digits run two steps into training: a class-conditional 8x8 image generator (a batch of 8: what is shared out
    here is evaluation, not training)."""
    out = tmp_path_factory.mktemp("digits") / "run"
    cli.run("distill", "--preset", "digits-sim", "--set", "train.max_steps=2", "--set", "train.batch_size=8",
            "--out", out)
    return out


@pytest.fixture(scope="module")
def folder(cli, run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples") / "folder"
    assert cli.invoke("sample", run, "--num", 41, "--out", out).exit_code == 0
    return out


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("num, batch", [(41, BATCH), (40, 64)])  # Uneven shares; 64: one batch, rank 1 has none.
def test_two_processes_generate_and_measure_what_one_process_does(cli, run, num, batch):
    one = evaluate(cli, run, "--num", num, batch=batch)
    two = evaluate(cli, run, "--num", num, gpus=2, batch=batch)
    assert_same_result(one, two)
    assert two["provenance"]["common"]["seeds"] == f"0-{num - 1}"
    assert two["provenance"]["fd_digits"]["seeds"] == f"0-{num - 1}"
    assert two["provenance"]["common"]["num_samples"] == num


@pytest.mark.slow
@pytest.mark.e2e
def test_a_folder_of_images_is_split_the_same_way(cli, folder):
    assert_same_result(evaluate(cli, folder), evaluate(cli, folder, gpus=2))


@pytest.mark.slow
@pytest.mark.e2e
def test_an_unreadable_image_of_rank_1_is_reported_once_by_rank_0(cli, folder, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for image in folder.iterdir():
        (broken / image.name).write_bytes(image.read_bytes())
    # Rank 1 reads images 24-40; a truncated PNG keeps its header, so only reading its pixels fails.
    assert shard_bounds(41, BATCH, 1, 2) == (24, 41)
    (broken / "000030.png").write_bytes((folder / "000030.png").read_bytes()[:60])
    result = cli.run("eval", broken, "--metrics", METRICS, "--batch", BATCH, "--gpus", 2, "--json", check=False)
    assert result.returncode != 0 and result.stdout == ""
    message = f"Image {broken / '000030.png'} is corrupt or unreadable"
    assert result.stderr.count(message) == 1, result.stderr
    assert "the evaluation failed on rank 0" in result.stderr


@pytest.mark.slow
@pytest.mark.e2e
def test_low_dimensional_metrics_are_refused_before_any_process_starts(cli, run):
    result = cli.invoke("eval", run, "--metrics", "swd", "--gpus", "2")
    assert result.exit_code == 2
    assert "computed in one process" in " ".join(result.stderr.split())


@pytest.mark.parametrize("num, batch, world, expected", [
    (40, 8, 2, [(0, 24), (24, 40)]),
    (41, 8, 2, [(0, 24), (24, 41)]),  # Uneven: the last batch holds one image.
    (40, 64, 2, [(0, 40), (40, 40)]),  # One batch: rank 1 has nothing to do.
    (100, 10, 3, [(0, 40), (40, 70), (70, 100)]),
])
def test_shards_are_whole_batches_in_order(num, batch, world, expected):
    bounds = [shard_bounds(num, batch, rank, world) for rank in range(world)]
    assert bounds == expected
    assert all(start % batch == 0 or start == stop for start, stop in bounds)  # Empty shards aside.
