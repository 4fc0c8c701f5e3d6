"""Baichuan-7B / Baichuan2-7B (RoPE) as native LLaMA, and Baichuan-13B / Baichuan2-13B (ALiBi) as align's own model.

Both are LLaMA blocks with q/k/v fused in `self_attn.W_pack`. The 7B releases use RoPE and name
`max_position_embeddings` in their config; the 13B releases use ALiBi and do not. Baichuan2's output layer is a
NormHead, whose rows are L2-normalised before use: the loaded (or converted) plain head holds the normalised rows.
Baichuan2 is told from Baichuan-1 by the backbone's name (its preset's `norm_head`); a checkpoint loaded by path alone
by its vocabulary (125,696 pieces; Baichuan-1 has 64,000) or its config's `z_loss_weight`.
"""

from transformers import LlamaConfig, LlamaForCausalLM
from transformers.core_model_loading import Chunk, WeightConverter

from align.backbones.native.baichuan_alibi import BaichuanAlibiForCausalLM
from align.backbones.native.layouts import NativeLayout, first_of, register_layout

BAICHUAN2_VOCAB = 125696
ARCHITECTURES = ("BaichuanForCausalLM", "BaiChuanForCausalLM")  # Baichuan-7B's config spells it BaiChuan


class BaichuanRopeConfig(LlamaConfig):
    """LLaMA's config under a model type of its own, so `W_pack` splits for this class alone."""

    model_type = "align_baichuan_rope"


class BaichuanRopeForCausalLM(LlamaForCausalLM):
    """LLaMA reading a Baichuan 7B checkpoint."""

    config_class = BaichuanRopeConfig


def _shared(config: dict) -> dict:
    return {
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "num_hidden_layers": config["num_hidden_layers"],
        "num_attention_heads": config["num_attention_heads"],
        "rms_norm_eps": first_of(config, "rms_norm_eps", default=1e-6),
        "hidden_act": config.get("hidden_act", "silu"),
        "tie_word_embeddings": False,
        "pad_token_id": config.get("pad_token_id", 0),
        "bos_token_id": config.get("bos_token_id", 1),
        "eos_token_id": config.get("eos_token_id", 2),
    }


def rope_config(config: dict) -> dict:
    """LLaMA config arguments from a Baichuan 7B config.json."""
    return {**_shared(config), "num_key_value_heads": config["num_attention_heads"],
            "max_position_embeddings": config["max_position_embeddings"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}


def alibi_config(config: dict) -> dict:
    """Baichuan ALiBi config arguments from a Baichuan 13B config.json (or a converted one)."""
    return {**_shared(config), "model_max_length": first_of(config, "model_max_length", "max_position_embeddings", default=4096)}


def w_pack_weights() -> list:
    """The fused `W_pack` weight splits in three along its output rows: q, k, v."""
    return [WeightConverter(source_patterns="self_attn.W_pack.weight",
                            target_patterns=[f"self_attn.{p}_proj.weight" for p in "qkv"], operations=[Chunk(dim=0)])]


def is_baichuan2(config: dict) -> bool:
    """Baichuan2 (NormHead) rather than Baichuan-1, when no backbone name says which: its vocabulary size, or the
    z-loss weight only Baichuan2's config.json carries."""
    return config.get("vocab_size") == BAICHUAN2_VOCAB or "z_loss_weight" in config


register_layout(NativeLayout(
    name="baichuan-rope",
    architectures=ARCHITECTURES,
    fits=lambda config: "max_position_embeddings" in config,
    config=rope_config,
    loading_class=BaichuanRopeForCausalLM,
    native_class=LlamaForCausalLM,
    weight_mapping=w_pack_weights,
    norm_head=is_baichuan2,
))
register_layout(NativeLayout(
    name="baichuan-alibi",
    architectures=ARCHITECTURES,
    fits=lambda config: "max_position_embeddings" not in config,
    config=alibi_config,
    loading_class=BaichuanAlibiForCausalLM,
    native_class=BaichuanAlibiForCausalLM,
    norm_head=is_baichuan2,
))
# A converted ALiBi directory: align's own class, head already normalised.
register_layout(NativeLayout(
    name="baichuan-alibi-converted",
    architectures=(BaichuanAlibiForCausalLM.__name__,),
    fits=lambda config: True,
    config=alibi_config,
    loading_class=BaichuanAlibiForCausalLM,
    native_class=BaichuanAlibiForCausalLM,
))
