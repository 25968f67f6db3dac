"""The README's main command on the embedded default (shortened), and the teacher samples it ships."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from onestep_cli import demo
from onestep_cli.config import resolve_asset_path, resolve_config
from onestep_cli.runs.networks import build_networks
from onestep_cli.sample_io import to_uint8_images
from onestep_cli.sampling import generate_teacher, seed_labels


def test_distill_without_a_preset_distils_the_digits_teacher_with_sim(cli):
    resolved = yaml.safe_load(cli.invoke("distill", "--dry-run").stdout)
    assert resolved["objective"]["name"] == "sim"
    assert resolved["teacher"] == {**resolved["teacher"], "kind": "edm", "path": "@assets/digits_teacher"}


@pytest.mark.slow
@pytest.mark.e2e
def test_demo_distils_evaluates_and_compares_with_the_teacher(cli, tmp_path):
    result = cli.run("demo", "--out", tmp_path / "demo", "--steps", "3", "--num", "64")
    table = result.stdout
    for needle in ("digits-sim", "teacher-heun35", "fd_digits", "class_accuracy", "report.html"):
        assert needle in table, table
    student = json.loads(next((tmp_path / "demo" / "digits-sim" / "eval").glob("*.json")).read_text())
    teacher = json.loads((tmp_path / "demo" / "teacher-heun35.json").read_text())
    for evaluation in (student, teacher):
        assert evaluation["provenance"]["fd_digits"]["num_images"] == 64
        assert 0.0 <= evaluation["metrics"]["class_accuracy"] <= 1.0
        assert np.isfinite(evaluation["metrics"]["fd_digits"])
    # Three updates cannot have taken the student to the teacher's quality.
    assert student["metrics"]["fd_digits"] > teacher["metrics"]["fd_digits"]
    assert (tmp_path / "demo" / "report" / "report.html").is_file()
    assert (tmp_path / "demo" / "report" / "grids" / "grid.png").is_file()
    # The preset's GPU batch and EMA, scaled to the CPU: 3 steps at batch 64 are 0.192 kimg.
    run = yaml.safe_load((tmp_path / "demo" / "digits-sim" / "config.yaml").read_text())["train"]
    assert (run["batch_size"], run["ema_halflife_kimg"]) == (64, 2)
    assert resolve_config("digits-sim").train.batch_size == 256


@pytest.fixture(scope="module")
def digits_networks():
    return build_networks(resolve_config("digits-sim"))


def test_shipped_teacher_samples_are_the_teachers_heun_samples(digits_networks):
    with np.load(resolve_asset_path(demo.TEACHER_SAMPLES)) as data:
        shipped, labels, seeds = data["samples"], data["labels"], data["seeds"]
        record = json.loads(str(data["record"]))
    teacher_path = resolve_config("digits-sim").teacher.resolved_path
    assert record["teacher_sha256"] == demo._weights_sha256(teacher_path) and record["nfe"] == 35
    assert seeds.tolist() == list(range(1000)) and shipped.shape == (1000, 8, 8, 1)
    check = [0, 1, 2, 500, 999]
    net = digits_networks
    fresh = to_uint8_images(generate_teacher(net.teacher, check, net.data_shape, net.label_dim, demo.TEACHER_STEPS))
    # Float sums differ between machines; a rounding flip moves a pixel by one level at most.
    assert np.abs(fresh.astype(int) - shipped[check].astype(int)).max() <= 1
    assert labels[check].tolist() == seed_labels(check, net.data_shape, net.label_dim).tolist()


@pytest.mark.slow
@pytest.mark.e2e
def test_teacher_samples_are_regenerated_when_the_shipped_file_is_of_another_teacher(cli, tmp_path, monkeypatch):
    other = tmp_path / "other.npz"
    with np.load(resolve_asset_path(demo.TEACHER_SAMPLES)) as data:
        record = {**json.loads(str(data["record"])), "teacher_sha256": "0" * 64}
        np.savez(other, samples=data["samples"], labels=data["labels"], seeds=data["seeds"],
                 record=json.dumps(record))
        shipped = data["samples"][:6]
    monkeypatch.setattr(demo, "TEACHER_SAMPLES", str(other))
    run = tmp_path / "run"
    # Only the run's teacher is used: one step at batch 8, in process.
    distilled = cli.invoke("distill", "--out", run, "--set", "train.max_steps=1", "--set", "train.batch_size=8",
                           "--set", "eval.metrics=[]")
    assert distilled.exit_code == 0, distilled.output
    messages = []
    path = demo.teacher_samples(run, 6, tmp_path / "out", messages.append)
    assert path.parent == tmp_path / "out" and "sampling the teacher" in messages[0]
    with np.load(path) as data:
        assert np.abs(data["samples"].astype(int) - shipped.astype(int)).max() <= 1
