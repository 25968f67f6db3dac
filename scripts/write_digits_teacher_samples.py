"""Write the shipped digits teacher's Heun samples (35 NFE, seeds 0-999) that `onestep demo` compares against:

    PYTHONPATH=. python scripts/write_digits_teacher_samples.py [--num 1000]

The file records the SHA-256 of the teacher weights it was sampled from; `onestep demo` uses it only while that
matches, and otherwise samples the teacher itself.
"""

from __future__ import annotations

import argparse

from onestep_cli.config import resolve_asset_path, resolve_config
from onestep_cli.demo import DEMO_SAMPLES, TEACHER_SAMPLES, write_teacher_samples
from onestep_cli.runs.networks import build_networks


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=DEMO_SAMPLES, help="Seeds 0..num-1.")
    args = parser.parse_args(argv)
    config = resolve_config("digits-sim")
    networks = build_networks(config)
    path = write_teacher_samples(networks.teacher, networks.data_shape, networks.label_dim,
                                 config.teacher.resolved_path, args.num, resolve_asset_path(TEACHER_SAMPLES))
    print(f"Wrote {path}.")


if __name__ == "__main__":
    main()
