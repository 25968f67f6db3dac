"""`onestep bench` and the engine's speed switches: every row runs (--quick, tiny networks on the CPU), the work is
counted as the issue counts it, the switches are inert where they do not apply, and faster runs track fp32 eager.

Timings are never asserted: CI has no GPU. The GPU numbers live in docs/benchmarks.md with their commands.
"""

from __future__ import annotations

import inspect
import itertools
import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from onestep_cli.bench import DEFAULT_ROWS, ROWS, Options, count_row, count_work, run_benchmarks
from onestep_cli.bench.run import auto_engine
from onestep_cli.bench.tracking import VARIANTS, tracking_check
from onestep_cli.denoisers.blocks import DIFFUSERS_TRANSFORMER, DIFFUSERS_UNET, EDM_UNET, MLP
from onestep_cli.denoisers.edm import layers
from onestep_cli.denoisers.edm.layers import GroupNorm
from onestep_cli.engine.switches import SWITCHES, resolve_switches
from onestep_cli.runtime.precision import compile_failure
from test_edm_networks import build, edm_attention, make_inputs

WIDE = {"COLUMNS": "250"}  # The bench table unwrapped.


@pytest.mark.slow
@pytest.mark.e2e
def test_quick_bench_runs_every_row_in_under_a_minute(cli):
    start = time.time()
    result = cli.run("bench", "--quick", "--json", check=False, env=WIDE)
    elapsed = time.time() - start
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["row"] for row in rows] == DEFAULT_ROWS
    for row in rows:
        assert row["device"] == "cpu" and row["precision"] == "fp32" and row["options"]["tiny"]
        assert row["images_per_s"] > 0 and row["flops_per_image"] > 0 and row["floor_images_per_s"] > 0
        assert row["matmul_flops_per_s"] > 0 and row["copy_bytes_per_s"] > 0  # Measured here, not a constant.
        assert 0 < row["flop_utilisation"] == pytest.approx(
            row["flops_per_image"] * row["images_per_s"] / row["matmul_flops_per_s"])
        assert not {"target", "met"} & set(row)  # The user's hardware is measured, not judged.
    assert elapsed < 60


@pytest.mark.e2e
def test_quick_bench_table_says_what_utilisation_is_measured_against(cli):
    result = cli.invoke("bench", "--quick", "--rows", "dmd-cifar10,heun-cifar10", env=WIDE)
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    for needle in ("dmd-cifar10", "heun-cifar10", "images/s", "peak GB", "TFLOP/s", "FLOP util.",
                   "this device's rate for a large square matrix product", "measured here (fp32:",
                   "measured copy bandwidth", "timings mean nothing", "dmd-cifar10: auto picks compile off, CUDA "
                   "graph off, channels_last off: the device is the CPU (they are CUDA settings). Timed with: "
                   "compile off, cuda_graph off, channels_last off."):
        assert needle in text
    for absent in ("target", "met", "H100"):  # Nothing of one machine's numbers or the project's goals.
        assert not re.search(rf"\b{absent}\b", text), absent


@pytest.mark.parametrize("args, needle", [(["--rows", "sid-cifar11"], "sid-cifar11"),
                                          (["--precision", "bf8"], "bf8")])
def test_bad_bench_arguments_are_usage_errors(cli, args, needle):
    result = cli.invoke("bench", "--quick", *args, env=WIDE)
    assert result.exit_code == 2 and needle in result.stderr


def test_bf16_is_refused_on_the_cpu_with_a_sentence(cli):
    result = cli.invoke("bench", "--quick", "--rows", "sample-cifar10", "--precision", "bf16", env=WIDE)
    assert result.exit_code == 1 and "needs a CUDA device" in result.stderr


def test_ddpmpp_forward_counts_the_issues_42_4_gflop(one_thread):
    work = count_row(ROWS["sample-cifar10"])  # The real 55.7M-parameter network, one forward, batch 1 and 2.
    assert work.flops_per_image == pytest.approx(42.4e9, rel=2e-3)
    assert work.flops_fixed == 0 and work.bytes_fixed > 0  # The weights are read once per call, whatever the batch.


def test_sid_step_costs_eleven_forwards_and_dmd_nine(one_thread):
    forward = count_row(ROWS["sample-cifar10"], tiny=True).flops_per_image
    # Fake update: generator forward + fake forward and backward (4); generator update: generator forward and
    # backward (3) + teacher and fake forward (2), and for SiD/SIM their backward to the input (2 more).
    assert count_row(ROWS["sid-cifar10"], tiny=True).flops_per_image / forward == pytest.approx(11, rel=0.01)
    assert count_row(ROWS["sim-cifar10"], tiny=True).flops_per_image / forward == pytest.approx(11, rel=0.01)
    assert count_row(ROWS["dmd-cifar10"], tiny=True).flops_per_image / forward == pytest.approx(9, rel=0.01)
    assert count_row(ROWS["heun-cifar10"], tiny=True, heun_steps=18).flops_per_image / forward == pytest.approx(35)


