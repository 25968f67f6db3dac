"""train.compile, train.cuda_graph and train.channels_last resolved for one run: what `auto` turns on, and why not.

`auto` picks the fastest configuration measured for the run's network family (docs/benchmarks.md, "What `auto`
picks"), on one CUDA device:

- EDM U-Nets (DDPM++, ADM, the digits teachers): compile, CUDA graph and channels_last together (the SiD step on
  DDPM++ CIFAR-10 at batch 256: 679 img/s against 384 eager on an H100). Compile only under the graph (without it the
  host's kernel launches set the pace and compile gains nothing), channels_last only under both (eagerly it is 33%
  slower: ATen's GroupNorm runs NCHW).
- diffusers transformers (PixArt, SD3, SANA): eager. Compile (+33% on PixArt) and the graph are faster, and PixArt
  and SD3 pass the tracking check with both in bf16, but SANA's check has not run (`UNVERIFIED_ON_TRANSFORMERS`);
  no channels_last (no 4-D activations).
- diffusers U-Nets (SD, SDXL) and MLP denoisers: the CUDA graph only; compile and channels_last are not measured there.

The CUDA graph needs one process, bf16 or fp32, no FSDP, no learning-rate warm-up and prompts' conditions on the GPU
(`cuda_graph_obstacles`). All three are CUDA settings: on any other device `auto` is off, so CPU runs stay eager.
An explicit true or false is used as given (a graph that cannot be captured is an error).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ConfigError
from ..denoisers.blocks import DIFFUSERS_TRANSFORMER, DIFFUSERS_UNET, EDM_UNET, MLP
from ..denoisers.diffusers.training import PromptSampler

SWITCHES = ("compile", "cuda_graph", "channels_last")
LABELS = {"compile": "compile", "cuda_graph": "CUDA graph", "channels_last": "channels_last"}
FAMILY_NAMES = {EDM_UNET: "EDM U-Nets", DIFFUSERS_UNET: "diffusers U-Nets",
                DIFFUSERS_TRANSFORMER: "diffusers transformers", MLP: "MLP denoisers"}
# The tracking check passes PixArt's and SD3's bf16 configurations; SANA's is still owed (docs/benchmarks.md).
UNVERIFIED_ON_TRANSFORMERS = ("not yet verified by the tracking check on every diffusers transformer "
                              "(docs/benchmarks.md); true turns it on")


@dataclass(frozen=True)
class EngineSwitches:
    """The speed switches a run uses, and why each that is off is off (for auto) or what set it (explicit)."""

    compile: bool
    cuda_graph: bool
    channels_last: bool
    family: str  # The network family they were chosen for (denoisers/blocks.py's network_family).
    reasons: dict[str, str] = field(default_factory=dict)  # Switch -> why it is off, or the setting that chose it.

    def without_compile(self, reason: str) -> "EngineSwitches":
        """The same switches with compile off: train.compile=true, but torch.compile did not work here."""
        return EngineSwitches(False, self.cuda_graph, self.channels_last, self.family,
                              {**self.reasons, "compile": reason})

    def describe(self) -> str:
        """One line for stderr: each switch on or off, then why those that are off are off."""
        states = ", ".join(f"{LABELS[name]} {'on' if getattr(self, name) else 'off'}" for name in SWITCHES)
        reasons = {name: self.reasons[name] for name in SWITCHES if name in self.reasons}
        if len(reasons) == len(SWITCHES) and len(set(reasons.values())) == 1:
            return f"engine: {states}: {next(iter(reasons.values()))}."
        grouped: dict[str, list[str]] = {}  # Switches off for the same reason are named together.
        for name, reason in reasons.items():
            grouped.setdefault(reason, []).append(LABELS[name])
        details = "".join(f" {' and '.join(names)} off: {reason}." for reason, names in grouped.items())
        return f"engine: {states}.{details}"

    def record(self) -> dict:
        """What run.json keeps: the switches used, the network family and the reasons."""
        return {**{name: getattr(self, name) for name in SWITCHES}, "network": self.family, "reasons": self.reasons}

    @classmethod
    def from_record(cls, record: dict) -> "EngineSwitches":
        """The switches a `record()` holds (run.json's "engine", `onestep bench --json`'s "auto_engine")."""
        return cls(*(record[name] for name in SWITCHES), record["network"], record.get("reasons", {}))


def cuda_graph_obstacles(precision: str, world_size: int, prompts_on_host: bool | str, parallelism: str = "ddp",
                         lr_warmup: bool = False, generator_steps: int = 1) -> list[str]:
    """Why this run's step cannot be one static CUDA graph (empty: it can, on a CUDA device). `prompts_on_host`: each
    step's prompts come through the CPU: True (too many cached conditions for the GPU), or the reason, a phrase."""
    reasons = []
    if generator_steps > 1:
        reasons.append(f"generator.num_steps={generator_steps} runs a different number of generator steps in each "
                       "update (set generator.num_steps=1)")
    if lr_warmup:
        reasons.append("train.lr_warmup_iterations changes the learning rate on the host every update (set it to 0)")
    if parallelism == "fsdp":
        reasons.append("FSDP gathers and frees shards from the host around every block (use train.parallelism=ddp)")
    if precision == "fp16":
        reasons.append("fp16's GradScaler decides on the host (use train.precision=bf16)")
    if world_size > 1:
        reasons.append(f"it runs one process, not {world_size} (drop --gpus or the launcher)")
    if isinstance(prompts_on_host, str):
        reasons.append(prompts_on_host)
    elif prompts_on_host:
        reasons.append(f"the training prompts' conditions exceed the {PromptSampler.DEVICE_BYTES / 2**30:.0f} GiB kept "
                       "on the GPU, so each step copies its prompts from the CPU (use fewer prompts)")
    return reasons


