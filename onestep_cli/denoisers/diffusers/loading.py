"""Load a diffusers teacher from a local folder or a Hugging Face hub id, and wrap it as a denoiser.

A hub id loads as diffusers loads it: from the Hugging Face cache (`HF_HOME` / `HF_HUB_CACHE`) when it is there,
else downloaded into that cache on first use by diffusers' own `DiffusionPipeline.download` (the pipeline's
components only, safetensors, the asked variant), with its progress on stderr; `revision` (a commit hash) pins the
files. `HF_HUB_OFFLINE=1` forbids the download and says so. Weights load as safetensors where present (diffusers'
`.bin` fallback uses `torch.load(weights_only=True)`); no remote code is trusted.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import OnestepError
from .adapter import DiffusersDenoiser
from .conditioning import Conditioning
from .flow import FlowDenoiser
from .guidance import GuidedDenoiser, null_condition
from .pixart import PixArtDenoiser
from .prompts import PromptCache, PromptEncoder, encode_prompts_cached, pipeline_network
from .schedule import DDPMSigmaSchedule, FlowSigmaSchedule
from .unet import UNetDenoiser
from .weights_check import unloaded_weights

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DiffusersLoadError(OnestepError, ValueError):
    """A teacher that cannot be loaded; the message names the folder or hub id and what to do."""


def resolve_pretrained(source: str | Path, revision: str | None = None, variant: str | None = None) -> Path:
    """The local folder of `source`: an existing diffusers folder, or the snapshot of a hub id in the Hugging Face
    cache, downloaded first if it is not there (unless HF_HUB_OFFLINE is set).

    Raises DiffusersLoadError when the folder is missing or not a diffusers pipeline, or the id can be neither found
    in the cache nor downloaded.
    """
    text = os.path.expanduser(str(source))
    path = Path(text)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise DiffusersLoadError(f"teacher folder {path} has no model_index.json, so it is not a diffusers "
                                     "pipeline folder; point teacher.path at the folder that holds model_index.json "
                                     "(as written by pipeline.save_pretrained).")
        return path
    if not HUB_ID.match(text) or path.is_absolute() or text.startswith("."):
        raise DiffusersLoadError(f"teacher folder {path} does not exist; give teacher.path as a local diffusers "
                                 "folder (with model_index.json) or a Hugging Face hub id such as "
                                 "'stabilityai/stable-diffusion-xl-base-1.0'.")
    folder = _cached_snapshot(text, revision) or _download_snapshot(text, revision, variant)
    if not (folder / "model_index.json").is_file():
        raise DiffusersLoadError(f"the cached snapshot of {text!r} at {folder} has no model_index.json; it is not "
                                 f"a diffusers pipeline or its download is incomplete: run `hf download {text}`.")
    return folder


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The snapshot of `repo_id` at `revision` in the Hugging Face cache, None when it is not there (no network)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (OSError, ValueError):  # LocalEntryNotFoundError, HFValidationError, a cache without this revision...
        return None
    return folder if (folder / "model_index.json").is_file() else None


def _download_snapshot(repo_id: str, revision: str | None, variant: str | None) -> Path:
    """Download a pipeline into the Hugging Face cache as `DiffusionPipeline.from_pretrained` would."""
    from huggingface_hub import constants

    at = f" at revision {revision}" if revision else ""
    if constants.HF_HUB_OFFLINE:
        raise DiffusersLoadError(
            f"teacher {repo_id!r}{at} is neither a local folder nor in the local Hugging Face cache "
            f"{constants.HF_HUB_CACHE}, and HF_HUB_OFFLINE is set, so it cannot be downloaded. Download it once where "
            f"there is network access (`hf download {repo_id}` with the same HF_HOME), unset HF_HUB_OFFLINE, or set "
            "teacher.path to a local diffusers folder.")
    from diffusers import DiffusionPipeline

    print(f"Downloading teacher {repo_id}{at} into the Hugging Face cache {constants.HF_HUB_CACHE} (once; later "
          "runs load it from there).", file=sys.stderr, flush=True)
    try:
        return Path(DiffusionPipeline.download(repo_id, revision=revision, variant=variant))
    except (OSError, ValueError) as error:  # Not found, gated, no such revision, no network (all OSError)...
        raise DiffusersLoadError(
            f"teacher {repo_id!r}{at} could not be downloaded from the Hugging Face hub ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}). Check the id and teacher.revision, log in "
            "with `hf auth login` for a gated model whose license you accepted, or set teacher.path to a local "
            "diffusers folder.") from error


def load_pipeline(source: str | Path, torch_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  variant: str | None = None, revision: str | None = None):
    """The diffusers pipeline of `source` (local folder or hub id), on `device` in `torch_dtype`."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled

    if are_progress_bars_disabled():  # HF_HUB_DISABLE_PROGRESS_BARS (`onestep --quiet` sets it), as transformers does.
        diffusers_logging.disable_progress_bar()
    folder = resolve_pretrained(source, revision, variant)
    try:
        pipeline = DiffusionPipeline.from_pretrained(folder, dtype=torch_dtype, variant=variant,
                                                     local_files_only=True, **absent_components(folder))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise DiffusersLoadError(f"the diffusers pipeline in {folder} (teacher {source}) cannot be loaded: {error}. "
                                 "Check that every component's weights are there (re-download or re-save the "
                                 "pipeline), and that variant= matches the weight files.") from error
    check_text_encoder_weights(pipeline, folder, variant)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def check_text_encoder_weights(pipeline, folder: Path, variant: str | None = None) -> None:
    """A DiffusersLoadError if transformers left any of the pipeline's text encoders without its saved weights
    (weights_check.py says when that happens)."""
    import transformers

    for name, component in pipeline.components.items():
        if not isinstance(component, transformers.PreTrainedModel):
            continue
        differing = unloaded_weights(component, Path(folder) / name, variant)
        if differing:
            raise DiffusersLoadError(
                f"transformers {transformers.__version__} loaded {Path(folder) / name} ({type(component).__name__}) "
                f"without its saved weights: {len(differing)} tensors differ from the files, e.g. {differing[0]}, "
                "so it would encode prompts with random weights. Its files name the tensors in a layout this "
                "transformers version does not map; save them under the model's own names (as the Hugging Face "
                "hub's checkpoints are) or use the transformers version that wrote them (transformers_version in "
                "its config.json).")