def test_attention_counts_the_flops_of_the_einsums_it_replaces(one_thread, monkeypatch):
    # SDPA's CPU kernel, forward and backward, is counted (bench/count.py) as EDM's two einsums and their gradients.
    net, inputs = build("adm_cond_aug_edm"), make_inputs("adm_cond_aug_edm")

    def step_at(batch):
        def step():
            x, sigma, cond, augment = (inputs[key][:batch] for key in ("x", "sigma", "cond", "augment_labels"))
            net(x.requires_grad_(True), sigma, cond, augment_labels=augment).square().sum().backward()
        return step

    with_sdpa = count_work(step_at)
    monkeypatch.setattr(layers, "self_attention", edm_attention)
    with_einsums = count_work(step_at)
    assert with_sdpa.flops_per_image == with_einsums.flops_per_image > 0
    assert with_sdpa.flops_fixed == with_einsums.flops_fixed


@pytest.mark.e2e
def test_quick_bench_with_cuda_graph_runs_the_deferred_step_and_says_it_was_not_captured(cli):
    result = cli.run("bench", "--quick", "--rows", "sid-cifar10", "--cuda-graph", "--json", check=False, env=WIDE)
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert row["options"]["cuda_graph"] and row["graph_captured"] is False and row["images_per_s"] > 0
    assert "train.cuda_graph is set but the device is the CPU" in " ".join(result.stderr.split())


def test_switches_are_inert_on_the_cpu(one_thread):
    from onestep_cli.bench import build_trainer

    options = Options.quick(channels_last=True, fused_optimizer=True)
    trainer = build_trainer(ROWS["sid-cifar10"], 2, "fp32", options, torch.device("cpu"))
    assert not trainer.opt_generator.defaults.get("fused") and not trainer.compiled
    weight = trainer.generator.denoiser.model.enc["8x8_conv"].weight
    assert weight.is_contiguous()  # NCHW, as before: channels_last applies on CUDA only.
    trainer.step()
    # `onestep bench --auto`: the training rows run what auto picks (eager on the CPU), as the bench reports it.
    auto = build_trainer(ROWS["sid-cifar10"], 2, "fp32", Options.quick(auto_engine=True), torch.device("cpu"))
    assert auto.config.train.compile == auto.config.train.cuda_graph == auto.config.train.channels_last == "auto"
    assert auto.switches == auto_engine(ROWS["sid-cifar10"], "fp32", torch.device("cpu"))
    assert not (auto.compiled or auto.defer_checks or auto.switches.channels_last)


def test_group_norm_keeps_16_bit_activations_under_autocast():
    norm, x = GroupNorm(16), torch.randn(2, 16, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x.bfloat16()).dtype == torch.bfloat16
        GroupNorm.autocast_float32 = True
        try:
            assert norm(x.bfloat16()).dtype == torch.float32  # CUDA autocast's own choice, on request.
        finally:
            GroupNorm.autocast_float32 = False
    assert norm(x).dtype == torch.float32
    torch.testing.assert_close(norm(x), torch.nn.functional.group_norm(x, 4, eps=1e-5))


def test_quick_rows_run_compiled_or_fall_back(one_thread):
    """train.compile on a machine where torch.compile works compiles; where it does not, the run goes on eager."""
    failure = compile_failure(torch.device("cpu"))
    (result,) = run_benchmarks([ROWS["sample-cifar10"]], Options.quick(compile=True, iters=1))
    assert result["compiled"] == (failure is None) and result["images_per_s"] > 0


@pytest.mark.slow
def test_bf16_compiled_and_graphed_runs_track_fp32_eager_on_gmm_sid(one_thread):
    """A few hundred steps of gmm-sid: bf16 autocast (run on the CPU through the Trainer: the command line refuses
    bf16 there for speed, not correctness), torch.compile and train.cuda_graph (on the CPU: its deferred checks and
    fused Adam) end where fp32 eager ends (criteria: onestep_cli/bench/tracking.py; all four gmm presets:
    docs/benchmarks.md)."""
    variants = {"bf16": VARIANTS["bf16"], "cuda_graph": VARIANTS["cuda_graph"]}
    if compile_failure(torch.device("cpu")) is None:
        variants["compiled"] = VARIANTS["compiled"]
    result = tracking_check("gmm-sid", variants, steps=200, seeds=(0, 1), base=["train.device=cpu"])
    for name, variant in result["variants"].items():
        print(f"{name}: early losses within {variant['early_max_rel_diff']:.1e}, swd {variant['metrics']['swd']:.4f} "
              f"vs fp32 seeds {result['fp32_range']['swd']} (widened by {result['tolerance']['swd']:.4f})")
        assert variant["passed"], (name, variant["checks"])


