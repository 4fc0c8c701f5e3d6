"""Projectors from Q-Former width to LLM hidden size, registered by exact name; the only trained part."""

from collections.abc import Callable

from torch import nn

from align.named import Registry

_PROJECTORS: Registry[Callable[[int, int], nn.Module]] = Registry("projector")


def register_projector(name: str):
    """Register a projector builder `(in_features, out_features) -> nn.Module` under an exact name."""
    return lambda builder: _PROJECTORS.register(name, builder)


@register_projector("linear")
def linear(in_features: int, out_features: int) -> nn.Module:
    """MiniGPT-4's single linear layer (`llama_proj`, MiniGPT4Qwen's `llm_proj`)."""
    return nn.Linear(in_features, out_features)


@register_projector("mlp2x_gelu")
def mlp2x_gelu(in_features: int, out_features: int) -> nn.Module:
    """LLaVA-1.5's two-layer MLP with GELU."""
    return nn.Sequential(nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features))


def projector_names() -> list[str]:
    """Every registered projector kind."""
    return _PROJECTORS.names()


def build_projector(kind: str, in_features: int, out_features: int) -> nn.Module:
    """A freshly initialised projector of `kind`."""
    return _PROJECTORS.get(kind)(in_features, out_features)
