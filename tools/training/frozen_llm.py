"""The frozen LLM of a training run: whole on every rank, or under `zero_stage: 3` partitioned while it loads and
gathered layer by layer; and torch's own linear put back afterwards (ZeRO-3 loading replaces it)."""

import sys

import numpy as np
import torch

from align.backbones.llm import full_shape, load_frozen_llm, remote_code_opt_in
from align.errors import AlignError
from align.tools.training.run import Run


def frozen_llm_ds_config(run: Run) -> dict:
    """DeepSpeed's ZeRO-3 settings for the frozen LLM: partitioned across ranks, gathered layer by layer."""
    runtime = run.recipe.runtime
    on_gpu = run.device.type == "cuda"
    zero = {"stage": 3}
    if runtime.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": zero,
            "bf16": {"enabled": runtime.precision == "bf16" and on_gpu},
            "fp16": {"enabled": runtime.precision == "fp16" and on_gpu}, "steps_per_print": 10**9}


def load_run_llm(run: Run) -> torch.nn.Module:
    """The frozen LLM: whole on every rank, or under `zero_stage: 3` partitioned while it loads (each rank holds
    about 1/world of it, optionally in CPU memory) and gathered layer by layer in forward and backward."""
    runtime = run.recipe.runtime
    partition = runtime.zero_stage == 3
    if partition and runtime.quantization != "none":
        raise AlignError("zero_stage 3 partitions the frozen LLM, and 8/4-bit weights cannot be partitioned: use "
                         "quantization none with ZeRO-3, or zero_stage 0-2 with quantization")
    if runtime.offload_params and not partition:
        raise AlignError("runtime.offload_params moves ZeRO-3 partitions to CPU memory: it needs zero_stage 3")
    keep_alive = None
    if partition:
        from transformers.integrations import HfDeepSpeedConfig

        # transformers loads under deepspeed.zero.Init while this object lives: no rank ever holds the whole model.
        keep_alive = HfDeepSpeedConfig(frozen_llm_ds_config(run) | {"train_batch_size": run.ranks.world})
    dtype = "fp32" if run.device.type == "cpu" and runtime.quantization == "none" else runtime.precision
    with remote_code_opt_in("runtime.trust_remote_code: true in the recipe (or --set runtime.trust_remote_code=true)"):
        llm = load_frozen_llm(
            run.spec, run.recipe.backbone.model, dtype=dtype, quantization=runtime.quantization,
            trust_remote_code=runtime.trust_remote_code, gradient_checkpointing=runtime.gradient_checkpointing,
            device=None if partition else run.device,
        )
    if partition:
        import deepspeed

        # An engine without optimizer: it installs the hooks that gather each layer's weights when it runs.
        run.llm_engine = deepspeed.initialize(model=llm, config=keep_alive.config)[0]
    return llm


def frozen_share(run: Run) -> dict:
    """How many frozen LLM parameters there are, and how many each rank holds."""
    params = list(run.model.llm.parameters())
    total = sum(int(np.prod(full_shape(p))) for p in params)
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    per_rank = [0] * run.ranks.world
    per_rank[run.ranks.rank] = held
    return {"total": total, "held_per_rank": run.ranks.sum(per_rank)}


def restore_torch_linear() -> None:
    """Put torch's own `torch.nn.functional.linear` back. Loading under ZeRO-3 (deepspeed.zero.Init) replaces it with
    DeepSpeed's memory-efficient linear for the rest of the process ("persists unless manually reset"); a run keeps
    it while it trains and leaves the process as it found it."""
    zero = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    original = getattr(getattr(zero, "InsertPostInitMethodToModuleSubClasses", None), "linear_bk", None)
    if original is not None:
        torch.nn.functional.linear = original

