"""`onestep compare`'s image grids (every generator on the same seeds) and its self-contained report.html, on tiny
two-step digits runs; a gmm run, a run without weights and an eval file are skipped without error."""

from __future__ import annotations

import base64
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from onestep_cli.config import resolve_config
from onestep_cli.engine.loop import distill
from onestep_cli.report import compare, write_report
from onestep_cli.report.grids import GRID_SEEDS, LABEL_HEIGHT
from test_report import SIM_ROWS, write_run

TINY = ["train.max_steps=2", "train.batch_size=8", "train.tick_every=1", "train.checkpoint_every=2",
        "eval.metrics=[]", "train.device=cpu"]
TILE = 8 + 2  # A digit (8x8) and image_grid's padding of 2.


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # Tiny networks: one thread (conftest.py).


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two digits runs whose generators differ (lr), a gmm run, and an eval file."""
    root = tmp_path_factory.mktemp("runs")
    for name, preset, extra in [("fast", "digits-sim", ["train.lr=1e-2"]), ("slow", "digits-sim", []),
                                ("ring", "gmm-sim", [])]:
        distill(resolve_config(preset, overrides=[*TINY, *extra]), root / name, log=lambda message: None,
                progress=False)
    teacher = root / "teacher.json"
    teacher.write_text(json.dumps({"metrics": {"fd_digits": 1.5}, "provenance": {"num_steps": 35}}))
    return {"fast": root / "fast", "slow": root / "slow", "ring": root / "ring", "teacher": teacher, "root": root}


def sample_panel(cli, run, seeds, out) -> np.ndarray:
    """The PNGs `onestep sample` writes for `seeds`, tiled by hand as a row with image_grid's white padding of 2."""
    result = cli.invoke("sample", run, "--seeds", f"{seeds[0]}-{seeds[-1]}", "--out", out)
    assert result.exit_code == 0, result.output
    panel = np.full((TILE + 2, len(seeds) * TILE + 2, 3), 255, dtype=np.uint8)
    for column, seed in enumerate(seeds):
        with Image.open(out / f"{seed:06d}.png") as image:
            panel[2:2 + 8, 2 + column * TILE:2 + column * TILE + 8] = np.asarray(image.convert("RGB"))
    return panel


def read_png(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


# ---------------------------------------------------------------------------------------------------------------------
# Grids


def test_grids_have_a_row_per_model_and_a_column_per_seed(runs, tmp_path):
    written = write_report(compare([runs["fast"], runs["slow"]]), tmp_path / "out", grid_seeds=GRID_SEEDS)
    assert {"grids/grid.png", "grids/fast.png", "grids/slow.png"} <= set(written)
    assert written["grids/grid.png"] == tmp_path / "out" / "grids" / "grid.png"
    width, height = len(GRID_SEEDS) * TILE + 2, TILE + 2
    for name in ("fast", "slow"):
        assert read_png(written[f"grids/{name}.png"]).shape == (height, width, 3)
    assert read_png(written["grids/grid.png"]).shape == (2 * (LABEL_HEIGHT + height), width, 3)


@pytest.mark.e2e
def test_each_models_panel_is_what_onestep_sample_writes_for_the_same_seeds(cli, runs, tmp_path):
    seeds = list(range(3, 9))
    checkpoint = runs["fast"] / "checkpoints" / "step-00000002"
    comparison = compare([runs["fast"], runs["slow"], checkpoint])
    written = write_report(comparison, tmp_path / "out", grid_seeds=seeds)
    combined = read_png(written["grids/grid.png"])
    expected = {"fast": sample_panel(cli, runs["fast"], seeds, tmp_path / "fast"),
                "slow": sample_panel(cli, runs["slow"], seeds, tmp_path / "slow")}
    assert not np.array_equal(expected["fast"], expected["slow"]), "the two runs must make different images"
    expected["fast_step-00000002"] = expected["fast"]  # The run's newest checkpoint is that checkpoint.
    for row, (name, panel) in enumerate(expected.items()):
        np.testing.assert_array_equal(read_png(written[f"grids/{name}.png"]), panel, err_msg=name)
        top = row * (LABEL_HEIGHT + panel.shape[0]) + LABEL_HEIGHT
        np.testing.assert_array_equal(combined[top:top + panel.shape[0], :panel.shape[1]], panel, err_msg=name)
        band = combined[top - LABEL_HEIGHT:top]
        assert (band < 128).any(), f"the label band above {name} is blank"


def test_gmm_runs_runs_without_weights_and_eval_files_are_skipped_without_error(runs, tmp_path):
    weightless = write_run(tmp_path / "runs", "no-weights", "sim", 1e-4, SIM_ROWS)
    comparison = compare([runs["ring"], weightless, runs["teacher"], runs["slow"]])
    messages = []
    written = write_report(comparison, tmp_path / "out", grid_seeds=[0, 1], html=True, log=messages.append)
    assert sorted(name for name in written if name.startswith("grids/")) == ["grids/grid.png", "grids/slow.png"]
    assert read_png(written["grids/grid.png"]).shape[0] == LABEL_HEIGHT + TILE + 2  # One model.
    assert len(messages) == 3
    assert "ring" in messages[0] and "shape (2,), not images" in messages[0]
    assert "no-weights" in messages[1] and "no checkpoint and no export" in messages[1]
    assert "teacher" in messages[2] and "eval result" in messages[2]
    assert "not images" in written["report.html"].read_text()


def test_no_image_generator_means_no_grids_folder(runs, tmp_path):
    written = write_report(compare([runs["ring"]]), tmp_path / "out", grid_seeds=GRID_SEEDS, html=True)
    assert not (tmp_path / "out" / "grids").exists() and not any(name.startswith("grids/") for name in written)
    assert written["report.html"].is_file()


@pytest.mark.e2e
def test_text_to_image_run_gets_a_row_per_cached_prompt_as_onestep_sample_draws_them(cli, tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from test_diffusers_adapters import build_sd
    from test_text_to_image import TINY as TINY_TEXT_TO_IMAGE

    build_sd().save_pretrained(tmp_path / "sd")
    (tmp_path / "prompts.txt").write_text("a red <bicycle>\ntwo cats on a sofa\nan astronaut\n")
    run = tmp_path / "run"
    config = resolve_config("sd15-sid", overrides=[f"teacher.path={tmp_path / 'sd'}",
                                                   f"prompts.path={tmp_path / 'prompts.txt'}", *TINY_TEXT_TO_IMAGE])
    distill(config, run, log=lambda message: None, progress=False)
    written = write_report(compare([run]), tmp_path / "out", grid_seeds=[0, 1, 2], num_prompts=2, html=True)
    (tmp_path / "first-two.txt").write_text("a red <bicycle>\ntwo cats on a sofa\n")
    result = cli.invoke("sample", run, "--prompts", tmp_path / "first-two.txt", "--seeds", "0-2", "--out",
                        tmp_path / "samples")
    assert result.exit_code == 0, result.output
    panel = read_png(written["grids/run.png"])
    assert panel.shape == (2 * 18 + 2, 3 * 18 + 2, 3)  # Rows: prompts; columns: seeds; 16x16 images.
    np.testing.assert_array_equal(panel, read_png(tmp_path / "samples" / "grid.png"))
    assert "“a red &lt;bicycle&gt;”; “two cats on a sofa”" in written["report.html"].read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------------
# report.html


@pytest.fixture
def report(runs, tmp_path):
    """report.html of a digits run named `<script>alert(1)`, a run with curves, and an eval file with odd strings."""
    hostile = tmp_path / "<script>alert(1)"
    shutil.copytree(runs["slow"], hostile)
    curved = write_run(tmp_path / "runs", "curved", "sim", 1e-4, SIM_ROWS)
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"metrics": {"swd": 0.5},
                               "provenance": {"swd": {"images": "<img src=http://example.com/x.png>"}}}))
    comparison = compare([hostile, curved, odd])
    written = write_report(comparison, tmp_path / "out", grid_seeds=[0, 1, 2], html=True)
    return {"html": written["report.html"].read_text(encoding="utf-8"), "written": written}


