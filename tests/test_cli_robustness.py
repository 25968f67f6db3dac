"""Robustness of the command line: results alone on stdout (JSON that parses, NaN written as null, --quiet,
NO_COLOR), small inputs that would take huge memory, wrong inputs refused instead of giving confident results, and one
sentence with a consistent exit code (2: change the command line or config; 1: anything else) where a traceback was.
Each test reproduces a failure of the code before it was fixed."""

from __future__ import annotations

import json
import math
import os
import pty
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from onestep_cli.config import PRESET_DIR, config_to_yaml, resolve_config
from onestep_cli.errors import InputError, UsageError
from onestep_cli.sample_io import SourceError, folder_source, npz_image_source

GMM = ["--preset", "gmm-sim", "--set", "train.max_steps=4", "--set", "train.tick_every=2", "--set",
       "eval.num_samples=50"]


def strict_json(text: str):
    """JSON as strict readers (jq, JavaScript) read it: NaN and Infinity are not JSON."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON output: {text[:200]}"))


def one_sentence(result, code: int, *needles: str) -> str:
    """The error of a CliRunner result: exit `code`, one line on stderr, no traceback, naming each needle."""
    message = " ".join(result.stderr.split())
    assert result.exit_code == code, (result.exit_code, result.output)
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in message, message
    return message


def run_with_terminal_stderr(cli, *args, env: dict | None = None) -> tuple[int, str, str]:
    """The console script as in an interactive shell with `> out.json`: stderr on a terminal, stdout on a pipe."""
    master, slave = pty.openpty()
    process = cli.start(*args, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the process closed its end of the terminal.
            break
        if not chunk:
            break
        chunks.append(chunk)
    stdout = process.stdout.read()
    process.wait(timeout=120)
    os.close(master)
    return process.returncode, stdout, b"".join(chunks).decode(errors="replace")


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height grey pixels and holds no pixel data: only its header is ever read."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def write_run_config(folder: Path, preset: str = "gmm-sim") -> Path:
    """A run directory as `onestep distill` starts it: its resolved config.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(config_to_yaml(resolve_config(preset)))
    return folder


@pytest.fixture(scope="module")
def gmm_distilled_from_a_terminal(cli, tmp_path_factory) -> tuple[Path, int, str, str]:
    """A short gmm run through the console script with --json and stderr on a terminal: the run, exit code, stdout
    and the terminal's text."""
    run = tmp_path_factory.mktemp("gmm") / "run"
    return run, *run_with_terminal_stderr(cli, "distill", *GMM, "--out", run, "--json")


@pytest.fixture(scope="module")
def gmm_run(gmm_distilled_from_a_terminal) -> Path:
    run, code, _, stderr = gmm_distilled_from_a_terminal
    assert code == 0, stderr
    return run


# ---------------------------------------------------------------------------------------------------------------------
# Case 2: results on stdout, everything else on stderr; NaN as null; --quiet; NO_COLOR


def test_the_progress_bar_draws_on_stderr(capsys):
    from onestep_cli.engine.progress import Progress

    with Progress(total=4, start=0, enabled=True) as bar:
        bar.tick(4, {"loss_generator": 0.5, "kimg_per_s": 1.0})
    captured = capsys.readouterr()
    assert captured.out == "" and "4/4" in captured.err


@pytest.mark.e2e
def test_distill_json_from_a_terminal_is_json_and_the_bar_stays_on_the_terminal(gmm_distilled_from_a_terminal):
    _, code, stdout, stderr = gmm_distilled_from_a_terminal
    assert code == 0, stderr
    assert strict_json(stdout)["step"] == 4
    assert "4/4" in stderr  # The bar, drawn because stderr is a terminal.


