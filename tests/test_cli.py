"""The command line end to end, through the installed `onestep` console script; checks of what one verb prints or
refuses run the same app in process (the `cli` fixture's invoke), where a new interpreter would add only start-up."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

FAST = ["--set", "train.max_steps=60", "--set", "train.tick_every=20", "--set", "eval.num_samples=400"]


def test_version_through_python_m():
    result = subprocess.run([sys.executable, "-m", "onestep_cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("onestep ")


def test_dry_run_merges_preset_then_config_then_set(cli, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  lr: 0.003\n  batch_size: 64\n")
    result = cli.invoke("distill", "--preset", "gmm-sid", "--config", config, "--set", "train.lr=5e-4", "--dry-run")
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    assert resolved["objective"]["name"] == "sid"  # from the preset
    assert resolved["train"]["batch_size"] == 64  # from --config
    assert resolved["train"]["lr"] == 5e-4  # --set beats --config
    as_json = json.loads(cli.invoke("distill", "--preset", "gmm-sid", "--dry-run", "--json").stdout)
    assert as_json["objective"]["alpha"] == pytest.approx(1.2)


def test_switching_objective_with_set_starts_that_section_afresh(cli):
    resolved = yaml.safe_load(cli.invoke("distill", "--preset", "gmm-sim", "--set", "objective.name=dmd",
                                         "--dry-run").stdout)
    assert resolved["objective"]["name"] == "dmd" and "distance" not in resolved["objective"]


@pytest.mark.parametrize("args, needles", [
    (["--set", "train.bach_size=8"], ["train.bach_size", "Did you mean 'train.batch_size'"]),
    (["--set", "train.batch_size=abc"], ["train.batch_size", "'abc'"]),
    (["--set", "objective.name=sidd"], ["objective.name", "'sidd'", "sid"]),
    (["--set", "objective.alpha=1.0"], ["objective.alpha", "Unknown key"]),  # alpha belongs to SiD, not SIM
    (["--preset", "gmm-simm"], ["gmm-simm", "Did you mean 'gmm-sim'"]),
    (["--set", "train.lr"], ["key.path=value"]),
])
def test_bad_config_exits_nonzero_naming_the_problem(cli, args, needles):
    result = cli.invoke("distill", *args, "--dry-run")
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    for needle in needles:
        assert needle in message, message


def test_missing_teacher_file_is_named(cli, tmp_path):
    missing = tmp_path / "network-snapshot-200000.pkl"
    result = cli.invoke("distill", "--set", "teacher.kind=edm", "--set", f"teacher.path={missing}", "--out",
                        tmp_path / "run")
    assert result.exit_code != 0
    assert f"teacher.path {missing} does not exist" in result.stderr
    assert not (tmp_path / "run").exists(), "a failed start must leave no run directory that refuses the fix"


@pytest.fixture(scope="module")
def gmm_sim_run(cli, tmp_path_factory):
    """A short gmm-sim run through the console script, and the summary it printed; tests that change it copy it."""
    run = tmp_path_factory.mktemp("gmm-sim") / "run"
    return run, json.loads(cli.run("distill", "--preset", "gmm-sim", *FAST, "--out", run, "--json").stdout)


@pytest.mark.slow
@pytest.mark.e2e
def test_distill_sample_eval_compare_export(cli, tmp_path, gmm_sim_run, one_thread):
    run, summary = gmm_sim_run
    assert summary["step"] == 60 and set(summary["metrics"]) == {"swd", "mode_coverage"}
    assert (run / "config.yaml").is_file() and (run / "export" / "generator.safetensors").is_file()
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [20, 40, 60]
    assert all(k in stats[0] for k in ("loss_generator", "loss_fake", "grad_norm_generator", "kimg_per_s"))

    # Per-sample seeds: a sub-range reproduces the same points (up to the float rounding of batched matrix
    # products, which BLAS may block differently for another batch size); the same command reproduces bitwise, here
    # in another process than the first time. Each verb runs once through the console script, the rest in process.
    def invoke(*args):
        result = cli.invoke(*args)
        assert result.exit_code == 0, result.output
        return result

    invoke("sample", run, "--num", 50, "--out", tmp_path / "all")
    cli.run("sample", run, "--seeds", "10-19", "--out", tmp_path / "part")
    invoke("sample", run, "--seeds", "10-19", "--out", tmp_path / "again")
    import numpy as np
    full, part = np.load(tmp_path / "all" / "samples.npz"), np.load(tmp_path / "part" / "samples.npz")
    np.testing.assert_allclose(full["samples"][10:20], part["samples"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(part["samples"], np.load(tmp_path / "again" / "samples.npz")["samples"])
    np.testing.assert_array_equal(part["seeds"], np.arange(10, 20))

    invoke("sample", run, "--teacher", "--steps", 18, "--num", 400, "--out", tmp_path / "teacher")
    teacher_eval = json.loads(cli.run("eval", tmp_path / "teacher", "--metrics", "swd,mode_coverage", "--json").stdout)
    assert teacher_eval["metrics"]["mode_coverage"] == 1.0
    assert teacher_eval["provenance"]["common"]["num_samples"] == 400
    (tmp_path / "teacher.json").write_text(json.dumps(teacher_eval))

    student_eval = json.loads(invoke("eval", run, "--metrics", "swd", "--num", 400, "--json").stdout)
    assert set(student_eval["metrics"]) == {"swd"} and student_eval["provenance"]["swd"]["num_samples"] == 400

    comparison = json.loads(cli.run("compare", run, tmp_path / "teacher.json", "--out", tmp_path / "report",
                                    "--json").stdout)
    assert len(comparison["sources"]) == 2
    assert (tmp_path / "report" / "table.md").is_file()
    assert any(p.suffix == ".png" for p in (tmp_path / "report").iterdir())

    written = json.loads(cli.run("export", run, "--out", tmp_path / "export", "--format", "safetensors",
                                 "--json").stdout)
    assert written["step"] == 60 and set(written["files"]) == {"generator.safetensors", "generator.json"}
    exported = load_file(str(tmp_path / "export" / "generator.safetensors"))
    final = load_file(str(run / "export" / "generator.safetensors"))  # What distill wrote at its end.
    assert exported.keys() == final.keys() and all((exported[key] == final[key]).all() for key in final)


def test_eval_rejects_unknown_metric(cli, tmp_path):
    result = cli.invoke("eval", tmp_path, "--metrics", "swdd")
    assert result.exit_code == 2 and "Did you mean 'swd'" in result.stderr


def test_presets_list_and_show(cli):
    listing = cli.run("presets").stdout
    for name in ("gmm-sim", "gmm-sid", "gmm-dmd", "gmm-di"):
        assert name in listing
    assert yaml.safe_load(cli.invoke("presets", "show", "gmm-dmd").stdout)["objective"]["name"] == "dmd"


@pytest.mark.slow
@pytest.mark.e2e
def test_sigkill_then_same_command_resumes_to_identical_parameters(cli, tmp_path, one_thread):
    args = ["distill", "--preset", "gmm-sid", "--set", "train.max_steps=120", "--set", "train.checkpoint_every=20",
            "--set", "train.keep_checkpoints=10", "--set", "eval.every_steps=40", "--set", "eval.num_samples=200"]
    reference = tmp_path / "reference"
    assert cli.invoke(*args, "--out", reference).exit_code == 0  # In process, on one thread as the scripts below.

    interrupted = tmp_path / "interrupted"
    process = cli.start(*args, "--out", interrupted, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((interrupted / "checkpoints").glob("step-00000040")) and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "export").exists(), "the run finished before it could be killed"

    resumed = cli.run(*args, "--out", interrupted)
    assert "Resuming" in resumed.stderr
    for name in ("generator", "fake", "ema"):
        ref = load_file(str(reference / "checkpoints" / "step-00000120" / f"{name}.safetensors"))
        got = load_file(str(interrupted / "checkpoints" / "step-00000120" / f"{name}.safetensors"))
        for key in ref:
            assert (ref[key] == got[key]).all(), f"{name}.{key} differs after resume"
    rows = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert rows == [40, 80, 120]


@pytest.mark.e2e
def test_changed_config_in_existing_run_is_refused(cli, tmp_path, gmm_sim_run):
    run = tmp_path / "run"
    shutil.copytree(gmm_sim_run[0], run, ignore=shutil.ignore_patterns(".lock"))
    result = cli.invoke("distill", "--preset", "gmm-sim", *FAST, "--set", "train.lr=0.5", "--out", run)
    assert result.exit_code == 2 and "train.lr" in result.stderr and "another --out" in " ".join(result.stderr.split())
