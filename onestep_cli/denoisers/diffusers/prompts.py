"""Training prompts: read them from a file, encode them with the teacher pipeline's own text encoders, cache them.

Prompt files: `.txt` (one prompt per line, blank lines skipped), `.jsonl` (one object per line with a `prompt` or
`caption` key), `.json` (COCO captions: `{"annotations": [{"caption": ...}, ...]}`, or a plain list of strings).
`read_prompts` reads a whole file; `PromptFile` reads the prompts it is asked for, for files too large to hold.
Encoding calls the pipeline's `encode_prompt`, so embeddings are exactly what its sampler would use; the cache is a
safetensors file holding the prompts' conditions and the empty prompt's, so the text encoders need not stay loaded.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ...errors import OnestepError
from .conditioning import Conditioning

PROMPT_KEYS = ("prompt", "caption")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # A pipeline's text encoders, where present.
CACHE_FORMAT = "onestep-prompt-cache-1"


class PromptFileError(OnestepError, ValueError):
    """A prompt file that cannot be read; the message names the file, the place and what to do."""


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a `.txt`, `.jsonl` or `.json` (COCO captions) file, in file order, stripped of outer spaces."""
    path = Path(path)
    suffix = _prompt_suffix(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise PromptFileError(f"prompt file {path} is not UTF-8 text ({error.reason} at byte {error.start}); save it "
                              "as UTF-8.") from error
    except OSError as error:
        raise PromptFileError(f"prompt file {path} cannot be read ({error.strerror or error}); check that it is a "
                              "readable file.") from error
    if suffix == ".jsonl":
        prompts = [_prompt_of_record(_json_line(line, path, number), path, f"line {number}")
                   for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    elif suffix == ".json":
        prompts = _prompts_of_json(text, path)
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise _no_prompts(path)
    return prompts


class PromptFile:
    """The prompts of a prompt file, read on demand, for sets too large to hold (millions of prompts).

    `.txt` and `.jsonl` files are indexed once, keeping the byte offset of each prompt's line (8 bytes a prompt, not
    the strings; a malformed line is reported here, before training); `read(indices)` seeks to the lines it needs. A
    COCO `.json` can only be parsed whole, so its strings are held. The prompts and their order are `read_prompts`'
    (for files whose lines end in \\n or \\r\\n).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.suffix = _prompt_suffix(self.path)
        self._texts = read_prompts(self.path) if self.suffix == ".json" else None
        self._offsets = array("q")
        if self._texts is None:
            self._index()
        if not len(self):
            raise _no_prompts(self.path)

    def __len__(self) -> int:
        return len(self._texts) if self._texts is not None else len(self._offsets)

    def _index(self) -> None:
        offset = 0
        try:
            with self.path.open("rb") as file:
                for number, raw in enumerate(file, start=1):
                    if self._prompt_of_line(raw, number) is not None:
                        self._offsets.append(offset)
                    offset += len(raw)
        except OSError as error:
            raise PromptFileError(f"prompt file {self.path} cannot be read ({error.strerror or error}); check that "
                                  "it is a readable file.") from error

    def _prompt_of_line(self, raw: bytes, number: int) -> str | None:
        """The prompt of one line of the file (None for a blank line)."""
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise PromptFileError(f"prompt file {self.path} line {number} is not UTF-8 text ({error.reason}); save "
                                  "it as UTF-8.") from error
        if not line.strip():
            return None
        if self.suffix == ".jsonl":
            return _prompt_of_record(_json_line(line, self.path, number), self.path, f"line {number}")
        return line.strip()

    def read(self, indices: Sequence[int]) -> list[str]:
        """The prompts at `indices` (0-based, among the file's prompts), in that order."""
        if self._texts is not None:
            return [self._texts[index] for index in indices]
        prompts = []
        try:
            with self.path.open("rb") as file:
                for index in indices:
                    file.seek(self._offsets[index])
                    prompts.append(self._prompt_of_line(file.readline(), index + 1))
        except (OSError, PromptFileError) as error:
            raise PromptFileError(f"prompt file {self.path} cannot be read as it was indexed ({error}); it must stay "
                                  "in place, unchanged, while a run streams from it.") from error
        if None in prompts:
            raise PromptFileError(f"prompt file {self.path} changed after it was indexed; it must stay unchanged while "
                                  "a run streams from it.")
        return prompts


def _prompt_suffix(path: Path) -> str:
    """The suffix of a prompt file that exists, lower-cased ('.txt' for plain text); an error for anything else."""
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise PromptFileError(f"prompt file {path} {what}; give prompts.path as a .txt (one prompt per line), .jsonl "
                              "(a 'prompt' or 'caption' key per line) or COCO captions .json file.")
    suffix = path.suffix.lower()
    if suffix in (".txt", ".prompts", ""):
        return ".txt"
    if suffix not in (".jsonl", ".json"):
        raise PromptFileError(f"prompt file {path} has the suffix {suffix!r}; use .txt (one prompt per line), .jsonl "
                              "or .json (COCO captions).")
    return suffix


def _no_prompts(path: Path) -> PromptFileError:
    return PromptFileError(f"prompt file {path} holds no prompts (it is empty or blank); add at least one.")


def _json_line(line: str, path: Path, number: int):
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise PromptFileError(f"{path} line {number} is not valid JSON ({error.msg}); each line of a .jsonl prompt "
                              "file must be one object such as {\"prompt\": \"a red bicycle\"}.") from error


def _prompt_of_record(record, path: Path, where: str) -> str:
    if isinstance(record, dict):
        for key in PROMPT_KEYS:
            if isinstance(record.get(key), str):
                return record[key].strip()
    raise PromptFileError(f"{path} {where} has no string 'prompt' or 'caption' key (got {str(record)[:80]}); give "
                          "each record one of those keys.")


def _prompts_of_json(text: str, path: Path) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise PromptFileError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}); a .json prompt file "
                              "must be COCO captions ({\"annotations\": [{\"caption\": ...}]}) or a list of "
                              "strings.") from error
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        return [_prompt_of_record(record, path, f"annotations[{i}]") for i, record in enumerate(data["annotations"])]
    if isinstance(data, list):
        return [item.strip() if isinstance(item, str) else _prompt_of_record(item, path, f"item {i}")
                for i, item in enumerate(data)]
    raise PromptFileError(f"{path} is JSON but not COCO captions: expected {{\"annotations\": [{{\"caption\": ...}}]}} "
                          "or a list of strings.")