def test_a_library_printing_inside_a_verb_does_not_mix_into_its_json(cli, monkeypatch):
    import onestep_cli.cli.distill as distill

    def noisy(*args, **kwargs):
        print("Loading checkpoint shards: 100%")  # As libraries print, on stdout.
        return resolve_config(*args, **kwargs)

    monkeypatch.setattr(distill, "resolve_config", noisy)
    result = cli.invoke("distill", "--preset", "gmm-sim", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert strict_json(result.stdout)["objective"]["name"] == "sim"
    assert "Loading checkpoint shards" in result.stderr


def test_nan_and_infinity_are_written_as_null_by_every_json_writer(cli, tmp_path, monkeypatch, capsys):
    from onestep_cli.cli.common import print_json
    from onestep_cli.jsonio import to_json
    from onestep_cli.runs.run_dir import RunDir
    from onestep_cli.sample_io import write_samples

    assert strict_json(to_json({"fid": float("nan"), "kid": np.float32("inf"), "n": np.int64(3)})) == \
        {"fid": None, "kid": None, "n": 3}
    print_json({"fid": float("nan")})
    assert strict_json(capsys.readouterr().out) == {"fid": None}

    run = write_run_config(tmp_path / "run")
    RunDir(run).append(RunDir(run).stats_path, {"step": 2, "kimg": 0.5, "loss_generator": float("nan")})
    assert strict_json(RunDir(run).stats_path.read_text())["loss_generator"] is None
    write_samples(torch.zeros(1, 2), [0], tmp_path / "samples", {"sigma": float("inf")})
    assert strict_json((tmp_path / "samples" / "samples.json").read_text())["sigma"] is None

    # `onestep eval --json --out FILE` and the copy kept in RUN/eval/; `onestep compare` reads null back.
    result = {"source": str(run), "metrics": {"swd": float("nan")},
              "provenance": {"common": {"step": 4}, "swd": {"num_samples": 50}}}
    monkeypatch.setattr("onestep_cli.eval.evaluate.evaluate", lambda *args, **kwargs: result)
    printed = cli.invoke("eval", run, "--metrics", "swd", "--out", tmp_path / "result.json", "--json")
    assert printed.exit_code == 0, printed.output
    assert strict_json(printed.stdout)["metrics"] == {"swd": None}
    assert strict_json((tmp_path / "result.json").read_text())["metrics"] == {"swd": None}
    [kept] = (run / "eval").glob("*.json")
    assert strict_json(kept.read_text())["metrics"] == {"swd": None}
    compared = cli.invoke("compare", run, "--json")
    assert compared.exit_code == 0, compared.output
    assert strict_json(compared.stdout)


@pytest.mark.e2e
def test_quiet_prints_the_result_and_nothing_else(cli, tmp_path):
    code, stdout, stderr = run_with_terminal_stderr(cli, "--quiet", "distill", *GMM, "--out", tmp_path / "run")
    assert code == 0, stderr
    assert stdout.startswith("Finished ") and stderr.strip() == ""


def test_no_color_takes_the_colour_out_of_errors(cli):
    args = ("distill", "--preset", "gmm-sim", "--set", "train.lr=abc", "--dry-run")
    _, _, coloured = run_with_terminal_stderr(cli, *args)
    code, _, plain = run_with_terminal_stderr(cli, *args, env={"NO_COLOR": "1"})
    assert "\x1b[1;31m" in coloured  # On a terminal, "Error:" is bold red...
    assert code == 2 and "Error:" in plain and "31m" not in plain  # ...and with NO_COLOR set, not red.


# ---------------------------------------------------------------------------------------------------------------------
# Case 9: small inputs that would take huge memory


def test_a_yaml_alias_bomb_is_refused_in_one_short_sentence(cli, tmp_path):
    levels = [f'l0: &l0 [{",".join(["lol"] * 9)}]']
    levels += [f"l{n}: &l{n} [{','.join([f'*l{n - 1}'] * 9)}]" for n in range(1, 6)]  # 9^6 = 531441 values.
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\n")
    assert bomb.stat().st_size < 400
    start = time.perf_counter()
    result = cli.invoke("distill", "--config", bomb, "--dry-run")
    message = one_sentence(result, 2, str(bomb), "aliases", "expand to")
    assert len(message) < 400 and time.perf_counter() - start < 10


def test_huge_images_are_refused_from_their_header_before_any_pixel_is_decoded(tmp_path):
    from onestep_cli.eval.reference import open_reference

    folder = tmp_path / "huge"
    png_header_only(folder / "0000.png", 9000, 9000)  # No pixel data: decoding it would fail.
    with pytest.raises(SourceError, match=r"0000.png is 9000x9000 pixels, more than .* resize"):
        folder_source(folder)
    with pytest.raises(SourceError, match="9000x9000"):
        open_reference(folder)


def test_an_edm_snapshot_describing_a_huge_network_is_refused_before_it_is_built(tmp_path, monkeypatch):
    import onestep_cli.denoisers.edm.snapshot as snapshot
    from onestep_cli.denoisers.edm import EDMLoadError, load_edm_snapshot
    from test_edm_networks import build
    from test_edm_snapshot import write_snapshot

    built = snapshot.build_precond

    def build_only_on_meta(class_name, kwargs, args=()):  # Building the huge network for real takes gigabytes.
        huge = kwargs.get("model_channels", 0) >= 1000 or kwargs.get("num_blocks", 0) > 100
        assert torch.get_default_device().type == "meta" or not huge, "the network was built before it was checked"
        return built(class_name, kwargs, args)

    monkeypatch.setattr(snapshot, "build_precond", build_only_on_meta)
    net = build("adm_uncond_edm")
    net.init_kwargs = dict(net.init_kwargs, model_channels=100_000)
    with pytest.raises(EDMLoadError, match="tensor shapes do not match"):
        load_edm_snapshot(write_snapshot(tmp_path / "wide.pkl", dict(ema=net)))
    net.init_kwargs = dict(net.init_kwargs, model_channels=16, num_blocks=10**9)
    start = time.perf_counter()
    with pytest.raises(EDMLoadError, match="more than .* modules"):
        load_edm_snapshot(write_snapshot(tmp_path / "deep.pkl", dict(ema=net)))
    assert time.perf_counter() - start < 30


# ---------------------------------------------------------------------------------------------------------------------
# Case 10: confident results from wrong inputs


@pytest.mark.parametrize("scale, shift, needle", [(1, 0, "[0, 1]"), (255, 0, "[0, 255]"), (200, -100, "far outside")])
def test_float_npz_images_in_another_range_are_refused(cli, tmp_path, scale, shift, needle):
    images = np.random.default_rng(0).random((4, 3, 8, 8), dtype=np.float32) * scale + shift
    np.savez(tmp_path / "images.npz", samples=images)
    result = cli.invoke("eval", tmp_path / "images.npz", "--metrics", "fid")
    one_sentence(result, 1, "images.npz", needle, "[-1, 1]")
    np.savez(tmp_path / "signed.npz", samples=(images - images.min()) / (images.max() - images.min()) * 2 - 1)
    assert npz_image_source(tmp_path / "signed.npz").num == 4  # [-1, 1] floats are read as before.


def test_sixteen_bit_grey_pngs_are_scaled_to_eight_bits_not_clipped_to_white(tmp_path):
    folder = tmp_path / "grey16"
    folder.mkdir()
    for name, value in (("dark.png", 1000), ("mid.png", 32896), ("white.png", 65535)):
        Image.fromarray(np.full((8, 8), value, dtype=np.uint16)).save(folder / name)
    assert Image.open(folder / "dark.png").mode.startswith("I")
    [(_, images)] = list(folder_source(folder).batches(8))
    assert [int(image.mean()) for image in images] == [4, 128, 255]  # dark, mid, white: v * 255 / 65535.


def test_an_infinite_ema_half_life_is_refused(cli):
    result = cli.invoke("distill", "--preset", "gmm-sim", "--set", "train.ema_halflife_kimg=.inf", "--dry-run")
    one_sentence(result, 2, "train.ema_halflife_kimg", "finite")


def test_a_reference_holding_nan_is_refused_instead_of_giving_fid_nan(cli, tmp_path):
    from onestep_cli.digits.data import load_digits_images

    images = ((load_digits_images(8)[0][:40] + 1) * 127.5).round().to(torch.uint8).numpy()
    np.savez(tmp_path / "digits.npz", samples=images)
    saved = cli.invoke("eval", tmp_path / "digits.npz", "--metrics", "fd_digits", "--save-stats", tmp_path / "ref.npz")
    assert saved.exit_code == 0, saved.output
    with np.load(tmp_path / "ref.npz") as data:
        arrays = dict(data)
    arrays["digits_mu"][0] = np.nan
    np.savez(tmp_path / "nan-ref.npz", **arrays)
    result = cli.invoke("eval", tmp_path / "digits.npz", "--metrics", "fd_digits", "--ref", tmp_path / "nan-ref.npz")
    one_sentence(result, 1, "nan-ref.npz", "NaN", "digits_mu")


def test_a_metric_that_comes_out_nan_is_an_error_not_a_result():
    from onestep_cli.eval.base import MetricResult
    from onestep_cli.eval.evaluate import _result

    with pytest.raises(InputError, match="'fid' came out nan"):
        _result(Path("samples"), {"fid": MetricResult("fid", float("nan"))}, {})


# ---------------------------------------------------------------------------------------------------------------------
# Case 12: one sentence where a traceback was, and the same exit code for the same kind of mistake


def test_a_decompression_bomb_png_is_one_sentence(cli, tmp_path):
    png_header_only(tmp_path / "bomb" / "0000.png", 20000, 20000)
    result = cli.invoke("eval", tmp_path / "bomb", "--metrics", "fid")
    one_sentence(result, 1, "0000.png", "decompression bomb")


@pytest.mark.parametrize("args", [
    ["sample", "RUN", "--num", "1", "--out", "FILE"],
    ["distill", "--preset", "gmm-sim", "--out", "FILE"],
    ["export", "RUN", "--out", "FILE"],
    ["compare", "RUN", "--out", "FILE"],
    ["demo", "--out", "FILE"],
    ["convert", "FILE", "FILE"],
    ["eval", "RUN", "--out", "RUN"],  # A folder where the result file belongs.
    ["sample", "RUN", "--num", "1", "--out", "FILE/samples"],
], ids=["sample", "distill", "export", "compare", "demo", "convert", "eval", "inside-a-file"])
def test_out_pointing_at_a_file_is_a_usage_error(cli, tmp_path, args):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "run").mkdir()
    args = [a.replace("FILE", str(tmp_path / "file")).replace("RUN", str(tmp_path / "run")) for a in args]
    one_sentence(cli.invoke(*args), 2, "--out" if "--out" in args else "OUT")


