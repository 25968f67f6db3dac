"""`onestep sample`: write samples of a run's generator, or of its teacher with the reference Heun sampler."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..sampling import parse_seeds
from .common import print_json, reports_errors, stdout


def resolve_seeds(num: Optional[int], seeds: Optional[str]) -> list[int]:
    """--seeds wins; --num alone means seeds 0..num-1; both must agree."""
    if seeds is None:
        if num is None:
            raise ValueError("Say how many samples: --num N (seeds 0..N-1) or --seeds A-B.")
        return list(range(num))
    chosen = parse_seeds(seeds)
    if num is not None and num != len(chosen):
        raise ValueError(f"--num {num} disagrees with --seeds {seeds} ({len(chosen)} seeds); give one or make them match.")
    return chosen


@reports_errors
def sample_command(
    source: Path = typer.Argument(..., help="Run directory or checkpoint folder."),
    num: Optional[int] = typer.Option(None, "--num", min=1, help="Number of samples (seeds 0..N-1 unless --seeds)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Per-sample seeds, e.g. 0-49999 or 0,5,10-12."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    teacher: bool = typer.Option(False, "--teacher", help="Sample the run's teacher with EDM's Heun sampler instead."),
    steps: int = typer.Option(18, "--steps", min=1, help="Heun steps for --teacher (18 steps = 35 evaluations)."),
    batch: int = typer.Option(1024, "--batch", min=1, help="Samples per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
):
    """Write samples: PNG per seed for images, samples.npz otherwise, plus samples.json."""
    from ..engine.loading import load_generator_source
    from ..engine.precision import resolve_device
    from ..sample_io import write_samples
    from ..sampling import generate, generate_teacher

    seed_list = resolve_seeds(num, seeds)
    loaded = load_generator_source(source, device=resolve_device("auto"))
    device = next(loaded.generator.parameters()).device
    if teacher:
        samples = generate_teacher(loaded.teacher, seed_list, loaded.data_shape, loaded.label_dim, steps, batch, device)
        what = {"model": "teacher", "sampler": "edm_heun", "steps": steps, "nfe": 2 * steps - 1}
    else:
        samples = generate(loaded.generator, seed_list, loaded.data_shape, loaded.label_dim, batch, device)
        what = {"model": "generator", "sampler": "one_step", "nfe": 1, "step": loaded.step, "kimg": loaded.kimg}
    meta = {"source": str(Path(source).resolve()), **what, "seeds": seeds or f"0-{len(seed_list) - 1}"}
    written = write_samples(samples, seed_list, out, meta)
    if as_json:
        print_json({"out": str(out), "files": len(written), **meta})
    else:
        stdout.print(f"Wrote {len(seed_list)} {what['model']} samples to {out}.", highlight=False)
