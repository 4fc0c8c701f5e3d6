"""LLMs whose released code transformers cannot run, loaded into native transformers classes: no remote code.

A layout reads an official `config.json`, found by its `architectures` entry, and says which native class and config
the weights go into and how the official tensor names and fused tensors map onto that class's. The mapping is
transformers' own weight-conversion mechanism, so loading streams shard by shard (`.bin` through
`torch.load(weights_only=True)`, or safetensors) straight into the requested dtype or 8/4-bit quantization.
"""

from align.backbones.native import baichuan, qwen1  # noqa: F401  (each registers its layouts)
from align.backbones.native.layouts import NativeLayout, layout_for, native_architectures

__all__ = ["NativeLayout", "layout_for", "native_architectures"]