@pytest.mark.slow
def test_bf16_run_tracks_fp32_eager_on_the_digits_teacher(one_thread):
    """The same check on the shipped digits teacher, short: bf16's first loss within rounding of fp32's, and the
    final fd_digits and class accuracy within the band of the fp32 seeds widened by the metrics' noise
    (docs/benchmarks.md has the 300-step runs). At batch 32 (half the CPU time of 64) the two fp32 seeds end closer
    (fd_digits 0.2 apart, 1.5 at 64), so the metric's own noise is most of the band."""
    result = tracking_check("digits-sim", {"bf16": VARIANTS["bf16"]}, steps=20, seeds=(0, 1),
                            base=["train.device=cpu", "train.batch_size=32"])
    variant = result["variants"]["bf16"]
    assert set(variant["checks"]) == {"early_losses", "fd_digits", "class_accuracy"}
    assert 0 < variant["early_max_rel_diff"] <= 5e-2  # Rounding, not nothing: bf16 did run.
    assert 0.3 < result["tolerance"]["fd_digits"] < 2  # Two deviations of the metric's noise at 1000 samples.
    assert variant["passed"], variant["checks"]


@pytest.mark.slow
def test_a_text_to_image_digits_preset_is_checked_on_both_networks_first_losses(one_thread, monkeypatch):
    """digits-t2i-sim (an SD-style diffusers teacher) has no final metric here: the first steps' losses of the
    generator and of the fake score are the check, and a fake score that goes wrong fails it alone."""
    from onestep_cli.bench import tracking

    assert tracking.family("digits-flow-sim") == tracking.family("digits-t2i-sim") == "text-to-image"
    assert tracking.family("digits-sim") == "digits"
    base = ["train.device=cpu", "train.batch_size=4"]
    result = tracking_check("digits-t2i-sim", {"cuda_graph": VARIANTS["cuda_graph"]}, steps=3, seeds=(0,), base=base)
    variant = result["variants"]["cuda_graph"]
    assert set(variant["checks"]) == {"early_losses"} and variant["metrics"] == {}
    assert len(variant["early_loss_fake"]) == len(variant["early_loss_generator"]) == 3
    assert variant["passed"], variant["checks"]

    train_once = tracking.train_once

    def fake_score_off(preset, overrides, steps, seed, precision=None):  # The variant's fake score, 1% off.
        run = train_once(preset, overrides, steps, seed, precision)
        if "train.cuda_graph=true" in overrides:
            run["early_loss_fake"] = [1.01 * loss for loss in run["early_loss_fake"]]
        return run

    monkeypatch.setattr(tracking, "train_once", fake_score_off)
    result = tracking_check("digits-t2i-sim", {"cuda_graph": VARIANTS["cuda_graph"]}, steps=3, seeds=(0,), base=base)
    assert result["variants"]["cuda_graph"]["checks"] == {"early_losses": False} and not result["passed"]
    assert "FAILED (early_losses)" in tracking.summary(result)[0]


@pytest.mark.slow
def test_every_configuration_auto_picks_tracks_fp32_eager_on_gmm_sid(one_thread, capsys):
    """`--variants auto-configs`: one variant per configuration that train.compile, cuda_graph and channels_last at
    auto can pick, each in its precision, and auto itself, on gmm-sid for 20 steps (criteria:
    onestep_cli/bench/tracking.py). What the CPU cannot test is reported as not run, with why, never passed."""
    from onestep_cli.bench.tracking import main

    code = main(["--presets", "gmm-sid", "--variants", "auto-configs", "--steps", "20", "--seeds", "0,1",
                 "--device", "cpu", "--set", "eval.num_samples=500"])
    out, err = capsys.readouterr()
    result, lines = json.loads(out), " ".join(err.split())
    # A choice auto can make (walked here apart from bench/auto_choices.py) without its variant fails here.
    assert set(result["variants"]) == {name for name in every_auto_choice() if name != "fp32"} | {"auto"}
    compiles = compile_failure(torch.device("cpu")) is None
    for name, variant in result["variants"].items():
        if "channels_last" in name or ("compile" in name and not compiles):  # NCHW on the CPU; or eager.
            assert variant["run"] is False and variant["passed"] is None and name in result["not_run"]
            assert f"gmm-sid {name}: not run: {variant['not_run']}" in lines
        else:
            assert variant["run"] and variant["passed"], (name, variant["checks"])
            assert variant["precision"] == ("fp32" if name == "auto" else name.split("+")[0])
            assert f"gmm-sid {name}: passed; {variant['precision']}, early losses within" in lines
            ran = {switch: variant["engine"][switch] for switch in SWITCHES}
            assert ran == {switch: switch in name.split("+")[1:] for switch in SWITCHES}
    assert 0 < result["variants"]["bf16+cuda_graph"]["early_max_rel_diff"] <= 5e-2  # bf16 did round.
    assert "not captured on the CPU" in " ".join(result["variants"]["bf16+cuda_graph"]["notes"])
    auto = " ".join(result["variants"]["auto"]["notes"])
    assert "auto resolved to compile off, CUDA graph off, channels_last off: the device is the CPU" in auto
    assert "does not test what auto picks on a CUDA device" in auto
    assert code == 0 and result["passed"]


