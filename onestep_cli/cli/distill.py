"""`onestep distill`: resolve the config (preset, --config, --set), then train or resume a run.

With `--gpus N` (or `--nnodes`) the command re-runs itself under torch.distributed.run, one process per GPU; under
an existing launcher (torchrun, Slurm's srun) it joins the process group the launcher set up instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import DEFAULT_PRESET, config_to_yaml, resolve_config
from .common import info, output_folder, print_json, quiet, reports_errors, stdout, warn, worker_command


def distill_command(
    preset: Optional[str] = typer.Option(None, "--preset",
                                         help=f"Named recipe (default {DEFAULT_PRESET}); see `onestep presets`."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="YAML file merged over the preset."),
    overrides: list[str] = typer.Option([], "--set", help="key.path=value, applied last; repeatable."),
    out: str = typer.Option("runs/distill", "--out", help="Run directory; an existing run there is resumed."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="Processes on this node, one per GPU (CPU processes on gloo "
                             "when no GPU is visible). Ignored under torchrun/srun, which set the processes."),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="Nodes in a multi-node run; run the same command on each."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="This node's index, 0 to nnodes-1."),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="Hostname of node 0, reachable from every "
                                              "node (the rendezvous endpoint); needed with --nnodes > 1."),
    master_port: int = typer.Option(29500, "--master-port", help="Free TCP port on node 0 for the rendezvous."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print the result (or the dry-run config) as JSON on stdout."),
):
    """Distil a teacher into a one-step generator (SIM, SiD, DMD or DI)."""
    code = _distill(preset, config_file, overrides, out, gpus, nnodes, node_rank, master_addr, master_port, dry_run,
                    as_json)
    if code:  # Raised out here: typer.Exit is a RuntimeError, which reports_errors would report as an error.
        raise typer.Exit(code)


@reports_errors
def _distill(preset, config_file, overrides, out, gpus, nnodes, node_rank, master_addr, master_port, dry_run,
             as_json) -> int:
    config = resolve_config(preset, config_file, overrides)
    if dry_run:
        if as_json:
            print_json(config.model_dump(mode="json"))
        else:
            stdout.print(config_to_yaml(config), highlight=False, markup=False, end="")
        return 0
    out = output_folder(out)
    from ..runtime.distributed import launcher_env

    launcher = launcher_env()
    if launcher is None and (gpus > 1 or nnodes > 1):
        from ..engine.launch import LaunchPlan, launch

        plan = LaunchPlan(gpus, nnodes, node_rank, master_addr, master_port if nnodes > 1 else None)
        command = ["distill", "--out", str(out), *(["--preset", preset] if preset else []),
                   *(["--config", str(config_file)] if config_file else []),
                   *[arg for assignment in overrides for arg in ("--set", assignment)],
                   *(["--json"] if as_json else [])]  # The same command, for every worker.
        return launch(config, out, plan, worker_command(command), log=warn)
    if launcher is not None and launcher.rank == 0 and (gpus > 1 or nnodes > 1):
        info(f"Note: running as one of the {launcher.world_size} processes the launcher started; --gpus/--nnodes "
             "are ignored under torchrun or srun.")

    from ..engine.loop import distill

    # An error every rank raises alike is printed by rank 0 (reports_errors).
    summary = distill(config, out, log=info, progress=False if quiet() else None)
    if summary.rank != 0:
        return 0
    result = {"out": str(summary.out_dir), "step": summary.step, "kimg": summary.kimg,
              "wall_seconds": round(summary.wall_seconds, 3), "resumed_from": summary.resumed_from,
              "metrics": summary.final_metrics, "stopped_by": summary.stopped_by, "processes": summary.world_size}
    if as_json:
        print_json(result)
    elif summary.stopped_by is None:
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in summary.final_metrics.items())
        stdout.print(f"Finished {summary.out_dir}: step {summary.step}, {summary.kimg:.1f} kimg, "
                     f"{summary.wall_seconds:.1f} s. {metrics}", highlight=False)
    return 0
