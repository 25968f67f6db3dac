"""The conventions of the Hugging Face ecosystem: experiment trackers (`logging:` TensorBoard and W&B) and training
prompt files streamed rather than cached whole (`prompts.cache_max`).

Trackers are checked with stand-ins injected into sys.modules (what the loop sends, when, from which rank) and, where
the tensorboard package is installed, through the real SummaryWriter read back with TensorBoard's own reader.
Streaming runs on the shipped text-to-image digits teacher for a few CPU steps.
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from onestep_cli import distill
from onestep_cli.config import ConfigError, resolve_config
from onestep_cli.denoisers.diffusers.prompts import PromptFile, PromptFileError, read_prompts
from onestep_cli.engine.tracking import TrackerError, open_trackers
from onestep_cli.engine.switches import use_cuda_graph
from onestep_cli.engine.trainer import Trainer
from onestep_cli.runs.networks import build_networks
from onestep_cli.runtime.distributed import DistEnv

GMM = ["generator.mlp.hidden_dim=32", "fake.mlp.hidden_dim=32", "train.batch_size=64", "eval.metrics=[swd]",
       "eval.num_samples=200", "eval.every_steps=2", "train.tick_every=2", "train.checkpoint_every=2"]
DIGITS = ["train.batch_size=2", "train.tick_every=1", "train.checkpoint_every=2", "train.keep_checkpoints=5",
          "train.device=cpu"]
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def quiet(message):
    pass


def gmm_config(*overrides):
    return resolve_config("gmm-sid", overrides=[*GMM, *overrides])


# ---------------------------------------------------------------------------------------------------------------------
# Stand-ins for torch.utils.tensorboard and wandb.

class FakeWriter:
    """Records what a SummaryWriter is asked to do."""

    made: list[FakeWriter] = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = Path(log_dir), purge_step, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        assert isinstance(value, float) and isinstance(step, int)
        self.scalars.append((tag, step, value))

    def flush(self):
        pass

    def close(self):
        self.closed = True


class FakeWandbConfig(dict):
    def update(self, values, allow_val_change=False):
        assert allow_val_change or not any(self.get(k, v) != v for k, v in values.items())
        super().update(values)


class FakeWandbRun:
    def __init__(self, **init):
        self.init, self.rows, self.exit_code, self.config = init, [], None, FakeWandbConfig()

    def log(self, data, step):
        self.rows.append((step, dict(data)))

    def finish(self, exit_code=0):
        self.exit_code = exit_code


@pytest.fixture
def fakes(monkeypatch):
    """Fake `torch.utils.tensorboard` and `wandb` modules; returns (writers made, wandb runs made)."""
    FakeWriter.made = []
    runs = []
    tensorboard = types.ModuleType("torch.utils.tensorboard")
    tensorboard.SummaryWriter = FakeWriter
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **init: runs.append(FakeWandbRun(**init)) or runs[-1]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tensorboard)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    return FakeWriter.made, runs


# ---------------------------------------------------------------------------------------------------------------------
# logging: configuration.

def test_logging_is_off_by_default_and_its_keys_are_strict():
    config = resolve_config("gmm-sid")
    assert config.logging.tensorboard is False and config.logging.wandb is None
    with pytest.raises(ConfigError, match=r"Unknown key 'logging.tensorbord'. Did you mean 'logging.tensorboard'\?"):
        resolve_config("gmm-sid", overrides=["logging.tensorbord=true"])
    with pytest.raises(ConfigError, match=r"Did you mean 'logging.wandb.project'\?"):
        resolve_config("gmm-sid", overrides=["logging.wandb={projct: x}"])
    with pytest.raises(ConfigError, match=r"Missing key 'logging.wandb.project'"):
        resolve_config("gmm-sid", overrides=["logging.wandb={entity: me}"])
    assert resolve_config("gmm-sid", overrides=["logging.wandb.project=p"]).logging.wandb.project == "p"


# ---------------------------------------------------------------------------------------------------------------------
# Trackers in the loop.

def test_every_tick_and_evaluation_reaches_both_trackers_and_a_resume_appends(fakes, tmp_path):
    writers, runs = fakes
    run = tmp_path / "run"
    distill(gmm_config("train.max_steps=4"), run, log=quiet, progress=False)  # Trackers off: nothing made.
    assert not writers and not runs and not (run / "tensorboard").exists()

    # Switched on when the run is resumed (logging.* may change), it appends from the checkpoint on.
    shutil.rmtree(run / "checkpoints" / "step-00000004")  # As if killed after step 4's tick, before its checkpoint.
    config = gmm_config("train.max_steps=6", "logging.tensorboard=true", "logging.wandb.project=onestep-tests")
    distill(config, run, log=quiet, progress=False)
    (writer,), (wandb_run,) = writers, runs
    assert writer.log_dir == run / "tensorboard" and writer.purge_step == 3 and writer.closed
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in stats] == [2, 4, 6] and [row["step"] for row in metrics] == [2, 4, 6]
    for row in stats[1:]:  # Those written by the resumed process: every key, as train/<key> at its step.
        for key in ("loss_generator", "loss_fake", "grad_norm_generator", "kimg", "seconds_per_step"):
            assert ("train/" + key, row["step"], row[key]) in writer.scalars
        assert (row["step"], {f"train/{k}": v for k, v in row.items() if k != "step"}) in wandb_run.rows
    for row in metrics[1:]:
        assert ("eval/swd", row["step"], row["metrics"]["swd"]) in writer.scalars
        assert (row["step"], {"eval/swd": row["metrics"]["swd"]}) in wandb_run.rows
    assert {step for _, step, _ in writer.scalars} == {4, 6}
    init = wandb_run.init
    assert init["project"] == "onestep-tests" and init["dir"] == str(run) and init["resume"] == "allow"
    assert init["name"] == "run" and wandb_run.config["train"]["max_steps"] == 6 and wandb_run.exit_code == 0
    run_id = (run / "wandb" / "onestep-run-id").read_text().strip()
    assert init["id"] == run_id

    # Resumed again from its last checkpoint: the same W&B run, TensorBoard events after step 6 dropped.
    distill(gmm_config("train.max_steps=8", "logging.tensorboard=true", "logging.wandb.project=onestep-tests"), run,
            log=quiet, progress=False)
    assert writers[-1].purge_step == 7 and runs[-1].init["id"] == run_id


def test_only_rank_zero_opens_trackers(fakes, tmp_path):
    writers, runs = fakes
    config = gmm_config("logging.tensorboard=true", "logging.wandb.project=p")
    with open_trackers(config, tmp_path, None, enabled=False) as trackers:
        trackers.log_stats({"step": 1, "loss_generator": 1.0})
        trackers.log_metrics(1, {"swd": 0.5})
    assert not writers and not runs and not any(tmp_path.iterdir())


def test_a_failed_run_marks_its_wandb_run_failed(fakes, tmp_path):
    _, runs = fakes
    with pytest.raises(RuntimeError, match="boom"):
        with open_trackers(gmm_config("logging.wandb.project=p"), tmp_path, None):
            raise RuntimeError("boom")
    assert runs[0].exit_code == 1


def test_a_wandb_run_that_cannot_start_is_one_sentence(fakes, monkeypatch, tmp_path):
    def refuse(**init):
        raise RuntimeError("api_key not configured (no-tty)")

    monkeypatch.setattr(sys.modules["wandb"], "init", refuse)
    with pytest.raises(TrackerError, match=r"W&B could not start .* 'p'\): api_key not configured .*wandb login"):
        open_trackers(gmm_config("logging.wandb.project=p", "logging.tensorboard=true"), tmp_path, None)
    assert fakes[0][0].closed  # The writer opened before it is not left open.


@pytest.mark.parametrize("setting, module, package", [("logging.tensorboard=true", "torch.utils.tensorboard",
                                                        "tensorboard"),
                                                       ("logging.wandb.project=p", "wandb", "wandb")])
def test_a_missing_tracker_package_is_one_sentence_before_any_work(cli, monkeypatch, tmp_path, setting, module,
                                                                   package):
    monkeypatch.setitem(sys.modules, module, None)  # `import` then raises ImportError, as when not installed.
    with pytest.raises(TrackerError, match=f"pip install {package}"):
        distill(gmm_config(setting), tmp_path / "run", log=quiet, progress=False)
    result = cli.invoke("distill", "--preset", "gmm-sid", "--set", setting, "--out", tmp_path / "run")
    assert result.exit_code == 1 and f"pip install {package}" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_tensorboard_event_files_hold_every_tick_once_after_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    distill(gmm_config("train.max_steps=6", "logging.tensorboard=true"), run, log=quiet, progress=False)
    shutil.rmtree(run / "checkpoints" / "step-00000006")  # Killed after step 6's tick, before its checkpoint.
    distill(gmm_config("train.max_steps=8", "logging.tensorboard=true"), run, log=quiet, progress=False)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    logged = events.Scalars("train/loss_generator")
    assert [e.step for e in logged] == [row["step"] for row in stats] == [2, 4, 6, 8]
    assert [e.value for e in logged] == pytest.approx([row["loss_generator"] for row in stats], rel=1e-6)
    assert [e.step for e in events.Scalars("eval/swd")] == [2, 4, 6, 8]


# ---------------------------------------------------------------------------------------------------------------------
# Prompt files read on demand.

PROMPTS = ["a red bicycle", "two cats", "  the digit 7  ", "une bicyclette rouge é"]


def write_prompt_files(folder: Path) -> dict[str, Path]:
    files = {"txt": folder / "p.txt", "jsonl": folder / "p.jsonl", "json": folder / "captions.json"}
    files["txt"].write_bytes(("\n\n".join(PROMPTS[:2]) + "\r\n  \n" + "\n".join(PROMPTS[2:])).encode("utf-8"))
    files["jsonl"].write_text("\n".join(json.dumps({"prompt" if i % 2 else "caption": p, "id": i})
                                        for i, p in enumerate(PROMPTS)) + "\n\n", encoding="utf-8")
    files["json"].write_text(json.dumps({"annotations": [{"caption": p} for p in PROMPTS]}), encoding="utf-8")
    return files


@pytest.mark.parametrize("kind", ["txt", "jsonl", "json"])
def test_prompt_file_reads_on_demand_what_read_prompts_reads(tmp_path, kind):
    path = write_prompt_files(tmp_path)[kind]
    prompts = PromptFile(path)
    assert len(prompts) == len(PROMPTS)
    assert prompts.read(range(len(prompts))) == read_prompts(path) == [p.strip() for p in PROMPTS]
    assert prompts.read([3, 0, 3]) == [PROMPTS[3].strip(), PROMPTS[0], PROMPTS[3].strip()]


def test_a_large_prompt_file_is_indexed_by_offsets_not_held(tmp_path):
    path = tmp_path / "many.txt"
    count = 200_000
    path.write_text("".join(f"prompt number {i}\n" for i in range(count)))
    prompts = PromptFile(path)
    assert len(prompts) == count and prompts._texts is None and prompts._offsets.itemsize == 8
    assert prompts.read([count - 1, 12345, 0]) == [f"prompt number {count - 1}", "prompt number 12345",
                                                   "prompt number 0"]


@pytest.mark.parametrize("name, content, expected", [
    ("blank.txt", b"\n   \n\n", "holds no prompts"),
    ("empty.jsonl", b"", "holds no prompts"),
    ("empty.json", b"[]", "holds no prompts"),
    ("latin1.txt", "caf\u00e9\n".encode("latin-1"), "is not UTF-8 text"),
    ("bad.jsonl", b'{"prompt": "ok"}\n{"prompt": \n', "line 2 is not valid JSON"),
    ("folder.txt", None, "is a folder"),
    ("missing.txt", ..., "does not exist"),
])
def test_an_empty_or_unreadable_prompt_file_is_named(tmp_path, name, content, expected):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif content is not ...:
        path.write_bytes(content)
    for reader in (read_prompts, PromptFile):
        with pytest.raises(PromptFileError, match=expected) as error:
            reader(path)
        assert str(path) in str(error.value)


def test_a_prompt_file_changed_under_a_streaming_run_is_named(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("one\ntwo\nthree\n")
    prompts = PromptFile(path)
    path.write_text("one\n")
    with pytest.raises(PromptFileError, match=f"prompt file {path} changed after it was indexed"):
        prompts.read([2])


# ---------------------------------------------------------------------------------------------------------------------
# Streaming on the shipped text-to-image digits teacher.

@pytest.fixture(scope="module")
def digit_prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "digits.txt"
    path.write_text("".join(f"the digit {d}\n" for d in range(10)))
    return path


def digits_config(prompts: Path, *overrides):
    return resolve_config("digits-t2i-sim", overrides=[*DIGITS, f"prompts.path={prompts}", *overrides])


def test_streamed_prompts_draw_what_the_cache_draws(digit_prompts):
    from onestep_cli.denoisers.diffusers.training import (PromptSampler, StreamingPromptSampler, load_text_teacher,
                                                          training_prompt_sampler)

    config = digits_config(digit_prompts)
    pipeline = load_text_teacher(config.teacher)
    cached = training_prompt_sampler(config, pipeline, None)
    streamed = training_prompt_sampler(digits_config(digit_prompts, "prompts.cache_max=9"), pipeline, None)
    assert isinstance(cached, PromptSampler) and isinstance(streamed, StreamingPromptSampler)
    streamed.place(CPU)
    for seed in range(3):
        draw = lambda sampler: sampler(6, torch.Generator().manual_seed(seed), CPU)
        torch.testing.assert_close(draw(streamed).embeds, draw(cached).embeds, rtol=1e-5, atol=1e-5)
    half = training_prompt_sampler(digits_config(digit_prompts, "prompts.cache_max=0", "prompts.cache_dtype=float16"),
                                   pipeline, None)
    assert half(2, torch.Generator(), CPU).embeds.dtype == torch.float16


def test_streamed_prompts_refuse_the_cuda_graph_with_the_reason(digit_prompts):
    from onestep_cli.denoisers.diffusers.training import StreamingPromptSampler

    cuda, reason = torch.device("cuda"), StreamingPromptSampler.host_draw_reason
    assert not use_cuda_graph("auto", "bf16", DistEnv(), reason, cuda)
    refusal = r"train.cuda_graph is set, but the training prompts are streamed .*\(raise prompts.cache_max"
    with pytest.raises(ConfigError, match=refusal):
        use_cuda_graph(True, "bf16", DistEnv(), reason, cuda)
    config = digits_config(digit_prompts, "prompts.cache_max=0", "train.cuda_graph=true")
    with pytest.raises(ConfigError, match=refusal):  # What the Trainer asks of the sampler it is given.
        Trainer(config, build_networks(config), CPU, "fp32")


def test_a_streamed_run_resumes_bitwise(digit_prompts, tmp_path):
    config = digits_config(digit_prompts, "prompts.cache_max=4", "train.max_steps=4")
    reference = tmp_path / "reference"
    distill(config, reference, log=quiet, progress=False)
    assert not (reference / "prompts.safetensors").exists()  # Streamed: nothing encoded ahead.
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    for folder in (resumed / "checkpoints" / "step-00000004", resumed / "export"):
        shutil.rmtree(folder)
    summary = distill(config, resumed, log=quiet, progress=False)
    assert summary.resumed_from == 2 and summary.step == 4
    for name in ("generator", "fake", "ema", "optimizers"):
        want = load_file(str(reference / "checkpoints" / "step-00000004" / f"{name}.safetensors"))
        got = load_file(str(resumed / "checkpoints" / "step-00000004" / f"{name}.safetensors"))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    rows = [json.loads(line) for line in (resumed / "stats.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
