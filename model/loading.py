"""Loading released READ / SESAME / LISA / LLaVA-1.5 directories and writing the released layout.

Released directories (spec §1.3-1.4, §6) hold ``config.json`` with ``model_type: "llava"`` and sharded weights
(``pytorch_model-0000x-of-0000y.bin`` + ``pytorch_model.bin.index.json`` from transformers 4.31, or the
safetensors equivalents), without the CLIP tower, which is loaded from its own directory (``mm_vision_tower`` or
the ``vision_tower=`` override). Rules:

- keys are strict: every missing, unexpected or differently shaped key stops with one message naming the
  directory; only the legacy ``rotary_emb.inv_freq`` buffers (persistent in 4.31, recomputed today) are dropped;
- a plain LLaVA-1.5 directory (no ``model.visual_model.*`` / ``model.text_hidden_fcs.*`` keys) needs
  ``sam_checkpoint`` (``sam_vit_h_4b8939.pth``); ``text_hidden_fcs`` then gets PyTorch's default Linear init, as
  the original's ``initialize_read_modules`` did;
- the model is built on the meta device and the checkpoint tensors are assigned in place, so a 7B/13B model never
  exists twice in memory; the non-persistent buffers (rotary frequencies, SAM pixel mean/std) are rebuilt;
- attention: ``attn_implementation`` if given, else flash-attention 2 when ``flash_attn`` imports and the target
  is a CUDA device in fp16/bf16, else PyTorch SDPA;
- token ids missing from the config are read from the directory's tokenizer (all released directories ship one).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.utils import logging as hf_logging

from utils.io import atomic_path, atomic_write_json

from .config import READConfig
from .llava import Float32RotaryEmbedding
from .constants import NUM_IMAGE_TOKENS, SAM_PIXEL_MEAN, SAM_PIXEL_STD
from .state_dict_check import key_mismatch, listing

if TYPE_CHECKING:
    from .read import READForCausalLM
    from .sasp import SasPConfig

CONFIG_NAME = "config.json"
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")
logger = logging.getLogger(__name__)

LEGACY_KEY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
SAM_PREFIX = "model.visual_model."
FCS_PREFIX = "model.text_hidden_fcs."
CLIP_MARK = "vision_tower"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """torch dtype from a dtype or a name ("bf16", "bfloat16", "fp16", "float32", ...)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(str(dtype), str(dtype)).replace("torch.", "")
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of bf16, fp16, fp32")
    return DTYPES[name]


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def choose_attn_implementation(
    requested: str | None, device: torch.device | str, dtype: torch.dtype
) -> str:
    """``requested``, else flash_attention_2 (flash_attn installed, CUDA, fp16/bf16), else sdpa."""
    if requested is not None:
        if requested == "flash_attention_2" and not flash_attn_available():
            raise ValueError("attn_implementation='flash_attention_2' needs the flash-attn package (pip install flash-attn)")
        return requested
    device = torch.device(device)
    if flash_attn_available() and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return "flash_attention_2"
    return "sdpa"


# ---------------------------------------------------------------------------------------------- reading files
def read_config_file(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a released READ/SESAME/LISA/LLaVA-1.5 directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files (index first, then single files); names the missing one."""
    for name in INDEX_NAMES:
        index_path = directory / name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ValueError(f"{index_path} is not a weight index (needs a 'weight_map'): {exc}") from exc
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (directory / f).is_file()]
            if missing:
                raise FileNotFoundError(f"{index_path} lists shard files that are missing in {directory}: {listing(missing)}")
            return [directory / f for f in files]
    for name in SINGLE_NAMES:
        if (directory / name).is_file():
            return [directory / name]
    raise FileNotFoundError(
        f"no weights in {directory}: expected one of {', '.join(INDEX_NAMES + SINGLE_NAMES)}"
    )


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors or torch (.bin, weights_only) state dict."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        try:  # memory-mapped: a 7B/13B shard is not read twice into RAM (needs the zip format torch >= 1.6 writes)
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any read failure becomes one message naming the file
        raise ValueError(f"could not read weight file {path}: {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weight file {path} is not a flat mapping of names to tensors")
    return dict(state)


def read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """All weights of a directory, without the legacy ``rotary_emb.inv_freq`` buffers."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        for key, tensor in read_weight_file(path).items():
            if not LEGACY_KEY.search(key):
                state[key] = tensor
    return state


def check_keys(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, torch.Tensor], where: str) -> None:
    """Strict key/shape comparison; one ValueError listing missing, unexpected and mis-shaped keys."""
    problem = key_mismatch(expected, found)
    if problem:
        raise ValueError(f"checkpoint {where} does not match the READ model built from its config.json; {problem}")


