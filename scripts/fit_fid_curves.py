"""Fit FID = c + A exp(-kimg / tau) to runs' metrics.jsonl (claim (b) of docs/results.md, issue 8).

Usage: python scripts/fit_fid_curves.py docs/results/runs/digits32-x8-sid-lr1e-4 [RUN ...]

Two fits per run: over every evaluation (from step 0) and over those from 25.6 kimg on, where the first drop is
left out; R^2 says how much of the curve's variance the exponential explains.
"""

import json
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import curve_fit


def exponential(kimg, amplitude, tau, floor):
    return floor + amplitude * np.exp(-kimg / tau)


def fit(kimg: np.ndarray, fid: np.ndarray, start: tuple) -> tuple[float, float, float]:
    """(floor, tau, R^2) of the least-squares exponential through the points."""
    params, _ = curve_fit(exponential, kimg, fid, p0=start, maxfev=20000)
    residual = fid - exponential(kimg, *params)
    return params[2], params[1], 1 - np.sum(residual**2) / np.sum((fid - fid.mean()) ** 2)


def main(runs: list[str]) -> None:
    print("| run | all: floor, tau (kimg), R^2 | from 25.6 kimg: floor, tau, R^2 | monotone |")
    print("|---|---|---|---|")
    for run in runs:
        rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]
        kimg = np.array([row["kimg"] for row in rows])
        fid = np.array([row["metrics"]["fid"] for row in rows])
        later = kimg >= 25
        whole = fit(kimg, fid, (100, 20, 10))
        tail = fit(kimg[later], fid[later], (20, 100, 5))
        print(f"| {Path(run).name} | {whole[0]:.2f}, {whole[1]:.1f}, {whole[2]:.3f} | "
              f"{tail[0]:.2f}, {tail[1]:.1f}, {tail[2]:.3f} | {bool(np.all(np.diff(fid) <= 0))} |")


if __name__ == "__main__":
    main(sys.argv[1:])
