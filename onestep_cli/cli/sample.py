"""`onestep sample`: write samples of a run's generator, or of its teacher with the reference Heun sampler."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import MAX_SEEDS
from ..errors import UsageError
from ..sampling import parse_seeds
from .common import output_folder, print_json, reports_errors, stdout


def resolve_seeds(num: Optional[int], seeds: Optional[str]) -> list[int]:
    """--seeds wins; --num alone means seeds 0..num-1; both must agree."""
    if seeds is None:
        if num is None:
            raise UsageError("Say how many samples: --num N (seeds 0..N-1) or --seeds A-B.")
        return list(range(num))
    chosen = parse_seeds(seeds)
    if num is not None and num != len(chosen):
        raise UsageError(f"--num {num} disagrees with --seeds {seeds} ({len(chosen)} seeds); "
                         "give one or make them match.")
    return chosen


@reports_errors
def sample_command(
    source: Path = typer.Argument(..., help="Run directory or checkpoint folder."),
    num: Optional[int] = typer.Option(None, "--num", min=1, max=MAX_SEEDS,
                                      help="Number of samples (seeds 0..N-1 unless --seeds)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Per-sample seeds, e.g. 0-49999 or 0,5,10-12."),
    out: str = typer.Option(..., "--out", help="Output folder."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Text-to-image runs: prompt file (.txt, .jsonl "
                                           "or COCO .json); one image per prompt and seed, plus grid.png."),
    teacher: bool = typer.Option(False, "--teacher", help="Sample the run's teacher with EDM's Heun sampler instead."),
    steps: int = typer.Option(18, "--steps", min=1, help="Heun steps for --teacher (18 steps = 35 evaluations)."),
    batch: int = typer.Option(1024, "--batch", min=1, help="Samples per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
):
    """Write samples: PNG per seed for images (per prompt and seed for text-to-image runs, plus grid.png),
    samples.npz otherwise, plus samples.json."""
    from ..runs.loading import load_generator_source
    from ..runtime.precision import resolve_device
    from ..sample_io import write_samples
    from ..sampling import generate, generate_teacher, generator_sampler, seed_labels

    seed_list = resolve_seeds(num, seeds)
    out = output_folder(out)
    loaded = load_generator_source(source, device=resolve_device("auto"))
    device = next(loaded.generator.parameters()).device
    if loaded.pipeline is not None or prompts is not None:
        return _sample_text(loaded, source, prompts, seed_list, seeds, out, teacher, steps, batch, device, as_json)
    if teacher:
        samples = generate_teacher(loaded.teacher, seed_list, loaded.data_shape, loaded.label_dim, steps, batch, device)
        what = {"model": "teacher", "sampler": "edm_heun", "steps": steps, "nfe": 2 * steps - 1}
    else:
        samples = generate(loaded.generator, seed_list, loaded.data_shape, loaded.label_dim, batch, device)
        what = {"model": "generator", **generator_sampler(loaded.generator), "step": loaded.step, "kimg": loaded.kimg}
    meta = {"source": str(Path(source).resolve()), **what, "seeds": seeds or f"0-{len(seed_list) - 1}"}
    labels = seed_labels(seed_list, loaded.data_shape, loaded.label_dim)
    written = write_samples(samples, seed_list, out, meta, labels)
    if as_json:
        print_json({"out": str(out), "files": len(written), **meta})
    else:
        stdout.print(f"Wrote {len(seed_list)} {what['model']} samples to {out}.", highlight=False)


def _sample_text(loaded, source, prompts, seed_list, seeds, out, teacher, steps, batch, device, as_json):
    from ..denoisers.diffusers import read_prompts
    from ..sample_io import write_prompt_samples
    from ..sampling import generate_text_to_image, generator_sampler, teacher_sampler

    if loaded.pipeline is None:
        raise UsageError(f"--prompts needs a text-to-image run (teacher.kind: diffusers); {source} distils a "
                         f"{loaded.config.teacher.kind} teacher, so leave --prompts out.")
    if prompts is None:
        raise UsageError(f"{source} is a text-to-image run: give the prompts to draw with --prompts FILE (.txt, "
                         ".jsonl or COCO .json).")
    texts = read_prompts(prompts)
    loaded.pipeline.pipeline.vae.to(device)
    if teacher:
        model = teacher_sampler(loaded.teacher, steps, loaded.pipeline.sigma_min, loaded.pipeline.sigma_max)
        what = {"model": "teacher", "sampler": "edm_heun", "steps": steps, "nfe": 2 * steps - 1,
                "guidance_scale": loaded.config.teacher.guidance_scale}
    else:
        model = loaded.generator
        what = {"model": "generator", **generator_sampler(loaded.generator), "step": loaded.step, "kimg": loaded.kimg}
    images = generate_text_to_image(model, loaded.pipeline, texts, seed_list, loaded.data_shape, batch, device)
    meta = {"source": str(Path(source).resolve()), **what, "seeds": seeds or f"0-{len(seed_list) - 1}",
            "prompt_file": str(prompts)}
    written = write_prompt_samples(images, texts, seed_list, out, meta)
    if as_json:
        print_json({"out": str(out), "files": len(written), "grid": str(out / "grid.png"),
                    **{k: v for k, v in meta.items()}})
    else:
        stdout.print(f"Wrote {len(written)} {what['model']} images ({len(texts)} prompts x {len(seed_list)} seeds) "
                     f"and grid.png to {out}.", highlight=False)
