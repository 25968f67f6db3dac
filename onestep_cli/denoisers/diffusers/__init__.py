"""Text-to-image teachers from diffusers (SD 1.5/2.1, SDXL, PixArt; SD3/SANA flow matching) as sigma-unit denoisers.

Entry point: `load_diffusers_teacher(path_or_hub_id)`; docs/text_to_image.md describes the mapping and the API.
Importing this package does not import diffusers; loading a teacher does.
"""

from .adapter import DDPMDenoiser, DiffusersDenoiser
from .conditioning import Conditioning
from .flow import FlowDenoiser
from .guidance import NULL_MODES, GuidedDenoiser, guide, null_condition
from .loading import (DiffusersLoadError, DiffusersTeacher, build_denoiser, decode_latents, load_diffusers_teacher,
                      load_pipeline, resolve_pretrained)
from .pixart import PixArtDenoiser
from .prompts import (PromptCache, PromptEncoder, PromptFile, PromptFileError, encode_prompts_cached,
                      load_prompt_cache, read_prompts, save_prompt_cache)
from .schedule import DDPMSigmaSchedule, FlowSigmaSchedule
from .unet import UNetDenoiser

__all__ = [
    "Conditioning", "DDPMDenoiser", "DDPMSigmaSchedule", "DiffusersDenoiser", "DiffusersLoadError", "DiffusersTeacher",
    "FlowDenoiser", "FlowSigmaSchedule", "GuidedDenoiser", "NULL_MODES", "PixArtDenoiser", "PromptCache",
    "PromptEncoder", "PromptFile", "PromptFileError", "UNetDenoiser", "build_denoiser", "decode_latents",
    "encode_prompts_cached", "guide", "load_diffusers_teacher", "load_pipeline", "load_prompt_cache", "null_condition",
    "read_prompts", "resolve_pretrained", "save_prompt_cache",
]
