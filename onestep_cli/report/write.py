"""A comparison written to a folder: table.md, table.csv, compare.json and the metric curves; on request the image
grids of every generator on the same seeds (grids/) and one self-contained page of it all (report.html)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..jsonio import to_json as json_text
from .comparison import Comparison
from .grids import GRID_BATCH, GRID_PROMPTS, sample_grids, write_grids
from .page import render_html
from .plots import plot_metric_curves
from .sources import ReportError
from .table import to_csv, to_json, to_markdown

GRIDS_DIR = "grids"
HTML = "report.html"


def write_report(comparison: Comparison, out_dir: str | Path, *, grid_seeds: list[int] | None = None,
                 html: bool = False, num_prompts: int = GRID_PROMPTS, device="cpu", batch_size: int = GRID_BATCH,
                 log: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Write the tables, compare.json and one curve PNG per metric into out_dir; return relative path -> path.

    Asked for, as they cost more than reading files: `grid_seeds` loads every generator and writes grids/ (one PNG
    per image generator and grid.png of them all, see `grids.py`; `log` hears of each source skipped); `html`
    writes report.html, which holds the tables, curves, grids and provenance and opens offline.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"{out_dir} is a file; pass a folder (new or existing) to write the report into.")
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {
        "table.md": to_markdown(comparison),
        "table.csv": to_csv(comparison),
        "compare.json": json_text(to_json(comparison), indent=2) + "\n",
    }
    written = {}
    for name, text in texts.items():
        written[name] = out_dir / name
        written[name].write_text(text)
    curves = plot_metric_curves(comparison, out_dir)
    for path in curves:
        written[path.name] = path
    grids = grid_files = None
    if grid_seeds is not None:
        grids = sample_grids(comparison, grid_seeds, num_prompts, device, batch_size, log)
        grid_files = write_grids(grids, out_dir / GRIDS_DIR)
        if grid_files.combined is not None:
            for path in [grid_files.combined, *grid_files.models.values()]:
                written[path.relative_to(out_dir).as_posix()] = path
    if html:
        written[HTML] = out_dir / HTML
        written[HTML].write_text(render_html(comparison, curves, grids, grid_files), encoding="utf-8")
    return written
