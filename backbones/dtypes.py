"""Compute dtypes by the names recipes, the CLI and encoder fingerprints use."""

import torch

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
