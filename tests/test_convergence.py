"""Each gmm preset distils the 8-Gaussian ring as shipped (no test-specific tuning); its wall time is printed, not
asserted (about 30-40 s each on an idle 2-core CPU; docs/results.md), since shared CI machines vary.

SIM and SiD must cover every mode with an swd within 3x the swd between two independent exact sample sets of the
same size; DMD and DI minimise the reverse KL, which is known to seek modes, so they need cover only 75% of them.
The values reached are printed (run pytest with -s) and recorded in docs/results.md.
"""

import pytest

from onestep_cli import distill
from onestep_cli.config import resolve_config


@pytest.mark.slow
@pytest.mark.parametrize("preset, min_coverage, max_swd_ratio", [
    ("gmm-sim", 1.0, 3.0),
    ("gmm-sid", 1.0, 3.0),
    ("gmm-dmd", 0.75, None),
    ("gmm-di", 0.75, None),
])
def test_preset_distils_the_ring(tmp_path, preset, min_coverage, max_swd_ratio):
    summary = distill(resolve_config(preset), tmp_path / preset, log=lambda message: None, progress=False)
    rows = (tmp_path / preset / "metrics.jsonl").read_text().splitlines()
    import json

    final = json.loads(rows[-1])
    swd, coverage = final["metrics"]["swd"], final["metrics"]["mode_coverage"]
    floor = final["provenance"]["swd"]["exact_vs_exact"]
    print(f"{preset}: swd {swd:.4f} (exact-vs-exact {floor:.4f}, ratio {swd / floor:.2f}), "
          f"mode_coverage {coverage:.3f}, {summary.wall_seconds:.1f} s")
    assert coverage >= min_coverage
    if max_swd_ratio is not None:
        assert swd <= max_swd_ratio * floor
