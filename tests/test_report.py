"""`onestep compare` as a library: sources read from disk, tables, config differences, curves and the report folder."""

from __future__ import annotations

import csv
import io
import json

import pytest
import yaml
from PIL import Image
from rich.console import Console

from onestep_cli.report import (
    ReportError, compare, load_source, metric_figure, plot_metric_curves, render_config_table, render_rich_table,
    to_csv, to_json, to_markdown, write_report, y_scale,
)

SIM_ROWS = [(100, {"swd": 1.0, "mode_coverage": 0.5}), (200, {"swd": 0.1, "mode_coverage": 0.75}),
            (300, {"swd": 0.0123456, "mode_coverage": 0.875})]
SID_ROWS = [(100, {"swd": 0.5, "mode_coverage": 0.25}), (200, {"swd": 0.4, "mode_coverage": 0.5}),
            (300, {"swd": 0.3, "mode_coverage": 0.625})]
BATCH_KIMG = 0.256  # kimg per step at batch size 256.


def write_run(root, name, objective, lr, rows, status="complete"):
    """A run directory as the engine writes it: config.yaml, metrics.jsonl, stats.jsonl, run.json."""
    run = root / name
    run.mkdir(parents=True)
    config = {
        "teacher": {"kind": "gmm", "means": [[-1.0, 0.0], [1.0, 0.0]], "stds": [0.1, 0.1], "weights": None},
        "generator": {"sigma_init": 2.5},
        "objective": {"name": objective, "normalization": "mean_abs_error"},
        "train": {"lr": lr, "batch_size": 256, "max_steps": rows[-1][0]},
        "eval": {"metrics": ["swd", "mode_coverage"], "num_samples": 2000},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    records = [{"step": step, "kimg": step * BATCH_KIMG, "metrics": metrics,
                "provenance": {name: {"metric": name, "num_samples": 2000} for name in metrics}}
               for step, metrics in rows]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    stats = [{"step": step, "kimg": step * BATCH_KIMG, "loss_generator": 0.1, "loss_fake": 0.2} for step, _ in rows]
    (run / "stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stats))
    last_step = rows[-1][0]
    (run / "run.json").write_text(json.dumps(
        {"status": status, "step": last_step, "kimg": last_step * BATCH_KIMG, "wall_seconds": 12.5}))
    return run


def write_checkpoint(run, step):
    checkpoint = run / "checkpoints" / f"step-{step:08d}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text(json.dumps({"step": step, "kimg": step * BATCH_KIMG, "optimizers": {}}))
    return checkpoint


@pytest.fixture
def sources(tmp_path):
    """Two runs that differ in objective.name and train.lr, a run-level eval result, and a teacher eval file."""
    sim = write_run(tmp_path / "runs", "sim", "sim", 1e-4, SIM_ROWS)
    sid = write_run(tmp_path / "runs", "sid", "sid", 1e-5, SID_ROWS)
    (sim / "eval").mkdir()
    (sim / "eval" / "final.json").write_text(json.dumps(
        {"source": str(sim), "metrics": {"fid": 2.0625}, "provenance": {"fid": {"num_samples": 50000}}}))
    teacher = tmp_path / "teacher.json"
    teacher.write_text(json.dumps(
        {"source": "teacher", "metrics": {"swd": 0.005, "fid": 1.97}, "provenance": {"num_steps": 35}}))
    return {"sim": sim, "sid": sid, "teacher": teacher, "root": tmp_path}


def cells(table):
    """A rich table as {column header: [cell, ...]}."""
    return {column.header: list(column.cells) for column in table.columns}


# ---------------------------------------------------------------------------------------------------------------------
# Reading sources


def test_run_source_has_flat_config_last_metrics_merged_with_eval_results_and_history(sources):
    run = load_source(sources["sim"])
    assert (run.label, run.kind, run.path) == ("sim", "run", sources["sim"])
    assert run.config["objective.name"] == "sim" and run.config["train.lr"] == 1e-4
    assert run.config["teacher.means"] == [[-1.0, 0.0], [1.0, 0.0]]
    assert run.metrics == {"swd": 0.0123456, "mode_coverage": 0.875, "fid": 2.0625}
    assert run.history == [(step * BATCH_KIMG, metrics) for step, metrics in SIM_ROWS]
    assert run.provenance["fid"] == {"num_samples": 50000}
    assert run.provenance["swd"]["metric"] == "swd"
    assert (run.step, run.kimg, run.status) == (300, 300 * BATCH_KIMG, "complete")


def test_eval_file_source_spreads_shared_provenance_over_its_metrics(sources):
    teacher = load_source(sources["teacher"])
    assert (teacher.label, teacher.kind, teacher.config, teacher.history) == ("teacher", "eval", {}, [])
    assert teacher.metrics == {"swd": 0.005, "fid": 1.97}
    assert teacher.provenance == {"swd": {"num_steps": 35}, "fid": {"num_steps": 35}}
    assert teacher.kimg is None


def test_checkpoint_resolves_to_its_runs_metrics_at_that_step(sources):
    checkpoint = load_source(write_checkpoint(sources["sim"], 200))
    assert checkpoint.kind == "checkpoint"
    assert checkpoint.label == "sim/step-00000200"
    assert checkpoint.metrics == {"swd": 0.1, "mode_coverage": 0.75}  # Not the final row, nor the run's eval results.
    assert (checkpoint.step, checkpoint.kimg) == (200, 200 * BATCH_KIMG)
    assert checkpoint.config == load_source(sources["sim"]).config


def test_checkpoint_without_an_evaluation_at_its_step_has_no_metrics(sources):
    assert load_source(write_checkpoint(sources["sim"], 250)).metrics == {}


def test_run_without_run_json_takes_its_progress_from_the_last_stats_record(sources):
    (sources["sid"] / "run.json").unlink()
    with open(sources["sid"] / "stats.jsonl", "a") as f:
        f.write(json.dumps({"step": 350, "kimg": 350 * BATCH_KIMG}) + "\n")
    run = load_source(sources["sid"])
    assert (run.step, run.kimg, run.status) == (350, 350 * BATCH_KIMG, None)


def test_unterminated_last_line_of_a_live_run_is_skipped(sources):
    with open(sources["sid"] / "metrics.jsonl", "a") as f:
        f.write('{"step": 400, "kimg": 102.4, "metr')
    assert load_source(sources["sid"]).metrics == SID_ROWS[-1][1]


# ---------------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("make, expected", [
    (lambda root: root / "no-such-run", "does not exist"),
    (lambda root: _write(root / "broken.json", "{not json"), "not valid JSON"),
    (lambda root: _write(root / "list.json", "[1, 2]"), "JSON list"),
    (lambda root: _write(root / "nometrics.json", '{"source": "x"}'), "no 'metrics' object"),
    (lambda root: _write(root / "text.json", '{"metrics": {"fid": "low"}}'), "metric 'fid' is 'low'"),
    (lambda root: _mkdir(root / "just-a-folder"), "neither config.yaml nor state.json"),
    (lambda root: _write(_mkdir(root / "loose-checkpoint") / "state.json", '{"step": 5}').parent, "no config.yaml"),
])
def test_unreadable_sources_raise_a_report_error_naming_the_path(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(ReportError, match=expected) as info:
        load_source(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_metrics_line_names_the_file_and_line(sources):
    lines = (sources["sid"] / "metrics.jsonl").read_text().splitlines()
    lines[1] = "{oops"
    (sources["sid"] / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportError, match=r"metrics\.jsonl line 2 is not valid JSON"):
        load_source(sources["sid"])


def test_folder_of_runs_suggests_the_runs_inside(sources):
    with pytest.raises(ReportError, match="It holds the runs sid, sim"):
        load_source(sources["root"] / "runs")


def test_compare_needs_at_least_one_path():
    with pytest.raises(ReportError, match="Nothing to compare"):
        compare([])


def _write(path, text):
    path.write_text(text)
    return path


def _mkdir(path):
    path.mkdir()
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Comparing


def test_compare_unions_metrics_and_finds_exactly_the_changed_config_keys(sources):
    comparison = compare([sources["sim"], sources["sid"], sources["teacher"]])
    assert [s.label for s in comparison.sources] == ["sim", "sid", "teacher"]
    assert comparison.metrics == ["fid", "mode_coverage", "swd"]
    assert comparison.config_differences == {
        "objective.name": {"sim": "sim", "sid": "sid"},
        "train.lr": {"sim": 1e-4, "sid": 1e-5},
    }


def test_a_key_only_one_run_has_is_a_difference(sources):
    config = yaml.safe_load((sources["sid"] / "config.yaml").read_text())
    config["objective"]["alpha"] = 1.2
    (sources["sid"] / "config.yaml").write_text(yaml.safe_dump(config))
    differences = compare([sources["sim"], sources["sid"]]).config_differences
    assert differences["objective.alpha"] == {"sid": 1.2}


def test_colliding_labels_are_told_apart_by_their_parent_folders(tmp_path):
    first = write_run(tmp_path / "a", "run", "sim", 1e-4, SIM_ROWS)
    second = write_run(tmp_path / "b", "run", "sim", 1e-4, SIM_ROWS)
    labels = [s.label for s in compare([first, second, first]).sources]
    assert labels == ["a/run", "b/run", "a/run (2)"]


# ---------------------------------------------------------------------------------------------------------------------
# Tables


def test_rich_table_has_a_row_per_source_four_significant_digits_and_dashes_for_missing(sources):
    comparison = compare([sources["sim"], sources["sid"], sources["teacher"]])
    columns = cells(render_rich_table(comparison))
    assert list(columns) == ["source", "kind", "kimg", "fid", "mode_coverage", "swd"]
    assert columns["source"] == ["sim", "sid", "teacher"]
    assert columns["swd"] == ["0.01235", "0.3", "0.005"]
    assert columns["fid"] == ["2.062", "—", "1.97"]
    assert columns["kimg"] == ["76.8", "76.8", "—"]
    config = cells(render_config_table(comparison))
    assert config == {"key": ["objective.name", "train.lr"], "sim": ["sim", "0.0001"], "sid": ["sid", "1e-05"]}


def test_running_runs_are_marked_in_the_kind_column(tmp_path):
    run = write_run(tmp_path, "live", "sim", 1e-4, SIM_ROWS, status="running")
    assert cells(render_rich_table(compare([run])))["kind"] == ["run (running)"]


def test_rich_table_renders_in_a_terminal(sources):
    console = Console(file=io.StringIO(), width=120, record=True)
    console.print(render_rich_table(compare([sources["sim"], sources["teacher"]])))
    text = console.export_text()
    assert "mode_coverage" in text and "0.01235" in text and "—" in text


def test_markdown_has_the_metrics_and_config_difference_tables(sources):
    markdown = to_markdown(compare([sources["sim"], sources["sid"], sources["teacher"]]))
    assert "| source | kind | kimg | fid | mode_coverage | swd |" in markdown
    assert "| sid | run | 76.8 | — | 0.625 | 0.3 |" in markdown
    assert "| key | sim | sid |" in markdown
    assert "| train.lr | 0.0001 | 1e-05 |" in markdown


def test_markdown_says_when_configs_are_identical(tmp_path):
    first = write_run(tmp_path / "a", "run", "sim", 1e-4, SIM_ROWS)
    second = write_run(tmp_path / "b", "run", "sim", 1e-4, SIM_ROWS)
    assert "The configs are identical." in to_markdown(compare([first, second]))


def test_csv_parses_back_to_full_precision_metrics(sources):
    comparison = compare([sources["sim"], sources["sid"], sources["teacher"]])
    rows = list(csv.DictReader(io.StringIO(to_csv(comparison))))
    assert [row["source"] for row in rows] == ["sim", "sid", "teacher"]
    assert float(rows[0]["swd"]) == 0.0123456
    assert rows[1]["fid"] == "" and rows[2]["kimg"] == ""
    assert rows[2]["path"] == str(sources["teacher"])


def test_json_round_trips_and_keeps_the_contract(sources):
    comparison = compare([sources["sim"], sources["sid"], sources["teacher"]])
    data = to_json(comparison)
    assert json.loads(json.dumps(data)) == data
    assert data["metrics"] == ["fid", "mode_coverage", "swd"]
    assert data["config_differences"] == {"objective.name": {"sim": "sim", "sid": "sid"},
                                          "train.lr": {"sim": 1e-4, "sid": 1e-5}}
    sim = data["sources"][0]
    assert {k: sim[k] for k in ("label", "kind", "path", "kimg")} == {
        "label": "sim", "kind": "run", "path": str(sources["sim"]), "kimg": 300 * BATCH_KIMG}
    assert sim["metrics"] == {"swd": 0.0123456, "mode_coverage": 0.875, "fid": 2.0625}


def test_json_writes_non_finite_metrics_as_null(tmp_path):
    path = _write(tmp_path / "diverged.json", '{"metrics": {"swd": NaN}}')
    data = to_json(compare([path]))
    assert data["sources"][0]["metrics"] == {"swd": None}
    json.dumps(data, allow_nan=False)


# ---------------------------------------------------------------------------------------------------------------------
# Curves and the report folder


def test_y_scale_is_log_only_for_positive_values_spanning_more_than_ten_times():
    assert y_scale([0.01, 0.5, 1.0]) == "log"
    assert y_scale([0.2, 0.5, 1.0]) == "linear"
    assert y_scale([-0.01, 0.5, 1.0]) == "linear"
    assert y_scale([]) == "linear"


def test_metric_figure_draws_runs_as_lines_and_eval_results_as_dashed_references(sources):
    checkpoint = write_checkpoint(sources["sid"], 200)
    comparison = compare([sources["sim"], sources["sid"], checkpoint, sources["teacher"]])
    axes = metric_figure(comparison, "swd").axes[0]
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert set(lines) == {"sim", "sid", "sid/step-00000200", "teacher"}
    assert list(lines["sim"].get_xdata()) == [100 * BATCH_KIMG, 200 * BATCH_KIMG, 300 * BATCH_KIMG]
    assert list(lines["sid/step-00000200"].get_ydata()) == [0.4]
    assert lines["teacher"].get_linestyle() == "--" and list(lines["teacher"].get_ydata()) == [0.005, 0.005]
    assert lines["sim"].get_linestyle() == "-"
    assert axes.get_yscale() == "log"  # 0.005 .. 1.0
    assert axes.get_xlabel().startswith("kimg") and axes.get_ylabel() == "swd"
    assert [text.get_text() for text in axes.get_legend().get_texts()] == list(lines)
    assert metric_figure(comparison, "mode_coverage").axes[0].get_yscale() == "linear"


def test_curves_are_valid_pngs_one_per_metric_with_history(sources, tmp_path):
    comparison = compare([sources["sim"], sources["sid"], sources["teacher"]])
    paths = plot_metric_curves(comparison, tmp_path / "out")
    assert [p.name for p in paths] == ["curve-mode_coverage.png", "curve-swd.png"]  # fid has no history.
    for path in paths:
        assert path.stat().st_size > 10_000
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200


def test_checkpoint_evaluations_of_a_run_draw_its_curve_measured_alike_and_the_latest_is_its_metric(sources, tmp_path):
    def evaluate(step, fid, num_images, seeds):
        result = {"source": f"checkpoints/step-{step:08d}", "metrics": {"fid": fid},
                  "provenance": {"common": {"step": step, "kimg": step * BATCH_KIMG, "num_images": num_images,
                                            "seeds": seeds}, "fid": {"metric": "fid"}}}
        (sources["sid"] / "eval" / f"fid-step{step:08d}.json").write_text(json.dumps(result))

    (sources["sid"] / "eval").mkdir()
    evaluate(300, 4.0, 10000, "0-9999")
    evaluate(200, 6.0, 10000, "0-9999")
    evaluate(100, 9.0, 10000, "0-9999")
    evaluate(250, 7.5, 5000, "0-4999")  # Measured on fewer images, and written last: not a point of the 10k curve.
    run = load_source(sources["sid"])
    assert run.metrics["fid"] == 4.0  # The furthest-trained checkpoint's, not the newest file's.
    fid = [(kimg, metrics["fid"]) for kimg, metrics in run.history if "fid" in metrics]
    assert fid == [(100 * BATCH_KIMG, 9.0), (200 * BATCH_KIMG, 6.0), (300 * BATCH_KIMG, 4.0)]
    assert [(kimg, metrics) for kimg, metrics in run.history if "fid" not in metrics] == [
        (step * BATCH_KIMG, metrics) for step, metrics in SID_ROWS]
    paths = plot_metric_curves(compare([sources["sid"], sources["teacher"]]), tmp_path / "out")
    assert "curve-fid.png" in [p.name for p in paths]


def test_write_report_writes_tables_json_and_curves(sources, tmp_path):
    comparison = compare([sources["sim"], sources["sid"], sources["teacher"]])
    written = write_report(comparison, tmp_path / "report")
    assert sorted(written) == ["compare.json", "curve-mode_coverage.png", "curve-swd.png", "table.csv", "table.md"]
    assert all(path.is_file() and path.parent == tmp_path / "report" for path in written.values())
    assert json.loads(written["compare.json"].read_text()) == to_json(comparison)
    assert written["table.md"].read_text() == to_markdown(comparison)


def test_write_report_refuses_a_file_as_its_folder(sources, tmp_path):
    target = _write(tmp_path / "report", "")
    with pytest.raises(ReportError, match="is a file"):
        write_report(compare([sources["teacher"]]), target)
