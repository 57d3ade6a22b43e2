"""The open_clip CLIP backbone: configuration, construction without wasted initialisation, and weights.

TS2-Net uses CLIP's text tower unchanged and its ViT as a token encoder (spec §2, §3, §12).
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import CheckpointError, Ts2Error, WeightsNotFoundError, one_line

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")


def looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith(".") or value.lower().endswith(WEIGHT_SUFFIXES)


def base_model_config(name: str) -> dict[str, Any]:
    """open_clip's JSON config for a built-in model name, checked to be a plain CLIP ViT."""
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        vits = [m for m in open_clip.list_models() if m.startswith("ViT-")]
        plain = [m for m in vits if _plain_vit(open_clip.get_model_config(m))]
        examples = difflib.get_close_matches(name, plain, n=3) or [m for m in WELL_KNOWN_VITS if m in plain]
        raise Ts2Error(
            f"Unknown --model '{name}'; use an open_clip CLIP ViT name such as {', '.join(examples)}, "
            "or an open_clip JSON config file."
        )
    if not _plain_vit(cfg):
        raise Ts2Error(f"--model '{name}' is not a plain CLIP ViT; TS2-Net needs one (e.g. ViT-B-32, ViT-B-16).")
    return copy.deepcopy(cfg)


WELL_KNOWN_VITS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")


def _plain_vit(cfg: dict[str, Any] | None) -> bool:
    """A CLIP ViT whose towers open_clip builds itself (TS2-Net reaches into its visual transformer's blocks)."""
    if not cfg:
        return False
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    resnet = isinstance(vision.get("layers"), list | tuple)  # blocks per stage: CLIP's modified ResNets (RN50...)
    return not (resnet or "timm_model_name" in vision or "hf_model_name" in text or cfg.get("custom_text"))


