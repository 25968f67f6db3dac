"""`onestep demo --t2i`: the text-to-image path end to end on the shipped SD-style digits teacher.

Distil `digits-t2i-{objective}` for a few CPU minutes, then draw every held-out caption phrasing (phrasings the teacher
never saw in training) once with seed 0 from each one-step student and from the guided teacher (EDM's Heun sampler
on the diffusers teacher, as `onestep sample RUN --teacher --prompts`), score `prompt_accuracy` of each and compare.
"""

from __future__ import annotations

import time
from pathlib import Path

from .config import resolve_asset_path
from .jsonio import to_json
from .demo import distil_preset
from .runs.loading import load_generator_source
from .eval.evaluate import evaluate, store_result

T2I_PRESET = "digits-t2i-{objective}"
T2I_METRICS = ["prompt_accuracy", "weight_agreement", "slant_agreement"]
HELDOUT_PROMPTS = "@assets/digits_t2i_prompts/heldout.txt"
# The presets' GPU recipe (batch 64, 20-kimg EMA) scaled to a few CPU minutes, as `onestep demo` scales digits-sim.
T2I_CPU_SCALE = ["train.batch_size=16", "train.ema_halflife_kimg=0.5"]
T2I_STEPS = 200  # Generator updates.
TEACHER_STEPS = 13  # Heun steps: 25 network evaluations, the teacher's 25-step budget.


def run_t2i_demo(out_dir: Path, objectives: list[str], steps: int = T2I_STEPS, seeds: list[int] | None = None,
                 metrics: list[str] = T2I_METRICS, log=print) -> dict:
    """Distil the SD-style digits teacher with each objective for `steps` updates, draw the held-out prompts with
    `seeds` (default: seed 0) from each student and from the guided teacher, evaluate `metrics` and compare.
    Returns {"comparison", "runs", "report", "wall_seconds"}."""
    start = time.time()
    out_dir = Path(out_dir)
    seeds = seeds or [0]
    prompts = resolve_asset_path(HELDOUT_PROMPTS)
    runs = []
    for objective in objectives:
        run_dir = distil_preset(out_dir, T2I_PRESET.format(objective=objective), steps, T2I_CPU_SCALE, log)
        log(f"[demo] evaluating {', '.join(metrics)} of the one-step student on the held-out prompts")
        store_result(evaluate(run_dir, metrics, seeds=seeds, prompts=prompts), run_dir)
        runs.append(run_dir)

    teacher_dir = teacher_prompt_samples(runs[0], prompts, seeds, out_dir / "teacher-heun", log)
    teacher_eval = out_dir / "teacher-heun.json"
    teacher_eval.write_text(to_json(evaluate(teacher_dir, metrics), indent=1))

    from .report import compare, write_report

    comparison = compare([*runs, teacher_eval])
    report_dir = out_dir / "report"
    # Students' grids: a row per digit ('the digit 0' .. 'the digit 9' open the training prompts), a column per seed.
    write_report(comparison, report_dir, grid_seeds=list(range(8)), num_prompts=10, html=True, log=log)
    return {"comparison": comparison, "runs": runs, "report": report_dir, "wall_seconds": time.time() - start}


def teacher_prompt_samples(run_dir: Path, prompts: Path, seeds: list[int], out: Path, log) -> Path:
    """A folder of the run's guided teacher's images of every prompt and seed (Heun, 25 evaluations)."""
    from .denoisers.diffusers import read_prompts
    from .sample_io import write_prompt_samples
    from .sampling import generate_text_to_image, teacher_sampler

    log(f"[demo] sampling the guided teacher (Heun, {2 * TEACHER_STEPS - 1} evaluations) on the held-out prompts")
    loaded = load_generator_source(run_dir)
    texts = read_prompts(prompts)
    sampler = teacher_sampler(loaded.teacher, TEACHER_STEPS, loaded.pipeline.sigma_min, loaded.pipeline.sigma_max)
    images = generate_text_to_image(sampler, loaded.pipeline, texts, seeds, loaded.data_shape, batch_size=64)
    meta = {"source": str(Path(run_dir).resolve()), "model": "teacher", "sampler": "edm_heun",
            "steps": TEACHER_STEPS, "nfe": 2 * TEACHER_STEPS - 1,
            "guidance_scale": loaded.config.teacher.guidance_scale, "prompt_file": str(prompts)}
    write_prompt_samples(images, texts, seeds, out, meta)
    return out
