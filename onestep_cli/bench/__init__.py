"""Benchmarks of the engine: the real training step, one-step sampling and EDM Heun on the real networks, with
images/s, peak memory, FLOP utilisation and each row's target (docs/benchmarks.md). `onestep bench` is the command
line."""

from .count import Work, count_work
from .rows import DEFAULT_ROWS, ROWS, Row, build_network, parse_rows
from .run import PEAK_BANDWIDTH, PEAK_BF16_FLOPS, Options, count_row, measure_row, run_benchmarks

__all__ = ["DEFAULT_ROWS", "PEAK_BANDWIDTH", "PEAK_BF16_FLOPS", "ROWS", "Options", "Row", "Work", "build_network",
           "count_row", "count_work", "measure_row", "parse_rows", "run_benchmarks"]
