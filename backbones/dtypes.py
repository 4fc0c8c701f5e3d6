"""Compute dtypes by the names recipes, the CLI and encoder fingerprints use."""

import torch

from align.errors import BackboneError

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_name(dtype: str | torch.dtype) -> str:
    """The name (fp32, fp16, bf16) of a dtype given by name or as a torch dtype, as transformers takes it."""
    for name, torch_dtype in TORCH_DTYPES.items():
        if dtype in (name, torch_dtype):
            return name
    raise BackboneError(f"dtype must be one of {', '.join(TORCH_DTYPES)} (or its torch dtype), not {dtype!r}")