class PromptEncoder:
    """Encodes prompts into a `Conditioning` with a diffusers pipeline's tokenizers and text encoders.

    `kind` is one of `sd` (SD 1.5/2.1), `sdxl`, `pixart`, `sd3`, `sana`, detected from the pipeline. For SDXL the
    time ids are `(H, W, 0, 0, H, W)` of `image_size` (pixels; default: the UNet's native size). SD3, SANA and PixArt
    pad their T5 or Gemma tokens to `max_sequence_length` (None: the pipeline's default; SD3 without T5 appends that
    many zero tokens), which a sampling call of the pipeline must then pass too.
    """

    def __init__(self, pipeline, image_size: tuple[int, int] | None = None, batch_size: int = 64,
                 max_sequence_length: int | None = None):
        self.pipeline = pipeline
        self.kind = pipeline_kind(pipeline)
        self.batch_size = batch_size
        self.max_sequence_length = max_sequence_length
        self.device = None  # Where the text encoders run; None: where their weights are.
        if image_size is None:
            size = pipeline_network(pipeline).config.sample_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            image_size = tuple(side * pipeline.vae_scale_factor for side in size)
        self.image_size = tuple(int(side) for side in image_size)

    @property
    def default_null_mode(self) -> str:
        """`zeros` where the pipeline zeroes an absent negative prompt (SDXL), else `empty_prompt`."""
        return "zeros" if getattr(self.pipeline.config, "force_zeros_for_empty_prompt", False) else "empty_prompt"

    @property
    def fingerprint(self) -> str:
        """What the embeddings depend on besides the prompts, for the cache key."""
        name_or_path = getattr(self.pipeline.config, "_name_or_path", "")
        tokens = "" if self.max_sequence_length is None else f"|{self.max_sequence_length}"
        return f"{self.kind}|{name_or_path}|{self.image_size[0]}x{self.image_size[1]}{tokens}"

    def to(self, device: torch.device | str) -> PromptEncoder:
        """Move the pipeline's text encoders to `device` and encode there (streamed training prompts: per step)."""
        for name in TEXT_ENCODERS:
            module = getattr(self.pipeline, name, None)
            if module is not None:
                module.to(device)
        self.device = torch.device(device)
        return self

    def text_encoder_device(self) -> torch.device:
        """Where the pipeline's text encoders hold their weights: not its execution device, which follows the VAE or
        the denoiser to the GPU while the text encoders may stay on the CPU (sampling a run)."""
        for name in TEXT_ENCODERS:
            module = getattr(self.pipeline, name, None)
            if module is not None:
                return next(module.parameters()).device
        return self.pipeline._execution_device

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device | str = "cpu") -> Conditioning:
        """Conditions of `prompts` (a list of strings), on `device`, in the text encoders' dtype."""
        if isinstance(prompts, str):
            prompts = [prompts]
        parts = [self._encode_batch(list(prompts[i:i + self.batch_size])).to(device)
                 for i in range(0, len(prompts), self.batch_size)]
        return Conditioning.cat(parts)

    def _encode_sana(self, prompts: list[str], device, tokens: dict) -> Conditioning:
        def encode(texts, instruction):
            embeds, mask, _, _ = self.pipeline.encode_prompt(texts, do_classifier_free_guidance=False, device=device,
                                                             complex_human_instruction=instruction, **tokens)
            return Conditioning(embeds=embeds, mask=mask)

        return _sana_rows(encode, prompts, call_default(self.pipeline, "complex_human_instruction"))

    def _encode_batch(self, prompts: list[str]) -> Conditioning:
        pipe = self.pipeline
        device = self.device if self.device is not None else self.text_encoder_device()
        tokens = {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}
        if self.kind == "sd":
            embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
            cond = Conditioning(embeds=embeds)
        elif self.kind == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            height, width = self.image_size
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeds.dtype,
                                    device=embeds.device).repeat(len(prompts), 1)
            cond = Conditioning(embeds=embeds, pooled=pooled, time_ids=time_ids)
        elif self.kind == "sana" and any(prompts):
            cond = self._encode_sana(prompts, device, tokens)
        elif self.kind in ("pixart", "sana"):
            embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                    **tokens)
            cond = Conditioning(embeds=embeds, mask=mask)
        else:  # sd3
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                      do_classifier_free_guidance=False, **tokens)
            cond = Conditioning(embeds=embeds, pooled=pooled)
        return cond


