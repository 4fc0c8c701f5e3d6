"""Qwen-1 (Qwen-1.8B/7B/14B/72B-Chat, `QWenLMHeadModel`) as transformers' native Qwen2.

Qwen-1 is Qwen2's architecture with other tensor names: fused q/k/v with bias (`attn.c_attn`), output projection
without bias (`attn.c_proj`), and an MLP computing `c_proj(w1(x) * silu(w2(x)))`, so `w2` is the gate and `w1` the up
projection; its config's intermediate size is twice the MLP width. Both config namings of the releases are read.

Within the trained context (`seq_length`) this equals the original model. Beyond it the original stretches RoPE
(dynamic NTK) and scales queries by log-n; the native model does neither, so align gives it `seq_length` as its
context (`max_position_embeddings`) and never runs past it.
"""

from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.core_model_loading import Chunk, WeightConverter, WeightRenaming

from align.backbones.native.layouts import NativeLayout, first_of, register_layout
from align.errors import BackboneError


class Qwen1Config(Qwen2Config):
    """Qwen2's config under a model type of its own, so the Qwen-1 tensor names convert for this class alone."""

    model_type = "align_qwen1"


class Qwen1ForCausalLM(Qwen2ForCausalLM):
    """Qwen2 reading a Qwen-1 checkpoint."""

    config_class = Qwen1Config


def qwen1_config(config: dict) -> dict:
    """Qwen2 config arguments from a Qwen-1 config.json (`hidden_size`… or the older `n_embd`… naming)."""
    hidden = first_of(config, "hidden_size", "n_embd")
    heads = first_of(config, "num_attention_heads", "n_head")
    if first_of(config, "kv_channels", default=hidden // heads) * heads != hidden:
        raise BackboneError(f"Qwen-1 config: kv_channels × heads must equal the hidden size {hidden}")
    if first_of(config, "rotary_pct", default=1.0) != 1.0:
        raise BackboneError("Qwen-1 config: rotary_pct below 1 (partial rotary) has no native equivalent")
    if config.get("no_bias", True) is not True:
        raise BackboneError("Qwen-1 config: no_bias false (biased MLP and output projection) has no native equivalent")
    return {
        "vocab_size": first_of(config, "padded_vocab_size", "vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": first_of(config, "intermediate_size", "ffn_hidden_size") // 2,
        "num_hidden_layers": first_of(config, "num_hidden_layers", "n_layer"),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": first_of(config, "seq_length", "max_position_embeddings", "n_positions"),
        "rms_norm_eps": first_of(config, "layer_norm_epsilon", default=1e-6),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(first_of(config, "rotary_emb_base", default=10000))},
        "tie_word_embeddings": False,
        "bos_token_id": config.get("bos_token_id", 151643),
        "eos_token_id": config.get("eos_token_id", 151643),
    }


def qwen1_weights() -> list:
    """Qwen-1 tensor names → Qwen2's; the fused q/k/v weight and bias split in three along the output rows."""
    return [
        WeightRenaming(r"^transformer\.wte\.", "model.embed_tokens."),
        WeightRenaming(r"^transformer\.ln_f\.", "model.norm."),
        WeightRenaming(r"^transformer\.h\.", "model.layers."),
        WeightRenaming(r"\.ln_1\.", ".input_layernorm."),
        WeightRenaming(r"\.ln_2\.", ".post_attention_layernorm."),
        WeightRenaming(r"\.attn\.c_proj\.", ".self_attn.o_proj."),
        WeightRenaming(r"\.mlp\.w1\.", ".mlp.up_proj."),
        WeightRenaming(r"\.mlp\.w2\.", ".mlp.gate_proj."),
        WeightRenaming(r"\.mlp\.c_proj\.", ".mlp.down_proj."),
        *(
            WeightConverter(source_patterns=f"attn.c_attn.{kind}",
                            target_patterns=[f"self_attn.{p}_proj.{kind}" for p in "qkv"], operations=[Chunk(dim=0)])
            for kind in ("weight", "bias")
        ),
    ]


register_layout(NativeLayout(
    name="qwen1",
    architectures=("QWenLMHeadModel",),
    fits=lambda config: True,
    config=qwen1_config,
    loading_class=Qwen1ForCausalLM,
    native_class=Qwen2ForCausalLM,
    weight_mapping=qwen1_weights,
))
