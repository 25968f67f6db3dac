import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Never let a test wait on hub retries: everything here is offline by design.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Cli:
    """`onestep` for tests: the same app, printing and exiting as a user sees it, in this process or in a new one.

    `invoke` runs the Typer app in this process (no interpreter start-up; monkeypatches reach it). `run` and `start`
    run the installed console script, for what the process itself promises: its exit code, signals, worker processes,
    and training that leaves this process's global state alone.
    """

    script = str(Path(sys.executable).parent / "onestep")
    # Wide enough that rich wraps no message a test looks for; one thread per process: two CPU cores are shared.
    env = {"COLUMNS": "200", "OMP_NUM_THREADS": "1"}

    def invoke(self, *args, env: dict | None = None):
        """In process through typer's runner: a result with exit_code, stdout, stderr and output (both)."""
        from typer.testing import CliRunner

        from onestep_cli.cli.app import app

        return CliRunner(env={"COLUMNS": self.env["COLUMNS"], **(env or {})}).invoke(app, [str(a) for a in args])

    def run(self, *args, check: bool = True, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        """The console script to completion; with `check`, a non-zero exit fails the test with the command's stderr."""
        result = subprocess.run([self.script, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, **self.env, **(env or {})})
        if check and result.returncode != 0:
            raise AssertionError(f"onestep {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr}")
        return result

    def start(self, *args, env: dict | None = None, stdout=subprocess.PIPE,
              stderr=subprocess.PIPE) -> subprocess.Popen:
        """The console script in the background (text streams), for tests that signal or kill it."""
        return subprocess.Popen([self.script, *map(str, args)], stdout=stdout, stderr=stderr, text=True,
                                env={**os.environ, **self.env, **(env or {})})


@pytest.fixture(scope="session")
def cli() -> Cli:
    """The command line (see Cli); session-wide, so module-scoped fixtures can build their runs with it."""
    return Cli()


def _on_one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Tiny networks on the shared two-core CPU run faster on one thread than on contended intra-op threads."""
    yield from _on_one_thread()


@pytest.fixture(scope="module")
def one_thread_per_module():
    """one_thread for a whole module of tiny-network tests (`pytestmark = pytest.mark.usefixtures(...)`)."""
    yield from _on_one_thread()


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> dict[str, str]:
    """Random weights of the real scorer architectures (test_metrics_tiny_models.py's builders), once a session."""
    from test_metrics_tiny_models import write_all_tiny_weights

    return write_all_tiny_weights(tmp_path_factory.mktemp("tiny-weights"))
