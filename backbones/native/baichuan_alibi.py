"""Baichuan-13B and Baichuan2-13B as a native transformers model: LLaMA's blocks with ALiBi instead of RoPE.

No transformers class has ALiBi on a LLaMA block, so this is a small model of our own. Tensor names equal the
official checkpoints' (`model.layers.N.self_attn.W_pack`, `o_proj`, `mlp.gate_proj|up_proj|down_proj`, the two RMSNorms),
so official weights load into it without renaming. It is an ordinary `PreTrainedModel` + `GenerationMixin`: KV cache,
left padding, `inputs_embeds`, `labels`, gradient checkpointing and bitsandbytes quantization work as for any HF model.

ALiBi adds `slope_h * (j - i)` to the score of query i on key j, so only distances count: left padding (masked keys)
changes nothing for the real tokens, and no position ids are needed.
"""

import math

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm


class BaichuanAlibiConfig(PretrainedConfig):
    """Sizes of a Baichuan ALiBi model; `model_max_length` is the trained context (also `max_position_embeddings`)."""

    model_type = "align_baichuan_alibi"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 125696,
        hidden_size: int = 5120,
        intermediate_size: int = 13696,
        num_hidden_layers: int = 40,
        num_attention_heads: int = 40,
        model_max_length: int = 4096,
        rms_norm_eps: float = 1e-6,
        hidden_act: str = "silu",
        initializer_range: float = 0.02,
        use_cache: bool = True,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} does not split into {num_attention_heads} heads")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.model_max_length = model_max_length
        self.max_position_embeddings = model_max_length  # align reads the context length from this name
        self.rms_norm_eps = rms_norm_eps
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.mlp_bias = False  # LlamaMLP reads it
        kwargs.pop("max_position_embeddings", None)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)


def alibi_slopes(n_heads: int) -> list[float]:
    """Baichuan's per-head slopes: a geometric series for a power of two, interleaved extra heads otherwise."""
    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return power_of_two(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: n_heads - closest]


def alibi_bias(slopes: list[float], key_mask: torch.Tensor, past: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, heads, length, past+length] additive scores: slope * (j - i) where key j is visible to query i."""
    keys = key_mask.shape[1]
    query_pos = torch.arange(past, past + length, device=key_mask.device)
    key_pos = torch.arange(keys, device=key_mask.device)
    distance = (key_pos[None, :] - query_pos[:, None]).to(torch.float32)  # [length, keys], <= 0 where visible
    visible = (distance <= 0)[None, None] & key_mask[:, None, None, :].bool()
    bias = torch.tensor(slopes, device=key_mask.device)[None, :, None, None] * distance[None, None]
    # The lowest finite value (not -inf) keeps rows of padding queries, which see nothing, free of NaN.
    return torch.where(visible, bias, torch.finfo(torch.float32).min).to(dtype)


class BaichuanAlibiAttention(nn.Module):
    """Multi-head attention with fused q/k/v (`W_pack`) and an ALiBi bias instead of rotary positions."""

    def __init__(self, config: BaichuanAlibiConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.W_pack = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        batch, length, width = hidden.shape
        qkv = self.W_pack(hidden).view(batch, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv[0], qkv[1], qkv[2]
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, width))


class BaichuanAlibiDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: RMSNorm → attention → residual, RMSNorm → SwiGLU MLP → residual."""

    def __init__(self, config: BaichuanAlibiConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = BaichuanAlibiAttention(config, layer_idx)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), bias, cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class BaichuanAlibiPreTrainedModel(PreTrainedModel):
    """Shared settings of the Baichuan ALiBi classes."""

    config_class = BaichuanAlibiConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BaichuanAlibiDecoderLayer"]
    _supports_sdpa = True


class BaichuanAlibiModel(BaichuanAlibiPreTrainedModel):
    """Embeddings, decoder layers and the final norm."""

    def __init__(self, config: BaichuanAlibiConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(BaichuanAlibiDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.slopes = alibi_slopes(config.num_attention_heads)  # plain floats: no buffer to place or load
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        use_cache = use_cache and not self.training  # a frozen LLM in train mode only checkpoints; it never decodes
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache(config=self.config)
        batch, length = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, device=inputs_embeds.device, dtype=torch.long)
        bias = alibi_bias(self.slopes, attention_mask[:, -(past + length):], past, length, inputs_embeds.dtype)
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, bias, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), cache=cache)


class BaichuanAlibiForCausalLM(BaichuanAlibiPreTrainedModel, GenerationMixin):
    """The ALiBi model with its output layer (a plain head: Baichuan2's NormHead rows are normalised at load)."""

    def __init__(self, config: BaichuanAlibiConfig):
        super().__init__(config)
        self.model = BaichuanAlibiModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache)
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)


# A converted directory (`align convert-backbone`) names this model type; Auto classes then load it natively.
AutoConfig.register(BaichuanAlibiConfig.model_type, BaichuanAlibiConfig)
AutoModelForCausalLM.register(BaichuanAlibiConfig, BaichuanAlibiForCausalLM)