def read_model_config(path: Path) -> dict[str, Any]:
    """An open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) from a JSON file."""
    import json

    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise Ts2Error(f"Cannot read the model config {path}: {one_line(exc)}") from None
    if not isinstance(cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= cfg.keys():
        raise Ts2Error(f"{path} is not an open_clip model config (needs embed_dim, vision_cfg and text_cfg).")
    return cfg


def pretrained_quick_gelu(name: str, tag: str) -> bool | None:
    """QuickGELU flag recorded by open_clip for a pretrained tag (OpenAI weights need it), None if unknown."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    return bool(cfg.get("quick_gelu", False)) if cfg else None


def model_config(name: str, explicit: Mapping[str, Any] | None, quick_gelu: bool) -> dict[str, Any]:
    cfg = copy.deepcopy(dict(explicit)) if explicit is not None else base_model_config(name)
    cfg["quick_gelu"] = quick_gelu or bool(cfg.get("quick_gelu", False))
    return cfg


def build_clip(cfg: Mapping[str, Any], *, initialise: bool) -> nn.Module:
    """An open_clip ``CLIP`` for ``cfg``. Without ``initialise`` it lives on the meta device, so building it costs
    nothing: its parameters are then assigned from a state dict (``load_state``)."""
    from open_clip.model import CLIP

    if initialise:
        return CLIP(**cfg)
    with torch.device("meta"):
        return CLIP(**cfg)


def causal_mask(size: int) -> torch.Tensor:
    return torch.full((size, size), float("-inf")).triu_(1)


def load_state(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str, strict: bool = True) -> None:
    """Assign ``state`` to ``module`` (fp32), reporting missing, unexpected and mis-shaped keys in one line."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    expected = module.state_dict()
    wrong_shape = [
        f"{k} {tuple(v.shape)}≠{tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = [
        _key_list("wrong shapes", wrong_shape),
        _key_list("missing", missing) if strict else "",
        _key_list("unexpected", unexpected),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(f"Weights in {source} do not fit the model: {'; '.join(problems)}.")
    module.load_state_dict(state, strict=False, assign=True)
    _rebuild_meta_buffers(module)


def _key_list(label: str, keys: list[str], shown: int = 6) -> str:
    if not keys:
        return ""
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{label}: {', '.join(keys[:shown])}{more}"


def _rebuild_meta_buffers(module: nn.Module) -> None:
    # Non-persistent buffers are not in state dicts; the only one a CLIP has is the text causal mask.
    for name, buffer in list(module.named_buffers()):
        if not buffer.is_meta:
            continue
        owner_name, _, attr = name.rpartition(".")
        if attr != "attn_mask":
            raise RuntimeError(f"buffer {name} was not initialised")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner.register_buffer(attr, causal_mask(buffer.shape[-1]), persistent=False)


def resolve_pretrained(name: str, pretrained: str) -> Path:
    """Local weights file for an open_clip tag (downloaded once, then cached) or a path given by the user."""
    if Path(pretrained).expanduser().is_file():
        return Path(pretrained).expanduser()
    if looks_like_path(pretrained):
        raise WeightsNotFoundError(f"Weights file not found: {pretrained} (check the --pretrained path).")
    import open_clip
    from open_clip.pretrained import download_pretrained

    if pretrained.lower() == "none":
        raise Ts2Error(
            "--pretrained none (random weights) is for ts2 train and ts2 eval; the other commands need trained "
            "weights: an open_clip tag or a local weights file."
        )
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        known = f"known: {', '.join(tags)}" if tags else "open_clip has no weights for it"
        raise Ts2Error(f"Unknown --pretrained tag '{pretrained}' for {name} ({known}); or pass a local weights file.")
    cached = _cached_download(cfg)
    if cached is not None:
        return cached
    host = "huggingface.co" if cfg.get("hf_hub") else urlparse(cfg.get("url", "")).hostname or "huggingface.co"
    if not _reachable(host):
        raise WeightsNotFoundError(
            f"The '{pretrained}' CLIP weights for {name} are not downloaded yet and {host} cannot be reached; "
            "pass a local weights file with --pretrained PATH."
        )
    try:
        return Path(download_pretrained(cfg))
    except Exception as exc:
        raise WeightsNotFoundError(
            f"Could not download the '{pretrained}' CLIP weights for {name} ({one_line(exc)}); "
            "pass a local weights file with --pretrained PATH."
        ) from None


def _cached_download(cfg: Mapping[str, Any]) -> Path | None:
    """The weights file if a previous run already downloaded it (no network, no retries)."""
    hub = cfg.get("hf_hub", "")
    if not hub:
        return None
    from huggingface_hub import try_to_load_from_cache

    repo, filename = os.path.split(hub)  # "org/model/" names the repo's default weights file
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for candidate in names:
        found = try_to_load_from_cache(repo, candidate)
        if isinstance(found, str):
            return Path(found)
    return None


def _reachable(host: str, timeout: float = 3.0) -> bool:
    # Checked first because the hub client retries for about a minute before giving up on a dead network.
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def read_state_dict(path: Path, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, a torch state dict (optionally under ``state_dict``) or an OpenAI JIT
    archive; ``keep`` filters keys before tensors are read where the format allows it."""
    keep = keep or (lambda _key: True)
    kind = weights_format(path)
    if kind is None:
        raise CheckpointError(f"{path} is not a weights file (neither safetensors nor a PyTorch file).")
    try:
        if kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return {k: handle.get_tensor(k) for k in handle.keys() if keep(k)}  # noqa: SIM118
        state = _torch_load(path)
    except (CheckpointError, WeightsNotFoundError):
        raise
    except Exception as exc:
        raise CheckpointError(f"Cannot read weights from {path}: {one_line(exc)}") from None
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors.")
    if state and next(iter(state)).startswith("module."):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if keep(k) and k not in OPENAI_METADATA_KEYS}


def weights_format(path: Path) -> str | None:
    """ "safetensors" or "torch" from the file's first bytes (a file's name may say neither), None for
    anything else."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError as exc:
        raise CheckpointError(f"Cannot read weights from {path}: {one_line(exc)}") from None
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: a little-endian header length, then its JSON
        return "safetensors"
    if head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive (or an OpenAI JIT one), legacy pickle
        return "torch"
    return None


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "TorchScript" in str(exc) or "jit" in str(exc).lower():
            return torch.jit.load(str(path), map_location="cpu").state_dict()
        if "mmap" not in str(exc):
            raise
    return torch.load(path, map_location="cpu", weights_only=True)


def config_from_state_dict(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, Any]:
    """Reconstruct an open_clip ViT config from OpenAI-layout weights (how official checkpoints are read)."""

    def shape(key: str) -> torch.Size:
        return state[prefix + key].shape

    def count(stem: str) -> int:
        return len({k.split(".")[len(stem.split("."))] for k in state if k.startswith(prefix + stem)})

    vision_width, _, patch, _ = shape("visual.conv1.weight")
    grid = math.isqrt(shape("visual.positional_embedding")[0] - 1)
    text_width = shape("ln_final.weight")[0]
    return {
        "embed_dim": shape("text_projection")[1],
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": patch * grid,
            "layers": count("visual.transformer.resblocks."),
            "width": vision_width,
            "patch_size": patch,
        },
        "text_cfg": {
            "context_length": shape("positional_embedding")[0],
            "vocab_size": shape("token_embedding.weight")[0],
            "width": text_width,
            "heads": max(1, text_width // 64),
            "layers": count("transformer.resblocks."),
        },
    }


def builtin_name_for(cfg: Mapping[str, Any]) -> str | None:
    """The open_clip name whose config equals ``cfg`` (ignoring the activation), if any."""
    import open_clip

    wanted = {k: v for k, v in cfg.items() if k != "quick_gelu"}
    for name in ("ViT-B-32", "ViT-B-16", "ViT-L-14"):
        base = open_clip.get_model_config(name) or {}
        if {k: v for k, v in base.items() if k != "quick_gelu"} == wanted:
            return name
    return None