def every_auto_choice() -> set[str]:
    """The names ("bf16+compile+cuda_graph") of every precision and switches resolve_switches returns at auto."""
    cases = {"device_type": ("cuda", "cpu", "mps"), "precision": ("fp32", "bf16", "fp16"),
             "family": (EDM_UNET, DIFFUSERS_UNET, DIFFUSERS_TRANSFORMER, MLP, "other"), "world_size": (1, 2, 8),
             "parallelism": ("ddp", "fsdp"), "prompts_on_host": (False, True, "prompts stream from a file"),
             "lr_warmup": (False, True), "compile_failure": (None, "no compiler"), "generator_steps": (1, 4)}
    keywords = [name for name, parameter in inspect.signature(resolve_switches).parameters.items()
                if parameter.kind is inspect.Parameter.KEYWORD_ONLY]
    assert set(keywords) == set(cases), "resolve_switches takes new arguments: walk their values here"
    names = set()
    for values in itertools.product(*cases.values()):
        switches = resolve_switches("auto", "auto", "auto", **dict(zip(cases, values)))
        names.add("+".join([values[1], *(name for name in SWITCHES if getattr(switches, name))]))
    return names


def test_tracking_refuses_presets_without_a_resolution_and_unknown_variants(capsys, monkeypatch):
    from onestep_cli.bench import auto_choices
    from onestep_cli.bench.tracking import main

    assert main(["--presets", "cifar10-uncond-sid"]) == 2
    assert "'cifar10-uncond-sid' is neither" in capsys.readouterr().err
    assert main(["--presets", "gmm-sid", "--variants", "fp8"]) == 2
    assert "Unknown variant 'fp8'; choose from bf16, compiled, cuda_graph, auto-configs (all of: bf16+compile+" in \
        capsys.readouterr().err
    assert main(["--presets", "gmm-sid", "--seeds", "0-2"]) == 2
    assert "--seeds '0-2' is not a comma-separated list of integers" in capsys.readouterr().err
    # A new argument of resolve_switches could change auto's choice: the tracking check refuses to guess its values.
    monkeypatch.setattr(auto_choices, "resolve_switches", lambda *a, device_type, gpu_model="h100", **k: None)
    with pytest.raises(RuntimeError, match="resolve_switches takes gpu_model, which bench/auto_choices.py does not"):
        auto_choices.auto_choices()


def test_bench_modules_form_no_import_circle_and_share_no_private_names():
    """Every import between the bench's modules (at the top or inside a function) goes one way, and none takes another
    module's private (underscored) name: shared helpers are public, in their own module (bench/timing.py)."""
    import ast

    import onestep_cli.bench

    folder = Path(onestep_cli.bench.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        graph[path.stem] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from .{node.module}"
                graph[path.stem].add(node.module or "__init__")
    assert graph["eval_rows"] and graph["run"]  # The walk found the imports it checks.

    def reaches(start, target, seen=()):
        return any(module == target or (module not in seen and reaches(module, target, (*seen, module)))
                   for module in graph.get(start, ()))

    circles = [module for module in graph if module != "__init__" and reaches(module, module)]
    assert not circles, f"import circle through {circles}"


def test_profile_kinds_name_kernels_by_what_they_do():
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from profile_step import kind_of

    assert kind_of("void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::"
                   "BinaryFunctor<float, float, float>>") == "element-wise"
    assert kind_of("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>") == \
        "copy / layout / cast"
    assert kind_of("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>") == "copy / layout / cast"
    assert kind_of("triton_poi_fused__to_copy_native_group_norm_silu_2") == "fused (triton)"
    assert kind_of("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "matmul / conv"
