"""Compute dtypes by the names recipes, the CLI and encoder fingerprints use."""

import torch

from align.errors import BackboneError

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def native_bf16_cpu() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast halves a small LLM's
    training step (SmolLM2-135M: 2.3 s instead of 4.9 s on 2 cores); elsewhere bf16 is emulated, slower than fp32."""
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check is not None and check() for check in checks)


def dtype_name(dtype: str | torch.dtype) -> str:
    """The name (fp32, fp16, bf16) of a dtype given by name or as a torch dtype, as transformers takes it."""
    for name, torch_dtype in TORCH_DTYPES.items():
        if dtype in (name, torch_dtype):
            return name
    raise BackboneError(f"dtype must be one of {', '.join(TORCH_DTYPES)} (or its torch dtype), not {dtype!r}")
