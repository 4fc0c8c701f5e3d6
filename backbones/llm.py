"""Loading a backbone's LLM, frozen: native transformers classes (official Qwen-1 and Baichuan checkpoints through
their native layouts), remote code only by explicit opt-in; optional 8-bit / 4-bit quantization through bitsandbytes."""

import contextlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from align.backbones import model_dir
from align.backbones.dtypes import TORCH_DTYPES, dtype_name
from align.backbones.native import layout_for
from align.backbones.spec import BackboneSpec
from align.errors import BackboneError

class RemoteCodeError(BackboneError):
    """A model whose architecture only its own code runs, loaded without the opt-in."""

    def __init__(self, path: Path, architectures: list[str], opt_in: str = "trust_remote_code=True"):
        self.path, self.architectures = path, architectures
        super().__init__(
            f"{path} ({', '.join(architectures) or 'no architectures'}) needs the model's own code, which align does not "
            f"run by default; pass {opt_in} only if you trust the files in that directory"
        )


def cpu_accelerator_without_gpu() -> None:
    """Without a GPU, point DeepSpeed (imported by transformers' loading and by the trainer) at its CPU accelerator,
    instead of letting it announce the fallback on stdout, which `--json` output must not contain."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


@contextmanager
def remote_code_opt_in(how: str) -> Iterator[None]:
    """Inside, a remote-code error names `how` as the way to opt in (a CLI flag, a recipe key)."""
    try:
        yield
    except RemoteCodeError as exc:
        raise RemoteCodeError(exc.path, exc.architectures, how) from None


class _FirstOnly(logging.Filter):
    """Lets the first record starting with `prefix` through, and no later one."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


def _warn_casts_once() -> None:
    """bitsandbytes logs on every 8-bit matmul that fp32 inputs are cast (1,680 lines in 4 CPU steps); once will do."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _FirstOnly) for f in logger.filters):
        logger.addFilter(_FirstOnly("MatMul8bitLt: inputs will be cast"))


def quiet_loading(quantization: str) -> None:
    """One progress display per job: transformers' loading bar only on rank 0; bitsandbytes' cast warning once."""
    if int(os.environ.get("RANK", "0")) != 0:
        hf_logging.disable_progress_bar()
    if quantization == "8bit":
        _warn_casts_once()


def quantization_config(quantization: str, dtype: str) -> BitsAndBytesConfig | None:
    """The bitsandbytes settings for none / 8bit / 4bit (NF4, computing in `dtype`)."""
    if quantization == "none":
        return None
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=TORCH_DTYPES[dtype])
    raise BackboneError(f"quantization must be none, 8bit or 4bit, not {quantization!r}")


def model_directory(model: Path | str) -> Path:
    """A model directory, or the local model of the backbone registered under that exact name."""
    path = Path(model).expanduser()
    if path.is_dir() or not isinstance(model, str) or "/" in model:
        return model_dir.check_model_dir(path)
    from align.backbones.registry import get_backbone  # the registry is only needed for names

    spec = get_backbone(model)
    if spec.model_path is None:
        raise BackboneError(f"backbone '{spec.name}' has no local model: run `align add-backbone {spec.name} --model PATH`")
    return model_dir.check_model_dir(Path(spec.model_path))


def load_llm(
    model: Path | str,
    *,
    dtype: str | torch.dtype = "fp32",
    quantization: str = "none",
    trust_remote_code: bool = False,
    device: torch.device | str | None = None,
    norm_head: bool | None = None,
) -> PreTrainedModel:
    """The frozen causal LM (eval mode) of a model directory or a registered backbone's name.

    Official Qwen-1 and Baichuan checkpoints load into native classes; any other directory through transformers'
    Auto classes. Weights stream shard by shard into `dtype` (fp32, fp16, bf16, or the torch dtype, as transformers
    takes it; "auto": the checkpoint's own) or 8/4-bit quantization. `norm_head` says whether the output rows are
    L2-normalised in use (Baichuan2); None: a registered name's entry says, else config.json tells.
    """
    if dtype == "auto" and quantization != "none":
        raise BackboneError("name the dtype (fp32, fp16, bf16) that quantized layers compute in")
    dtype = dtype if dtype == "auto" else dtype_name(dtype)
    path = model_directory(model)
    if norm_head is None and isinstance(model, str) and not Path(model).expanduser().is_dir():
        from align.backbones.registry import get_backbone  # a name: its entry decides

        norm_head = get_backbone(model).norm_head
    cpu_accelerator_without_gpu()
    quiet_loading(quantization)
    config = model_dir.model_config(path)
    layout = layout_for(config)
    quant = quantization_config(quantization, dtype)
    kwargs: dict = {"dtype": TORCH_DTYPES.get(dtype, dtype)}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": torch.device(device) if device is not None else "cpu"}
    if layout is not None:
        model_class, kwargs["config"] = layout.loading_class, layout.loading_config(config)
    else:
        if model_dir.needs_remote_code(config) and not trust_remote_code:
            raise RemoteCodeError(path, config.get("architectures") or [])
        model_class, kwargs["trust_remote_code"] = AutoModelForCausalLM, trust_remote_code
    try:
        llm = model_class.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        raise BackboneError(f"cannot load the LLM from {path}: {exc}") from None
    if layout is not None and (layout.norm_head(config) if norm_head is None else norm_head):
        normalise_output_rows(llm)
    if quantization == "4bit":
        unpacked_where_unpackable(llm)
    if quant is None and device is not None:
        llm.to(device)
    llm.requires_grad_(False)
    return llm.eval()


# bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel on the first forward; the packing needs whole
# 32-row groups and whole quantization blocks per row, and crashes otherwise (a reshape to [N, 0]).
_CPU_PACK_ROWS = 32


def unpacked_where_unpackable(llm: PreTrainedModel) -> int:
    """Keep 4-bit layers whose shape bitsandbytes' CPU packing cannot take on its plain kernel; returns how many."""
    import bitsandbytes as bnb

    kept = 0
    for module in llm.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            state = module.weight.quant_state
            rows, width = state.shape[0], state.shape[-1]
            if rows % _CPU_PACK_ROWS or width % state.blocksize or width < state.blocksize:
                module.support_avx512bf16_for_cpu = False
                kept += 1
    return kept


@torch.no_grad()
def normalise_output_rows(llm: PreTrainedModel) -> None:
    """Baichuan2's NormHead: each output row scaled to unit L2 norm (in fp32, then back to the head's dtype)."""
    head = llm.get_output_embeddings().weight
    if not head.is_floating_point():
        raise BackboneError("the output layer must not be quantized: its rows are normalised after loading")
    with gathered([head], modifier_rank=0):
        head.copy_(torch.nn.functional.normalize(head.float(), dim=-1).to(head.dtype))


def gathered(parameters: list[torch.nn.Parameter], modifier_rank: int | None = None):
    """A context in which ZeRO-3 partitioned parameters are whole (what rank `modifier_rank` writes is kept and
    partitioned again); nothing to do for ordinary parameters."""
    if not any(hasattr(p, "ds_id") for p in parameters):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parameters, modifier_rank=modifier_rank)