def absent_components(folder: Path) -> dict:
    """`{name: None}` for the components model_index.json saves as absent (`[null, null]`), such as SD3's T5 when a
    pipeline is saved without it: diffusers loads those only when they are passed as None."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return {name: None for name, value in index.items()
            if not name.startswith("_") and isinstance(value, list) and value == [None, None]}


def build_denoiser(pipeline) -> DiffusersDenoiser:
    """The sigma-unit adapter of a loaded pipeline's network (shares its modules; no copy)."""
    network = pipeline_network(pipeline)
    vae = pipeline.vae
    latent_kwargs = dict(vae_scale_factor=int(getattr(pipeline, "vae_scale_factor", 8)),
                         vae_scaling_factor=float(getattr(vae.config, "scaling_factor", 1.0)),
                         vae_shift_factor=float(getattr(vae.config, "shift_factor", None) or 0.0))
    scheduler = pipeline.scheduler
    prediction_type = getattr(scheduler.config, "prediction_type", None)
    name = type(network).__name__
    if name in ("SD3Transformer2DModel", "SanaTransformer2DModel") or prediction_type == "flow_prediction":
        return FlowDenoiser(network, FlowSigmaSchedule.from_scheduler(scheduler), **latent_kwargs)
    if not hasattr(scheduler, "alphas_cumprod"):
        raise DiffusersLoadError(f"{type(scheduler).__name__} is neither a DDPM-family nor a flow-matching scheduler; "
                                 "onestep cannot map it to sigma units.")
    schedule = DDPMSigmaSchedule.from_scheduler(scheduler)
    if name == "UNet2DConditionModel":
        return UNetDenoiser(network, schedule, prediction_type or "epsilon", **latent_kwargs)
    if name == "PixArtTransformer2DModel":
        return PixArtDenoiser(network, schedule, prediction_type or "epsilon", **latent_kwargs)
    raise DiffusersLoadError(f"{name} is not a supported teacher network; supported: UNet2DConditionModel (SD 1.5/2.1, "
                             "SDXL), PixArtTransformer2DModel, SD3Transformer2DModel, SanaTransformer2DModel.")


