"""A comparison as one self-contained HTML page: tables, curves, grids and provenance, opening offline.

Every image is a base64 data URI and the only style is inline: the page references no file, script, font or
stylesheet. Every string that comes from a source (labels, paths, config values, prompts, provenance) is escaped.
"""

from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path

from .comparison import Comparison
from .grids import GridFiles, Grids
from .table import MISSING, config_header, config_rows, measurement_header, measurement_rows, metric_header, metric_rows

DISPLAY_WIDTH = 640  # Pixels: small grids (8x8 digits) are enlarged, without smoothing, towards this width.
MAX_ENLARGEMENT = 8

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; }
img.pixels { image-rendering: pixelated; }
figure { margin: 1em 0; }
pre { background: #f6f6f6; padding: 0.5em; overflow-x: auto; }
details { margin: 0.4em 0; }
summary { cursor: pointer; font-weight: bold; }
"""


def render_html(comparison: Comparison, curves: list[Path], grids: Grids | None = None,
                grid_files: GridFiles | None = None) -> str:
    """The page: sources, metrics, config differences, the curve PNGs, the grid PNGs and each metric's provenance."""
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             "<title>onestep compare</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
             "<h1>onestep compare</h1>", *_sources(comparison), "<h2>Metrics</h2>",
             _table(metric_header(comparison), metric_rows(comparison), numeric_from=2)]
    if len(config_header(comparison)) > 2:
        parts.append("<h2>Config differences</h2>")
        parts.append(_table(config_header(comparison), config_rows(comparison)) if comparison.config_differences
                     else "<p>The configs are identical.</p>")
    if comparison.measurement_differences:
        parts += ["<h2>Measured differently</h2>", "<p>Provenance keys on which the sources of a metric differ: "
                  "their numbers are not comparable at face value.</p>",
                  _table(measurement_header(comparison), measurement_rows(comparison))]
    if curves:
        parts.append("<h2>Curves</h2>")
        parts += [_figure(path, path.stem) for path in curves]
    if grids is not None:
        parts += _grids(grids, grid_files or GridFiles(None, {}))
    parts += [*_provenance(comparison), "</body>", "</html>"]
    return "\n".join(parts) + "\n"


def _sources(comparison: Comparison) -> list[str]:
    items = [f"<li><b>{escape(s.label)}</b>: {escape(s.kind)}, <code>{escape(str(s.path))}</code></li>"
             for s in comparison.sources]
    return ["<h2>Sources</h2>", "<ul>", *items, "</ul>"]


def _table(header: list[str], rows: list[list[str]], numeric_from: int | None = None) -> str:
    def cell(index: int, text: str) -> str:
        numeric = numeric_from is not None and index >= numeric_from
        return f'<td class="number">{escape(text)}</td>' if numeric else f"<td>{escape(text)}</td>"

    head = "".join(f"<th>{escape(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(cell(i, text) for i, text in enumerate(row)) + "</tr>\n" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def _grids(grids: Grids, files: GridFiles) -> list[str]:
    parts = ["<h2>Samples</h2>",
             f"<p>Each generator's own steps (one unless it has generator.num_steps) per image, on the seeds "
             f"{escape(_seed_text(grids.seeds))} for every model, a column per seed.</p>"]
    if files.combined is not None:
        parts.append(_figure(files.combined, "All models, one below the other", pixels=True))
    for label, path in files.models.items():
        caption = label
        if label in grids.prompts:
            caption += " (rows: " + "; ".join(f"“{prompt}”" for prompt in grids.prompts[label]) + ")"
        parts.append(_figure(path, caption, pixels=True))
    if grids.skipped:
        parts += ["<p>Without a grid:</p>", "<ul>",
                  *(f"<li><b>{escape(label)}</b>: {escape(reason)}</li>" for label, reason in grids.skipped.items()),
                  "</ul>"]
    return parts


def _provenance(comparison: Comparison) -> list[str]:
    if not comparison.metrics:
        return []
    parts = ["<h2>Provenance</h2>", "<p>How each metric was measured, per source.</p>"]
    for metric in comparison.metrics:
        parts.append(f"<details><summary>{escape(metric)}</summary>")
        for s in comparison.sources:
            if metric not in s.metrics:
                continue
            record = s.provenance.get(metric)
            text = json.dumps(record, indent=1, default=str, ensure_ascii=False) if record else MISSING
            parts.append(f"<p><b>{escape(s.label)}</b></p><pre>{escape(text)}</pre>")
        parts.append("</details>")
    return parts


def _figure(path: Path, caption: str, pixels: bool = False) -> str:
    data = path.read_bytes()
    attributes = ""
    if pixels:
        width = _png_width(data)
        scale = max(1, min(MAX_ENLARGEMENT, DISPLAY_WIDTH // width))
        attributes = f' class="pixels" width="{width * scale}"'
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (f'<figure><img src="{uri}" alt="{escape(caption)}"{attributes}>'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def _png_width(data: bytes) -> int:
    return int.from_bytes(data[16:20], "big")  # The IHDR chunk, right after the 8-byte signature, starts with it.


def _seed_text(seeds: list[int]) -> str:
    from ..sample_io import format_seeds

    return format_seeds(seeds) or ""
