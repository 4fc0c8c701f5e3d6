"""Import released projector checkpoints (MiniGPT-4's `llama_proj`, MiniGPT4Qwen's `llm_proj`) as adapter directories."""

from dataclasses import dataclass
from pathlib import Path

import torch

from align.adapters.adapter_files import AdapterConfig, AdapterError, check_weights, save_adapter
from align.backbones.spec import BackboneSpec
from align.named import Registry
from align.templates.render import DEFAULT_QUERY_TOKENS


@dataclass(frozen=True)
class CheckpointKind:
    """Where a toolkit keeps its projector and which backbones its checkpoints were trained on."""

    name: str
    prefix: str
    backbones: tuple[str, ...]


KINDS: Registry[CheckpointKind] = Registry("checkpoint import kind")
for _kind in (CheckpointKind("minigpt4", "llama_proj.", ("vicuna-7b-v0", "vicuna-13b-v0")),
              CheckpointKind("minigpt4qwen", "llm_proj.", ("qwen-7b-chat",))):
    KINDS.register(_kind.name, _kind)


def _state_dict(path: Path) -> dict:
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AdapterError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # torch's message runs over several lines: its first says what is wrong
        first = str(exc).strip().splitlines()[0][:300]
        if first.startswith("Weights only load failed"):
            first = "it is not a PyTorch checkpoint, or it holds objects other than tensors (align loads weights only)"
        raise AdapterError(f"cannot read {path} as a weights-only checkpoint: {first}") from None
    # {"model": ...} (LAVIS runners), {"module": ...} (a DeepSpeed engine's model states) or a bare state dict.
    for key in ("model", "module"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict):
        raise AdapterError(f"{path} does not hold a state dict")
    return data


def import_checkpoint(kind_name: str, path: Path, spec: BackboneSpec, out: Path, *, overwrite: bool = False) -> Path:
    """Write `out` as an adapter holding the checkpoint's projector, after checking it fits `spec`; an existing
    `out` is replaced only when `overwrite`."""
    kind = KINDS.get(kind_name)
    if Path(out).exists() and not overwrite:
        raise AdapterError(f"{out} already exists; pass --overwrite to replace it")
    if spec.name not in kind.backbones:
        raise AdapterError(f"{kind.name} checkpoints are for {', '.join(kind.backbones)}, not '{spec.name}'")
    state = {name.removeprefix("module."): t for name, t in _state_dict(path).items()}
    weight, bias = state.get(kind.prefix + "weight"), state.get(kind.prefix + "bias")
    if weight is None or bias is None:
        raise AdapterError(f"{path} has no {kind.prefix}weight / {kind.prefix}bias: not a {kind.name} checkpoint")
    check_weights({kind.prefix + "weight": weight, kind.prefix + "bias": bias}, path)
    if weight.dim() != 2 or weight.shape[0] != spec.hidden_size or bias.shape != (spec.hidden_size,):
        raise AdapterError(
            f"{path}: projector {tuple(weight.shape)} does not fit '{spec.name}' (hidden size {spec.hidden_size})"
        )
    config = AdapterConfig.for_backbone(
        spec, projector="linear", in_features=weight.shape[1], template=spec.template,
        num_query_tokens=DEFAULT_QUERY_TOKENS, encoder_fingerprint=None, stage=f"imported from {kind.name}",
    )
    return save_adapter(out, config, {"weight": weight.float(), "bias": bias.float()})
