"""TS2-Net checkpoints: the project's own format, and import of the reference's ``pytorch_model.bin.N`` (spec §12).

Own format: one safetensors file whose header metadata holds the JSON ``TS2Config`` (backbone config included), so
weights and configuration travel together and are read with one call.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError
from .backbone import builtin_name_for, config_from_state_dict, read_state_dict
from .config import TS2Config

FORMAT = "ts2net/1"
OFFICIAL_MARKER = "frame_position_embeddings.weight"
OFFICIAL_UNUSED = (
    "visual_prompt_encoder.",
    "text_token_selector.",
    "clip.input_resolution",
    "clip.context_length",
    "clip.vocab_size",
)
OFFICIAL_RENAMES = (
    (re.compile(r"^frame_position_embeddings\."), "temporal.position."),
    (re.compile(r"^transformerClip\.resblocks\."), "temporal.blocks."),
    (re.compile(r"^visual_token_selector\.score_predictor\."), "selector.predictor."),
    (re.compile(r"\.attn\.net\."), ".attn."),
)


def save_checkpoint(model: torch.nn.Module, path: Path, config: TS2Config) -> None:
    """Write weights and config atomically (temp file + rename), so an interrupted save never leaves half a file."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "config": json.dumps(config.to_dict(), sort_keys=True)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb"):  # made as any new file is, so its mode honours the umask
        pass
    mode = partial.stat().st_mode & 0o777
    save_file(tensors, str(partial), metadata=metadata)
    os.chmod(partial, mode)  # safetensors writes through a private (0600) temporary file of its own
    os.replace(partial, path)


def _own_metadata(path: Path) -> dict[str, str] | None:
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"Cannot read checkpoint {path}: {exc}") from None
    return metadata if metadata.get("format") == FORMAT else None


def read_checkpoint(path: Path, *, text_only: bool = False) -> tuple[TS2Config, dict[str, torch.Tensor]]:
    """Config and state dict (our key names) of a TS2-Net checkpoint in either format."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; --checkpoint takes a file (e.g. last.safetensors in it).")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint not found: {path} (check the --checkpoint path).")
    keep = _text_keys if text_only else None
    metadata = _own_metadata(path)
    if metadata is not None:
        config = TS2Config.from_dict(json.loads(metadata["config"]))
        return config, read_state_dict(path, keep)
    state = read_state_dict(path)
    if OFFICIAL_MARKER not in state:
        hint = " (it looks like CLIP weights: pass it with --pretrained)" if "visual.conv1.weight" in state else ""
        raise CheckpointError(f"{path} is neither a ts2 checkpoint nor an official TS2-Net one{hint}.")
    config, converted = convert_official(state)
    return config, {k: v for k, v in converted.items() if keep is None or keep(k)}


def _text_keys(key: str) -> bool:
    return key.startswith("clip.") and not key.startswith("clip.visual.")


def convert_official(state: Mapping[str, torch.Tensor]) -> tuple[TS2Config, dict[str, torch.Tensor]]:
    """Rename the reference's keys to ours and cast to fp32 (spec §12).

    Blocks 10–11 were saved under ``attn.net.`` by the shift wrapper; those are the fine-tuned attention weights
    and win over any plain ``attn.`` copy. Unused modules are dropped; any other unknown key is an error.
    """
    kept = {k: v for k, v in state.items() if not k.startswith(OFFICIAL_UNUSED)}
    shifted = {k.replace(".attn.net.", ".attn.") for k in kept if ".attn.net." in k}
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in kept.items():
        if key in shifted:
            continue  # superseded by the attn.net. copy
        if not key.startswith(("clip.", "frame_position_embeddings.", "transformerClip.", "visual_token_selector.")):
            unknown.append(key)
            continue
        new_key = key
        for pattern, replacement in OFFICIAL_RENAMES:
            new_key = pattern.sub(replacement, new_key)
        converted[new_key] = tensor.float() if tensor.is_floating_point() else tensor
    if unknown:
        raise CheckpointError(f"Unknown keys in the TS2-Net checkpoint: {', '.join(sorted(unknown)[:8])}.")
    backbone_cfg = config_from_state_dict(converted, prefix="clip.")
    layers = len({k.split(".")[2] for k in converted if k.startswith("temporal.blocks.")})
    top_k = 3
    config = TS2Config(
        backbone=builtin_name_for(backbone_cfg) or "custom",
        backbone_cfg=backbone_cfg,
        quick_gelu=True,
        top_k=top_k,
        temporal_layers=layers,
        zero_shot=False,
        compat="official",  # what it was trained with (spec §10.1: "use tile ... to load official checkpoints")
        provenance={"imported_from": "official TS2-Net checkpoint"},
    )
    return config, converted
