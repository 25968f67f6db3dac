"""The README's main job on the embedded default: distil, sample, evaluate and compare against the teacher."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .config import resolve_config
from .engine.loading import load_generator_source
from .engine.loop import distill
from .evaluation import evaluate, store_result
from .sample_io import write_samples
from .sampling import generate_teacher

DEMO_METRICS = ["swd", "mode_coverage"]
DEMO_SAMPLES = 2000
TEACHER_STEPS = 18  # EDM's reference setting: 35 network evaluations.


def run_demo(out_dir: Path, objectives: list[str], log=print) -> dict:
    """Distil the analytic ring with each objective, evaluate the students and the teacher's Heun samples, and
    compare them. Returns {"runs": [...], "eval_files": [...], "report": path, "wall_seconds": float}."""
    start = time.time()
    out_dir = Path(out_dir)
    runs = []
    for objective in objectives:
        run_dir = out_dir / f"gmm-{objective}"
        log(f"[demo] distilling preset gmm-{objective} into {run_dir}")
        distill(resolve_config(f"gmm-{objective}"), run_dir, log=log, progress=False)
        store_result(evaluate(run_dir, DEMO_METRICS, DEMO_SAMPLES), run_dir)
        runs.append(run_dir)

    log(f"[demo] sampling the teacher with Heun ({2 * TEACHER_STEPS - 1} NFE) on the same seeds")
    loaded = load_generator_source(runs[0])
    seeds = list(range(DEMO_SAMPLES))
    teacher_samples = generate_teacher(loaded.teacher, seeds, loaded.data_shape, loaded.label_dim, TEACHER_STEPS)
    samples_dir = out_dir / "teacher-heun35-samples"
    write_samples(teacher_samples, seeds, samples_dir, {"source": str(runs[0].resolve()), "model": "teacher",
                                                        "sampler": "edm_heun", "steps": TEACHER_STEPS})
    teacher_eval = out_dir / "teacher-heun35.json"
    teacher_eval.write_text(json.dumps(evaluate(samples_dir, DEMO_METRICS), indent=1, default=str))

    from .report import compare, write_report

    comparison = compare([*runs, teacher_eval])
    report_dir = out_dir / "report"
    write_report(comparison, report_dir)
    return {"comparison": comparison, "runs": runs, "report": report_dir, "wall_seconds": time.time() - start}