# ---------------------------------------------------------------------------------------------- CLIP
def _cached_hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of a hub id already in the Hugging Face cache (nothing is downloaded), else None."""
    if Path(repo_id).exists() or repo_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or not a valid id): the caller reports the path
        return None


def clip_directory(path: str | Path | None, source: str) -> Path:
    """A local CLIP directory; a hub id such as ``openai/clip-vit-large-patch14-336`` is accepted when cached."""
    if not path:
        raise ValueError(f"{source} names no CLIP vision tower: pass vision_tower=<local clip-vit-large-patch14-336 dir>")
    directory = Path(path)
    if not (directory / CONFIG_NAME).is_file():
        directory = _cached_hub_snapshot(str(path)) or directory
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"CLIP vision tower directory {str(directory)!r} (from {source}) not found or has no config.json: pass "
            f"vision_tower=<local copy of openai/clip-vit-large-patch14-336>"
        )
    return directory


def read_clip_config(directory: Path) -> CLIPVisionConfig:
    """The vision config of a CLIP directory (a full CLIPModel or a CLIPVisionModel)."""
    raw = json.loads((directory / CONFIG_NAME).read_text())
    vision = raw.get("vision_config", raw) if raw.get("model_type") == "clip" else raw
    vision = {k: v for k, v in vision.items() if k not in ("model_type", "transformers_version", "architectures")}
    return CLIPVisionConfig(**vision)


def load_clip(directory: Path, dtype: torch.dtype, attn_implementation: str) -> CLIPVisionModel:
    """`CLIPVisionModel.from_pretrained` on a local directory; a missing vision weight stops with its name."""
    verbosity = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the text half of a full CLIP directory is reported as unexpected
    hf_logging.disable_progress_bar()
    try:
        clip, info = CLIPVisionModel.from_pretrained(
            str(directory), dtype=dtype, attn_implementation=attn_implementation, output_loading_info=True
        )
    except OSError as exc:
        raise FileNotFoundError(f"could not load the CLIP vision tower from {directory}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys", []))
    mismatched = sorted(str(m) for m in info.get("mismatched_keys", []))
    if missing or mismatched:
        raise ValueError(
            f"CLIP directory {directory} does not hold a complete vision tower: missing {listing(missing)}; "
            f"mismatched {listing(mismatched)}"
        )
    clip.requires_grad_(False)
    return clip.eval()


# ---------------------------------------------------------------------------------------------- load
def _token_ids_from_tokenizer(directory: Path) -> dict[str, int]:
    from .tokenizer import READTokenizer

    if not (directory / "tokenizer.model").is_file():
        return {}
    tok = READTokenizer.from_pretrained(directory, model_max_length=None)
    ids = {}
    for field, token in (("seg_token_idx", "[SEG]"), ("im_start_token_idx", "<im_start>"), ("im_end_token_idx", "<im_end>")):
        if token in tok.added_tokens:
            ids[field] = tok.added_tokens[token]
    return ids


def _materialise_buffers(model: "READForCausalLM") -> None:
    """Rebuild the non-persistent buffers a meta-device construction left empty, then refuse any meta tensor."""
    model.model.rotary_emb = Float32RotaryEmbedding(config=model.config)
    sam = model.model.visual_model
    if sam.pixel_mean.is_meta:
        sam.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(-1, 1, 1), False)
        sam.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(-1, 1, 1), False)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"READ loading left tensors without values (a loader bug): {listing(left)}")


def load_read(
    directory: str | Path,
    vision_tower: str | Path | None = None,
    dtype: torch.dtype | str | None = None,
    sam_checkpoint: str | Path | None = None,
    attn_implementation: str | None = None,
    device: torch.device | str = "cpu",
    seg_token_idx: int | None = None,
    im_start_token_idx: int | None = None,
    im_end_token_idx: int | None = None,
    sasp_config: "SasPConfig | None" = None,
    sam_variant: str | None = None,
) -> "READForCausalLM":
    """Load a released directory into a `READForCausalLM` (eval mode); see the module docstring for the rules.

    ``dtype`` defaults to the dtype recorded in config.json (float32 if none). ``sam_variant`` overrides the
    config's SAM size (``vit_h`` unless config.json says otherwise; ``sam_vit_h_4b8939.pth`` is vit_h).
    """
    from .read import READForCausalLM, build_text_hidden_fcs
    from .sam import build_sam

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} not found")
    raw = read_config_file(directory)
    config = READConfig.from_released_dict(raw, source=str(directory / CONFIG_NAME))
    dtype = parse_dtype(dtype) or parse_dtype(raw.get("torch_dtype") or raw.get("dtype") or "float32")

    clip_dir = clip_directory(vision_tower or config.mm_vision_tower, "vision_tower=" if vision_tower else str(directory / CONFIG_NAME))
    clip_config = read_clip_config(clip_dir)
    patches = (clip_config.image_size // clip_config.patch_size) ** 2
    if patches != NUM_IMAGE_TOKENS or clip_config.hidden_size != config.mm_hidden_size:
        raise ValueError(
            f"CLIP tower {clip_dir} gives {patches} patches of width {clip_config.hidden_size}, but {directory} was "
            f"trained with {NUM_IMAGE_TOKENS} patches of width {config.mm_hidden_size}: use clip-vit-large-patch14-336 "
            f"(the 224-pixel clip-vit-large-patch14 gives 256 patches)"
        )
    config.vision_config = clip_config.to_dict()
    config.mm_vision_tower = config.vision_tower = str(clip_dir)
    if sam_variant is not None:
        config.sam_variant = sam_variant
    ids = _token_ids_from_tokenizer(directory) if config.seg_token_idx is None else {}
    for field, value in (
        ("seg_token_idx", seg_token_idx),
        ("im_start_token_idx", im_start_token_idx),
        ("im_end_token_idx", im_end_token_idx),
    ):
        if value is not None:
            setattr(config, field, int(value))
        elif getattr(config, field) is None and field in ids:
            setattr(config, field, ids[field])
    if sasp_config is not None:
        config.set_sasp(sasp_config)
    attn = choose_attn_implementation(attn_implementation, device, dtype)
    config._attn_implementation = attn

    state = read_checkpoint(directory)
    clip_keys = [k for k in state if CLIP_MARK in k]
    if clip_keys:
        # some LLaVA-derived checkpoints carry the frozen CLIP; 4.31 ignored these keys, CLIP comes from its directory
        logger.warning(f"{directory}: ignoring {len(clip_keys)} CLIP keys in the checkpoint (CLIP is loaded from {clip_dir})")
        for k in clip_keys:
            del state[k]
    plain_llava = not any(k.startswith((SAM_PREFIX, FCS_PREFIX)) for k in state)
    if plain_llava and sam_checkpoint is None:
        raise ValueError(
            f"{directory} is a plain LLaVA checkpoint (no model.visual_model.* / model.text_hidden_fcs.* keys): "
            f"pass sam_checkpoint=<sam_vit_h_4b8939.pth> to start READ from it"
        )

    with torch.device("meta"):
        model = READForCausalLM(config)
    expected = {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if CLIP_MARK not in k and not (plain_llava and k.startswith((SAM_PREFIX, FCS_PREFIX)))
    }
    check_keys(expected, state, str(directory))
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    del state

    model.model.vision_tower.set_clip(load_clip(clip_dir, dtype, attn))
    if plain_llava:
        model.model.visual_model = build_sam(config.sam_variant, checkpoint=sam_checkpoint, dtype=dtype)
        model.model.text_hidden_fcs = build_text_hidden_fcs(config.hidden_size, config.out_dim).to(dtype)
    _materialise_buffers(model)
    model.config.dtype = dtype
    sam_source = f"SAM from {sam_checkpoint}" if plain_llava else "SAM and [SEG] projection from the checkpoint"
    logger.info(
        f"loaded READ weights from {directory} ({'plain LLaVA-1.5' if plain_llava else 'READ/SESAME/LISA'}), "
        f"CLIP from {clip_dir}, {sam_source}; dtype {dtype}, attention {attn}, SasP {config.sasp_config()}"
    )
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------- save
def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "10KB"."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"max_shard_size {size!r} is not a size such as '5GB' or '500MB'")
    unit = (match.group(2) or "B").upper()
    factor = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match.group(1)) * factor)


def save_read(model: "READForCausalLM", directory: str | Path, max_shard_size: int | str = "5GB") -> list[Path]:
    """Write the released layout: config.json (model_type "llava", architectures ["READForCausalLM"]) and
    ``model.safetensors`` or ``model-0000x-of-0000y.safetensors`` + ``model.safetensors.index.json``; no CLIP keys.

    Every file is written atomically. Returns the weight files.
    """
    from safetensors.torch import save_file

    from .read import READForCausalLM

    if not isinstance(model, READForCausalLM):
        raise TypeError(
            f"save_read expects a READForCausalLM, got {type(model).__name__} (merge LoRA first: merge_and_unload())"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if CLIP_MARK not in k}
    if any("lora_" in k for k in state):
        raise ValueError("save_read: the model still holds LoRA weights; merge them first (model.merge_and_unload())")
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    written = []
    for name, shard in zip(names, shards):
        with atomic_path(directory / name) as tmp:
            save_file(shard, str(tmp), metadata={"format": "pt"})
        written.append(directory / name)
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        atomic_write_json(directory / INDEX_NAMES[0], {"metadata": {"total_size": total}, "weight_map": weight_map})
    cfg = model.config.to_released_dict()
    dtype = next(iter(state.values())).dtype
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    cfg["dtype"] = cfg["torch_dtype"]
    atomic_write_json(directory / CONFIG_NAME, cfg)
    return written


__all__ = [
    "load_read",
    "save_read",
    "read_checkpoint",
    "weight_files",
    "check_keys",
    "choose_attn_implementation",
    "load_clip",
    "read_clip_config",
    "parse_dtype",
    "parse_size",
]