def _sana_rows(encode, prompts: list[str], instruction) -> Conditioning:
    """SANA's conditions as its pipeline makes them: the complex human instruction before every prompt but the empty
    one (its negative prompt, encoded without it). `encode(texts, instruction)` encodes a list."""
    given = [i for i, prompt in enumerate(prompts) if prompt]
    empty = [i for i, prompt in enumerate(prompts) if not prompt]
    parts = [encode([prompts[i] for i in given], instruction)]
    if empty:
        parts.append(encode([""] * len(empty), False))
    return Conditioning.cat(parts)[torch.argsort(torch.tensor(given + empty))]


def call_default(pipeline, name: str):
    """The default of argument `name` of the pipeline's `__call__` (what a plain sampling call uses)."""
    import inspect

    return inspect.signature(type(pipeline).__call__).parameters[name].default


def pipeline_kind(pipeline) -> str:
    """`sd`, `sdxl`, `pixart`, `sd3` or `sana` for a loaded diffusers pipeline."""
    network = pipeline_network(pipeline)
    name = type(network).__name__
    if name == "UNet2DConditionModel":
        return "sdxl" if getattr(network.config, "addition_embed_type", None) == "text_time" else "sd"
    kinds = {"PixArtTransformer2DModel": "pixart", "SD3Transformer2DModel": "sd3", "SanaTransformer2DModel": "sana"}
    if name not in kinds:
        raise ValueError(f"{type(pipeline).__name__} with a {name} network is not a supported teacher; supported: "
                         "Stable Diffusion 1.5/2.1, SDXL, PixArt-α/Σ (and SD3/SANA through the flow adapter).")
    return kinds[name]


def pipeline_network(pipeline) -> torch.nn.Module:
    """The denoising network of a pipeline: its `unet`, else its `transformer`."""
    network = getattr(pipeline, "unet", None)
    network = getattr(pipeline, "transformer", None) if network is None else network
    if network is None:
        raise ValueError(f"{type(pipeline).__name__} has neither a unet nor a transformer; it is not a diffusion "
                         "teacher onestep can distil.")
    return network


@dataclass
class PromptCache:
    """Encoded training prompts and the encoded empty prompt (from which either null condition follows)."""

    prompts: list[str]
    conditions: Conditioning
    empty: Conditioning
    key: str


def cache_key(prompts: list[str], encoder: PromptEncoder) -> str:
    digest = hashlib.sha256(json.dumps([encoder.fingerprint, prompts]).encode("utf-8")).hexdigest()
    return digest[:32]


def save_prompt_cache(cache: PromptCache, path: str | Path) -> None:
    """Write `cache` to a safetensors file atomically (a temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {**cache.conditions.state_dict("cond."), **cache.empty.state_dict("empty.")}
    metadata = {"format": CACHE_FORMAT, "key": cache.key, "prompts": json.dumps(cache.prompts)}
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    partial.replace(path)


def load_prompt_cache(path: str | Path) -> PromptCache:
    """Read a cache written by `save_prompt_cache`."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except (OSError, ValueError, RuntimeError) as error:
        raise PromptFileError(f"prompt cache {path} cannot be read ({error}); delete it to have it rebuilt.") from error
    if metadata.get("format") != CACHE_FORMAT:
        raise PromptFileError(f"{path} is not a onestep prompt cache (format {metadata.get('format')!r}); delete it "
                              "to have it rebuilt.")
    return PromptCache(prompts=json.loads(metadata["prompts"]),
                       conditions=Conditioning.from_state_dict(tensors, "cond."),
                       empty=Conditioning.from_state_dict(tensors, "empty."), key=metadata["key"])


def encode_prompts_cached(encoder: PromptEncoder, prompts: list[str], path: str | Path,
                          dtype: torch.dtype | None = None) -> PromptCache:
    """The prompts' conditions, read from `path` when it was written for the same prompts and teacher, else encoded
    and written there. `dtype` (e.g. torch.float16) shrinks the file; None keeps the text encoders' dtype."""
    path = Path(path)
    key = cache_key(list(prompts), encoder)
    if path.is_file():
        cached = load_prompt_cache(path)
        if cached.key == key:
            return cached
    conditions, empty = encoder.encode(list(prompts)), encoder.encode([""])
    if dtype is not None:
        conditions, empty = conditions.to(dtype=dtype), empty.to(dtype=dtype)
    cache = PromptCache(prompts=list(prompts), conditions=conditions, empty=empty, key=key)
    save_prompt_cache(cache, path)
    return cache