def _cuda_graph(setting, obstacles: list[str], on_cuda: bool) -> bool:
    """train.cuda_graph resolved: true refuses, with the setting to change, a run that cannot be captured (and keeps
    its deferred checks on a CPU, with a warning from the Trainer); auto is on exactly where capture can apply."""
    if setting == "auto":
        return on_cuda and not obstacles
    if setting and obstacles:
        raise ConfigError("train.cuda_graph is set, but " + "; and ".join(obstacles) + ". Set train.cuda_graph=false "
                          "(or auto) for this run.")
    return bool(setting)


def use_cuda_graph(setting, precision: str, env, prompts_on_host: bool | str, device, parallelism: str = "ddp",
                   lr_warmup: bool = False, generator_steps: int = 1) -> bool:
    """train.cuda_graph alone resolved for the process group `env` on `device` (see `_cuda_graph`)."""
    obstacles = cuda_graph_obstacles(precision, env.world_size, prompts_on_host, parallelism, lr_warmup,
                                     generator_steps)
    return _cuda_graph(setting, obstacles, device.type == "cuda")


def resolve_switches(compile, cuda_graph, channels_last, *, device_type: str, precision: str, family: str,
                     world_size: int = 1, parallelism: str = "ddp", prompts_on_host: bool | str = False,
                     lr_warmup: bool = False, compile_failure: str | None = None,
                     generator_steps: int = 1) -> EngineSwitches:
    """train.compile, train.cuda_graph and train.channels_last (each true, false or "auto") for a run on
    `device_type` with `world_size` processes, `parallelism` (ddp or fsdp), `precision` (resolved: fp32, bf16, fp16)
    and the network `family`. `compile_failure`: why torch.compile does not work here, if a probe found it so.
    A pure function (no device is touched); a ConfigError for train.cuda_graph=true where capture cannot apply."""
    on_cuda = device_type == "cuda"
    reasons: dict[str, str] = {}
    where = "the CPU" if device_type == "cpu" else f"a {device_type} device"
    off_device = f"the device is {where} (they are CUDA settings)"
    family_name = FAMILY_NAMES.get(family, "this network")

    obstacles = cuda_graph_obstacles(precision, world_size, prompts_on_host, parallelism, lr_warmup, generator_steps)
    graph = _cuda_graph(cuda_graph, obstacles, on_cuda)
    if cuda_graph == "auto" and graph and family == DIFFUSERS_TRANSFORMER:
        graph, reasons["cuda_graph"] = False, UNVERIFIED_ON_TRANSFORMERS
    elif cuda_graph == "auto" and not graph:
        reasons["cuda_graph"] = off_device if not on_cuda else "; ".join(obstacles)
    elif not graph:
        reasons["cuda_graph"] = "train.cuda_graph=false"

    if compile == "auto":
        if not on_cuda:
            compiled, reasons["compile"] = False, off_device
        elif compile_failure is not None:
            compiled, reasons["compile"] = False, f"torch.compile does not work here ({compile_failure})"
        elif family == EDM_UNET:
            compiled = graph
            if not graph:
                reasons["compile"] = ("without the CUDA graph the host's kernel launches set the pace of an EDM U-Net "
                                      "step and compile gains nothing")
        elif family == DIFFUSERS_TRANSFORMER:
            compiled, reasons["compile"] = False, UNVERIFIED_ON_TRANSFORMERS
        else:
            compiled, reasons["compile"] = False, f"not measured on {family_name} (train.compile=true turns it on)"
    else:
        compiled = bool(compile)
        if not compiled:
            reasons["compile"] = "train.compile=false"

    if channels_last == "auto":
        if not on_cuda:
            nhwc, reasons["channels_last"] = False, off_device
        elif family == EDM_UNET:
            nhwc = compiled and graph
            if not nhwc:
                reasons["channels_last"] = ("EDM U-Nets run faster in it only compiled and under the CUDA graph "
                                            "(eagerly 33% slower)")
        elif family == DIFFUSERS_TRANSFORMER:
            nhwc, reasons["channels_last"] = False, "a transformer's activations are not 4-D images"
        else:
            nhwc, reasons["channels_last"] = False, f"not measured on {family_name}"
    else:
        nhwc = bool(channels_last)
        if not nhwc:
            reasons["channels_last"] = "train.channels_last=false"
    return EngineSwitches(compiled, graph, nhwc, family, reasons)


def any_auto(train) -> bool:
    """Whether `train` (a TrainConfig) leaves any of the three switches to `auto`."""
    return any(getattr(train, name) == "auto" for name in SWITCHES)