def test_an_empty_out_is_refused_instead_of_training_into_the_current_folder(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli.invoke("distill", "--preset", "gmm-sim", "--set", "train.max_steps=1", "--out", "")
    one_sentence(result, 2, "--out is empty")
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_config_yaml_inside_a_run_is_one_sentence_naming_it(cli, tmp_path):
    run = write_run_config(tmp_path / "run")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"]["max_steps"] = "a thousand"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    one_sentence(cli.invoke("sample", run, "--num", "1", "--out", tmp_path / "s"), 1, "config.yaml",
                 "train.max_steps")
    (run / "config.yaml").unlink()
    (run / "config.yaml").mkdir()
    one_sentence(cli.invoke("distill", "--preset", "gmm-sim", "--out", run), 1, "config.yaml is not a file")


@pytest.mark.parametrize("seeds, needle", [
    ("0-9999999999", "10000000000 samples"), ("9223372036854775808", "largest seed"),
    ("1,1,1", "seed 1 more than once"), ("0-4,3", "seed 3 more than once")])
def test_seeds_too_many_too_large_or_repeated_are_usage_errors(cli, tmp_path, seeds, needle):
    start = time.perf_counter()
    one_sentence(cli.invoke("sample", tmp_path, "--seeds", seeds, "--out", tmp_path / "s"), 2, needle)
    one_sentence(cli.invoke("eval", tmp_path, "--seeds", seeds), 2, needle)
    assert time.perf_counter() - start < 10