def full_shape(parameter: torch.nn.Parameter) -> torch.Size:
    """A parameter's shape, also when ZeRO-3 holds only a partition of it here."""
    return getattr(parameter, "ds_shape", parameter.shape)


def load_frozen_llm(
    spec: BackboneSpec,
    model: Path | None = None,
    *,
    dtype: str = "fp32",
    quantization: str = "none",
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    device: torch.device | None = None,
) -> PreTrainedModel:
    """A backbone's frozen LLM (`model`, else its added path), its hidden and vocab sizes checked against the spec."""
    path = model or (Path(spec.model_path) if spec.model_path else None)
    if path is None:
        raise BackboneError(f"backbone '{spec.name}' has no local model: pass a model path or `align add-backbone`")
    llm = load_llm(Path(path), dtype=dtype, quantization=quantization, trust_remote_code=trust_remote_code, device=device,
                   norm_head=spec.norm_head)
    rows, hidden = full_shape(llm.get_input_embeddings().weight)
    if hidden != spec.hidden_size or rows < spec.vocab_size:
        raise BackboneError(
            f"{path} has hidden size {hidden} and {rows} embedding rows; backbone '{spec.name}' says "
            f"{spec.hidden_size} and {spec.vocab_size}"
        )
    without_dropout(llm)
    if gradient_checkpointing:
        # Checkpointing only acts in train mode, which would switch dropout on: there is none left.
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        llm.train()
    return llm


def input_embeddings(spec: BackboneSpec, model: Path | None = None) -> torch.Tensor:
    """A backbone's input-embedding table [rows, hidden] in fp32 on the CPU; the LLM is loaded in its checkpoint's
    own dtype for it and let go."""
    llm = load_frozen_llm(spec, model, dtype="auto")
    table = llm.get_input_embeddings().weight.detach().float().clone()
    del llm
    return table


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Every dropout of a frozen model set to 0 (modules, and the rates attention layers apply themselves), so
    train mode computes exactly what eval mode does."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout", "attn_dropout", "hidden_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop"):
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
    return model
