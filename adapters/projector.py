"""Projectors from Q-Former width to LLM hidden size, registered by exact name; the only trained part."""

from collections.abc import Callable

import torch
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


def embedding_statistics(weight: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, float]:
    """The per-dimension mean [H] of an input embedding table [V, H] and the spread (standard deviation) of its
    rows around that mean, in fp32, read a chunk of rows at a time (a 152k-row table is never copied whole)."""
    rows = weight.shape[0]
    mean = sum(weight[i:i + chunk].float().sum(0) for i in range(0, rows, chunk)) / rows
    square = sum((weight[i:i + chunk].float() - mean).square().sum() for i in range(0, rows, chunk))
    return mean, float((square / (rows * weight.shape[1])).sqrt())


@torch.no_grad()
def match_embeddings(projector: nn.Module, features: torch.Tensor, mean: torch.Tensor, spread: float) -> None:
    """Rescale a fresh projector's last linear layer so that its outputs on `features` ([N, width] store rows) have
    the input embeddings' per-dimension `mean` and `spread`: the image slots start out on the scale of the words the
    frozen LLM reads, not several times larger (a default-initialised linear layer on Q-Former outputs)."""
    last = [module for module in projector.modules() if isinstance(module, nn.Linear)][-1]
    out = projector(features).float()
    last.weight.mul_(spread / float((out - out.mean(0)).square().mean().sqrt()))
    if last.bias is not None:
        last.bias.add_((mean - projector(features).float().mean(0)).to(last.bias.dtype))
