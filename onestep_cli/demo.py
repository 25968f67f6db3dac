"""The README's main job on the embedded default: distil the shipped digits teacher, evaluate the one-step student
and the teacher's 35-NFE samples on the same seeds, and compare them.

The teacher's Heun samples for seeds 0-999 ship beside its weights (about 3 minutes of a 2-core CPU to remake);
they are used only while their record names the same teacher weights and sampler, otherwise they are regenerated
into the demo folder.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from .config import resolve_asset_path, resolve_config
from .jsonio import to_json
from .runs.loading import load_generator_source
from .engine.loop import distill
from .runs.run_dir import RunDir
from .eval.evaluate import evaluate, store_result
from .sample_io import to_uint8_images
from .sampling import generate_teacher, seed_labels

DEMO_PRESET = "digits-{objective}"
DEMO_METRICS = ["fd_digits", "class_accuracy"]
DEMO_SAMPLES = 1000  # Seeds 0-999, the count of the targets (against all 1797 real digits).
# The presets' GPU recipe (batch 256, 20-kimg EMA) scaled to a few CPU minutes: a 20-kimg EMA would average over
# the whole short run, its random start included.
CPU_SCALE = ["train.batch_size=64", "train.ema_halflife_kimg=2"]
DEMO_STEPS = 300  # Generator updates: about 3 minutes on a 2-core CPU (the preset's full budget is longer).
TEACHER_STEPS = 18  # EDM's reference setting: 35 network evaluations.
TEACHER_SAMPLES = "@assets/digits_teacher/heun35-seeds0-999.npz"


def run_demo(out_dir: Path, objectives: list[str], steps: int = DEMO_STEPS, num: int = DEMO_SAMPLES,
             metrics: list[str] = DEMO_METRICS, log=print) -> dict:
    """Distil the digits teacher with each objective for `steps` updates, evaluate `metrics` on seeds 0..num-1 of
    each student and of the teacher (Heun, 35 NFE), and compare them. Returns {"comparison", "runs", "report",
    "wall_seconds"}."""
    start = time.time()
    out_dir = Path(out_dir)
    runs = []
    for objective in objectives:
        run_dir = distil_preset(out_dir, DEMO_PRESET.format(objective=objective), steps, CPU_SCALE, log)
        log(f"[demo] evaluating {', '.join(metrics)} of the one-step student on seeds 0-{num - 1}")
        store_result(evaluate(run_dir, metrics, num=num), run_dir)
        runs.append(run_dir)

    teacher_npz = teacher_samples(runs[0], num, out_dir, log)
    teacher_eval = out_dir / "teacher-heun35.json"
    teacher_eval.write_text(to_json(evaluate(teacher_npz, metrics), indent=1))

    from .report import compare, write_report

    comparison = compare([*runs, teacher_eval])
    report_dir = out_dir / "report"
    write_report(comparison, report_dir, grid_seeds=list(range(16)), html=True, log=log)
    return {"comparison": comparison, "runs": runs, "report": report_dir, "wall_seconds": time.time() - start}


def distil_preset(out_dir: Path, preset: str, steps: int, cpu_scale: list[str], log) -> Path:
    """Distil `preset` for `steps` updates at the demo's CPU scale into out_dir/preset, without in-training eval."""
    run_dir = out_dir / preset
    log(f"[demo] distilling preset {preset} for {steps} steps into {run_dir}")
    config = resolve_config(preset, overrides=[f"train.max_steps={steps}", "eval.metrics=[]", *cpu_scale])
    distill(config, run_dir, log=log, progress=False)
    return run_dir


def teacher_samples(run_dir: Path, num: int, out_dir: Path, log) -> Path:
    """An .npz of the run's teacher sampled with Heun (35 NFE) on seeds 0..num-1: the shipped one when it was made
    by these teacher weights and holds enough seeds, else freshly sampled into out_dir."""
    teacher_path = RunDir(run_dir).read_config().teacher.resolved_path
    weights_sha256 = _weights_sha256(teacher_path)
    shipped = resolve_asset_path(TEACHER_SAMPLES)
    if shipped.is_file():
        with np.load(shipped) as data:
            record = json.loads(str(data["record"]))
            if record.get("teacher_sha256") == weights_sha256 and record.get("steps") == TEACHER_STEPS \
                    and data["samples"].shape[0] >= num:
                log(f"[demo] teacher Heun samples (35 NFE) of seeds 0-{num - 1}: shipped in {shipped}")
                if data["samples"].shape[0] == num:
                    return shipped
                path = out_dir / f"teacher-heun35-seeds0-{num - 1}.npz"
                np.savez(path, samples=data["samples"][:num], labels=data["labels"][:num],
                         seeds=data["seeds"][:num], record=data["record"])
                return path
    log(f"[demo] sampling the teacher with Heun (35 NFE) on seeds 0-{num - 1} (a few minutes on a CPU)")
    path = out_dir / f"teacher-heun35-seeds0-{num - 1}.npz"
    loaded = load_generator_source(run_dir)  # Only now: the shipped samples need no networks.
    write_teacher_samples(loaded.teacher, loaded.data_shape, loaded.label_dim, teacher_path, num, path)
    return path


def write_teacher_samples(teacher, data_shape, label_dim: int, teacher_path: Path, num: int, path: Path) -> Path:
    """Sample `teacher` with Heun (35 NFE) on seeds 0..num-1 into an image .npz with labels and a record."""
    seeds = list(range(num))
    images = generate_teacher(teacher, seeds, data_shape, label_dim, TEACHER_STEPS)
    record = {"teacher": str(teacher_path), "teacher_sha256": _weights_sha256(teacher_path), "sampler": "edm_heun",
              "steps": TEACHER_STEPS, "nfe": 2 * TEACHER_STEPS - 1, "seeds": f"0-{num - 1}"}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, samples=to_uint8_images(images), labels=seed_labels(seeds, data_shape, label_dim),
             seeds=np.asarray(seeds, dtype=np.int64), record=json.dumps(record))
    return path


def _weights_sha256(teacher_path: Path) -> str:
    folder = Path(teacher_path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else [folder]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()
