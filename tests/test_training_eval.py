"""Image metrics during training (eval.metrics / eval.ref) and the digits written as a reference .npz."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from onestep_cli.digits.images_npz import write_digits_npz
from onestep_cli.eval.evaluate import evaluate


def test_digits_npz_is_a_reference_equal_to_the_real_digits(tmp_path):
    path = write_digits_npz(tmp_path / "digits8.npz", 8)
    with np.load(path) as data:
        assert data["samples"].shape == (1797, 8, 8, 3) and data["samples"].dtype == np.uint8
        assert data["labels"].shape == (1797,) and set(data["labels"].tolist()) == set(range(10))
    result = evaluate(path, ["fd_digits", "class_accuracy"])
    assert result["metrics"]["fd_digits"] < 1e-2  # Only uint8 rounding separates it from the built-in reference.
    assert result["metrics"]["class_accuracy"] > 0.98


@pytest.fixture(scope="module")
def run_with_training_metrics(cli, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("training-eval")
    reference = write_digits_npz(tmp / "digits8.npz", 8)
    run = tmp / "run"
    # A batch of 8: the records are what is checked, not what four steps of training reach.
    cli.run("distill", "--out", run, "--set", "train.max_steps=4", "--set", "train.batch_size=8",
            "--set", "eval.every_steps=2", "--set", "eval.metrics=[fd_digits,class_accuracy]",
            "--set", "eval.num_samples=64", "--set", f"eval.ref={reference}")
    return run, reference


@pytest.mark.slow
@pytest.mark.e2e
def test_training_records_image_metrics_with_labels_against_the_given_reference(run_with_training_metrics):
    run, reference = run_with_training_metrics
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4]
    for row in rows:
        assert 0 <= row["metrics"]["class_accuracy"] <= 1 and row["metrics"]["fd_digits"] > 0
        provenance = row["provenance"]["fd_digits"]
        assert provenance["seeds"] == "1000000-1000063" and provenance["num_images"] == 64
        assert provenance["reference"] == str(reference)
    # The same generator evaluated afterwards on the same seeds and reference gives the same numbers.
    after = evaluate(run, ["fd_digits", "class_accuracy"], seeds=list(range(1000000, 1000064)), ref=str(reference),
                     device="cpu")
    for name in ("fd_digits", "class_accuracy"):
        assert after["metrics"][name] == pytest.approx(rows[-1]["metrics"][name], rel=1e-6)


def test_a_missing_training_reference_is_named_before_any_step(cli, tmp_path):
    missing = tmp_path / "nothing.npz"
    result = cli.invoke("distill", "--out", tmp_path / "run", "--set", "train.max_steps=2", "--set",
                        "eval.metrics=[fd_digits]", "--set", f"eval.ref={missing}")
    assert result.exit_code != 0 and str(missing) in result.stderr
    assert not (tmp_path / "run").exists(), "a refused start must leave no run directory behind"


def distill_in_process(cli, *args) -> None:
    """The command in this process: what it records is checked, which a new interpreter would not change."""
    result = cli.invoke(*args)
    assert result.exit_code == 0, result.output


@pytest.mark.e2e
def test_eval_at_start_records_the_initial_generator_once_across_a_resume(cli, tmp_path, one_thread):
    run = tmp_path / "run"
    args = ["distill", "--preset", "gmm-sid", "--out", run, "--set", "eval.every_steps=2", "--set",
            "eval.at_start=true", "--set", "eval.num_samples=200"]
    distill_in_process(cli, *args, "--set", "train.max_steps=2", "--set", "train.checkpoint_every=2")
    distill_in_process(cli, *args, "--set", "train.max_steps=4", "--set", "train.checkpoint_every=2")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 2, 4]
    assert rows[0]["kimg"] == 0 and set(rows[0]["metrics"]) == {"swd", "mode_coverage"}


@pytest.mark.e2e
def test_a_run_restarted_without_a_checkpoint_keeps_no_stale_records(cli, tmp_path, one_thread):
    run = tmp_path / "run"
    args = ["distill", "--preset", "gmm-sid", "--out", run, "--set", "train.max_steps=2", "--set", "eval.every_steps=2",
            "--set", "eval.at_start=true", "--set", "eval.num_samples=200"]
    distill_in_process(cli, *args)
    shutil.rmtree(run / "checkpoints")  # As if the first run had died before its first checkpoint.
    distill_in_process(cli, *args)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 2]
    assert [json.loads(line)["step"] for line in (run / "stats.jsonl").read_text().splitlines()] == [2]