def test_seeds_up_to_two_to_the_63_are_accepted():
    from onestep_cli.sampling import parse_seeds

    assert parse_seeds("9223372036854775806-9223372036854775807,0") == [2**63 - 2, 2**63 - 1, 0]
    with pytest.raises(UsageError):
        parse_seeds("9223372036854775807-9223372036854775808")


@pytest.mark.parametrize("value", ["10000000000", "1.0e+10"])  # YAML reads the second as a float.
def test_eval_num_samples_beyond_the_bound_is_refused(cli, tmp_path, value):
    config = tmp_path / "c.yaml"
    config.write_text(f"eval:\n  num_samples: {value}\n")
    one_sentence(cli.invoke("distill", "--preset", "gmm-sim", "--config", config, "--dry-run"), 2,
                 "eval.num_samples")


def test_checkpoints_being_a_file_is_one_sentence(cli, tmp_path):
    run = write_run_config(tmp_path / "run")
    (run / "checkpoints").write_text("")
    one_sentence(cli.invoke("distill", "--preset", "gmm-sim", "--out", run), 1, "checkpoints is not a folder")
    one_sentence(cli.invoke("sample", run, "--num", "1", "--out", tmp_path / "s"), 1, "checkpoints is not a folder")


@pytest.mark.parametrize("preset", ["", "PATH"])
def test_a_preset_is_a_name_not_a_path(cli, tmp_path, preset):
    elsewhere = tmp_path / "x.yaml"
    elsewhere.write_text("train:\n  lr: 0.5\n")
    preset = os.path.relpath(elsewhere.with_suffix(""), PRESET_DIR) if preset == "PATH" else preset
    one_sentence(cli.invoke("distill", "--preset", preset, "--dry-run"), 2, "is not a preset name", "--config")


@pytest.mark.parametrize("assignment, key", [("train.max_steps=true", "train.max_steps"),
                                             ("train.max_steps=2.0", "train.max_steps"),
                                             ("train.lr=true", "train.lr"),
                                             ("train.betas=[0.0, true]", "train.betas.1")])
