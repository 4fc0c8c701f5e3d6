"""Loading a backbone's LLM, frozen: native transformers classes unless the backbone needs remote code and the
user opted in; optional 8-bit / 4-bit quantization through bitsandbytes."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from align.backbones.model_dir import check_model_dir
from align.backbones.spec import BackboneSpec
from align.errors import BackboneError

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def quantization_config(quantization: str, dtype: str) -> BitsAndBytesConfig | None:
    """The bitsandbytes settings for none / 8bit / 4bit (NF4, computing in `dtype`)."""
    if quantization == "none":
        return None
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=TORCH_DTYPES[dtype])
    raise BackboneError(f"quantization must be none, 8bit or 4bit, not {quantization!r}")


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
    """The backbone's causal LM with every weight frozen; its hidden and vocab sizes checked against the spec."""
    path = model or (Path(spec.model_path) if spec.model_path else None)
    if path is None:
        raise BackboneError(f"backbone '{spec.name}' has no local model: pass a model path or `align add-backbone`")
    check_model_dir(Path(path))
    if spec.remote_code and not trust_remote_code:
        raise BackboneError(
            f"backbone '{spec.name}' needs the model's own code (trust_remote_code); set runtime.trust_remote_code: true "
            "only if you trust the files in the model directory"
        )
    quant = quantization_config(quantization, dtype)
    kwargs = {"dtype": TORCH_DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device or "cpu"}
    try:
        llm = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        raise BackboneError(f"cannot load the LLM from {path}: {exc}") from None
    if quant is None and device is not None:
        llm.to(device)
    llm.requires_grad_(False)
    hidden = llm.get_input_embeddings().weight.shape[1]
    rows = llm.get_input_embeddings().weight.shape[0]
    if hidden != spec.hidden_size or rows < spec.vocab_size:
        raise BackboneError(
            f"{path} has hidden size {hidden} and {rows} embedding rows; backbone '{spec.name}' says "
            f"{spec.hidden_size} and {spec.vocab_size}"
        )
    if gradient_checkpointing:
        # Checkpointing only acts in train mode; the frozen LLM has no dropout that this would switch on.
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        llm.train()
    else:
        llm.eval()
    return llm