def check_sequence_length(max_sequence_length: int | None, kind: str, folder: Path) -> None:
    """Refuse a token count the teacher's text encoders do not take: a setting that would silently do nothing."""
    if max_sequence_length is None:
        return
    if kind in ("sd", "sdxl"):
        raise DiffusersLoadError(f"teacher.max_sequence_length={max_sequence_length} sets the T5 or Gemma tokens of "
                                 f"SD3, SANA and PixArt pipelines; the {kind} teacher in {folder} has CLIP encoders "
                                 "only, whose length is their tokenizer's. Remove the setting (null).")
    if max_sequence_length == 0 and kind != "sd3":
        raise DiffusersLoadError(f"teacher.max_sequence_length=0 leaves the {kind} teacher in {folder} no text tokens "
                                 "(0 only suits SD3 without T5, whose CLIP tokens remain); give a positive count or "
                                 "null for the pipeline's default.")


def decode_latents(vae, latents: torch.Tensor, scaling_factor: float, shift_factor: float = 0.0) -> torch.Tensor:
    """Images in [-1, 1] (float32, `[batch, 3, H, W]`) from latents in the teacher's scaled latent space."""
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)  # SDXL's VAE overflows in float16; its pipeline upcasts the same way.
    latents = latents / scaling_factor + shift_factor
    images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return images.to(torch.float32).clamp(-1, 1)


@dataclass
class DiffusersTeacher:
    """A loaded teacher: the pipeline (text encoders, VAE), its denoiser adapter and its prompt encoder."""

    source: str
    folder: Path
    pipeline: object
    denoiser: DiffusersDenoiser
    encoder: PromptEncoder
    null_mode: str  # The resolved null condition: 'empty_prompt' or 'zeros'.

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.denoiser.latent_shape

    @property
    def sigma_min(self) -> float:
        return self.denoiser.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.denoiser.sigma_max

    @property
    def vae_scaling_factor(self) -> float:
        return self.denoiser.vae_scaling_factor

    def null_from_empty(self, empty: Conditioning) -> Conditioning:
        """The null condition of this teacher's recipe from an encoded empty prompt (e.g. a prompt cache's)."""
        return null_condition(self.null_mode, empty)

    def encode_prompts(self, prompts: list[str], cache_path: str | Path, dtype: torch.dtype | None = None
                       ) -> PromptCache:
        """Encoded `prompts`, cached in the safetensors file `cache_path` (reused when prompts and teacher match)."""
        return encode_prompts_cached(self.encoder, prompts, cache_path, dtype=dtype)

    def guided(self, guidance_scale: float, denoiser: DiffusersDenoiser | None = None,
               batch_branches: bool = True) -> GuidedDenoiser:
        """`denoiser` (default: the teacher's) with classifier-free guidance against its null condition."""
        return GuidedDenoiser(self.denoiser if denoiser is None else denoiser, guidance_scale,
                              batch_branches=batch_branches)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from latents."""
        return decode_latents(self.pipeline.vae, latents.to(self.pipeline.vae.device), self.denoiser.vae_scaling_factor,
                              self.denoiser.vae_shift_factor)


def load_diffusers_teacher(
    source: str | Path,                         # Local diffusers folder, or a hub id (downloaded on first use).
    torch_dtype: torch.dtype = torch.float32,   # Weights' dtype (bf16 halves memory; training keeps fp32 masters).
    device: str | torch.device = "cpu",
    null: str = "auto",                         # Null condition: 'auto', 'empty_prompt' or 'zeros' (guidance.py).
    image_size: tuple[int, int] | None = None,  # Pixels (H, W) for SDXL time ids; None: the network's native size.
    max_sequence_length: int | None = None,     # SD3/SANA/PixArt T5 or Gemma tokens; None: the pipeline's default.
    variant: str | None = None,                 # Weight-file variant, e.g. 'fp16'.
    revision: str | None = None,                # Hub revision; a commit hash pins the files. None: main.
) -> DiffusersTeacher:
    """Load a teacher and return it ready to denoise: the adapter's `cond=None` means the recipe's null condition."""
    folder = resolve_pretrained(source, revision, variant)
    pipeline = load_pipeline(folder, torch_dtype=torch_dtype, device=device, variant=variant)
    denoiser = build_denoiser(pipeline)
    encoder = PromptEncoder(pipeline, image_size=image_size, max_sequence_length=max_sequence_length)
    check_sequence_length(max_sequence_length, encoder.kind, folder)
    null_mode = encoder.default_null_mode if null == "auto" else null
    denoiser.set_null_condition(null_condition(null_mode, encoder.encode([""])).to(device))
    return DiffusersTeacher(source=str(source), folder=folder, pipeline=pipeline, denoiser=denoiser, encoder=encoder,
                            null_mode=null_mode)