def test_booleans_and_fractions_are_not_numbers_of_steps(cli, assignment, key):
    one_sentence(cli.invoke("distill", "--preset", "gmm-sim", "--set", assignment, "--dry-run"), 2, key)


def test_integers_floats_and_yaml_numbers_still_read(cli):
    result = cli.invoke("distill", "--preset", "gmm-sim", "--set", "train.max_steps=1_000", "--set",
                        "train.lr=1e-4", "--set", "train.tf32=true", "--dry-run", "--json")
    train = strict_json(result.stdout)["train"]
    assert (train["max_steps"], train["lr"], train["tf32"]) == (1000, 1e-4, True)


def test_duplicate_yaml_keys_are_refused(cli, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  lr: 0.001\n  batch_size: 64\n  lr: 0.1\n")
    one_sentence(cli.invoke("distill", "--preset", "gmm-sim", "--config", config, "--dry-run"), 2, "'lr' appears twice",
                 "line 4")
    one_sentence(cli.invoke("distill", "--preset", "gmm-sim", "--set", "train={lr: 1, lr: 2}", "--dry-run"), 2,
                 "appears twice")
    merged = tmp_path / "merged.yaml"  # A merged value overridden by the mapping's own key is no duplicate.
    merged.write_text("train:\n  <<: {lr: 0.001, batch_size: 64}\n  lr: 0.002\n")
    result = cli.invoke("distill", "--preset", "gmm-sim", "--config", merged, "--dry-run", "--json")
    assert strict_json(result.stdout)["train"]["lr"] == 0.002


def test_a_run_folder_without_config_yaml_is_not_restarted_over_its_records(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stats = '{"step": 2, "kimg": 0.5}\n'
    (run / "stats.jsonl").write_text(stats)
    result = cli.invoke("distill", "--preset", "gmm-sim", "--set", "train.max_steps=2", "--out", run)
    one_sentence(result, 1, "stats.jsonl", "no config.yaml")
    assert (run / "stats.jsonl").read_text() == stats and not (run / "config.yaml").exists()


@pytest.mark.parametrize("args, code", [
    (["sample", "NOWHERE", "--num", "1", "--out", "OUT"], 1),
    (["eval", "NOWHERE", "--metrics", "swd"], 1),
    (["export", "NOWHERE", "--out", "OUT"], 1),
    (["compare", "NOWHERE"], 1),
    (["sample", "FOLDER", "--num", "1", "--out", "OUT"], 1),  # A folder that is not a run.
    (["export", "FOLDER", "--out", "OUT"], 1),
    (["distill", "--config", "NOWHERE", "--dry-run"], 1),  # A missing file, as for every other verb.
    (["distill", "--preset", "gmm-sim", "--set", "train.lr=abc", "--dry-run"], 2),
    (["sample", "FOLDER", "--out", "OUT"], 2),
    (["eval", "FOLDER", "--metrics", "swd", "--precision", "bf8"], 2),
])
def test_the_same_kind_of_mistake_has_the_same_exit_code_in_every_verb(cli, tmp_path, args, code):
    (tmp_path / "folder").mkdir()
    args = [a.replace("NOWHERE", str(tmp_path / "nowhere")).replace("FOLDER", str(tmp_path / "folder"))
            .replace("OUT", str(tmp_path / "out")) for a in args]
    one_sentence(cli.invoke(*args), code)


@pytest.mark.e2e
def test_a_trained_run_still_samples_and_evaluates(cli, gmm_run, tmp_path):
    """The checks above leave a real run alone: sample, eval and compare it through the console script."""
    written = strict_json(cli.run("sample", gmm_run, "--seeds", "0-3,9", "--out", tmp_path / "s", "--json").stdout)
    assert written["files"] == 1 and written["seeds"] == "0-3,9"
    result = strict_json(cli.run("eval", gmm_run, "--metrics", "swd", "--num", "50", "--json").stdout)
    assert math.isfinite(result["metrics"]["swd"])


@pytest.mark.parametrize("verb", ["sample", "eval"])
def test_num_beyond_the_seed_bound_is_a_usage_error(cli, tmp_path, verb):
    out = ["--out", tmp_path / "s"] if verb == "sample" else []
    result = cli.invoke(verb, tmp_path, "--num", "10000000000", *out)
    assert result.exit_code == 2 and "--num" in result.output and "Traceback" not in result.output


def test_the_workers_of_a_quiet_launch_are_quiet(monkeypatch):
    from onestep_cli.cli import common

    monkeypatch.setattr(common, "_quiet_option", True)
    assert common.worker_command(["distill", "--out", "x"]) == ["--quiet", "distill", "--out", "x"]