def test_report_html_references_nothing_outside_itself(report):
    html = report["html"]
    for needle in ('src="http', "src='http", 'href="http', "href=", "<link", "<script", "url(", "@import"):
        assert needle not in html.lower(), needle
    sources = re.findall(r'<img src="([^"]*)"', html)
    assert sources and all(source.startswith("data:image/png;base64,") for source in sources)


def test_report_html_embeds_every_curve_and_grid_png(report):
    embedded = [base64.b64decode(uri.split(",", 1)[1]) for uri in re.findall(r'<img src="([^"]*)"', report["html"])]
    pngs = [path for path in report["written"].values() if path.suffix == ".png"]
    assert {path.name for path in pngs} >= {"curve-swd.png", "curve-mode_coverage.png", "grid.png"}
    assert sorted(embedded) == sorted(path.read_bytes() for path in pngs)
    assert all(data.startswith(b"\x89PNG\r\n\x1a\n") for data in embedded)


def test_report_html_escapes_what_sources_say_and_holds_tables_and_provenance(report):
    html = report["html"]
    assert "&lt;script&gt;alert(1)" in html  # The label, in the tables, the grid caption and the sources list.
    assert "&lt;img src=http://example.com/x.png&gt;" in html  # Provenance, as text.
    assert "<th>source</th><th>kind</th><th>kimg</th>" in html and "<td>curved</td>" in html
    assert "<h2>Config differences</h2>" in html and "<td>teacher.kind</td><td>edm</td><td>gmm</td>" in html
    for metric in ("mode_coverage", "swd"):
        assert f"<details><summary>{metric}</summary>" in html
    assert "&quot;num_samples&quot;: 2000" in html


# ---------------------------------------------------------------------------------------------------------------------
# The CLI


@pytest.mark.e2e
def test_compare_cli_writes_grids_for_grid_seeds_and_prints_one_json_object(cli, runs, tmp_path):
    out = tmp_path / "report"
    args = ["compare", runs["fast"], runs["ring"], runs["teacher"], "--out", out, "--grid-seeds", "2-5"]
    result = cli.invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [s["label"] for s in data["sources"]] == ["fast", "ring", "teacher"]
    assert data["written"]["report.html"] == str(out / "report.html")
    assert read_png(data["written"]["grids/fast.png"]).shape == (TILE + 2, 4 * TILE + 2, 3)
    assert "No grid for ring" in result.stderr
    text = cli.invoke(*args)
    assert text.exit_code == 0 and str(out / "report.html") in " ".join(text.stdout.split())


def test_compare_cli_rejects_a_bad_seed_range(cli, runs, tmp_path):
    result = cli.invoke("compare", runs["fast"], "--out", tmp_path, "--grid-seeds", "9-2")
    assert result.exit_code != 0 and "runs backwards" in result.output
