"""Benchmarks of this device: the engine's real training step, one-step sampling and EDM Heun on the real networks,
and the evaluation paths as `onestep eval` runs them, with images/s, peak memory and FLOP utilisation against the
device's own measured matrix-product rate. `onestep bench` is the command line."""

from .count import Work, count_work
from .rows import DEFAULT_ROWS, ROWS, Options, Row, build_network, parse_rows
from .run import build_trainer, count_row, measure_row, prepare_row, run_benchmarks

__all__ = ["DEFAULT_ROWS", "ROWS", "Options", "Row", "Work", "build_network", "build_trainer", "count_row",
           "count_work", "measure_row", "parse_rows", "prepare_row", "run_benchmarks"]
