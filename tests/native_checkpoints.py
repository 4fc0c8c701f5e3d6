"""Tiny random checkpoints in the official Qwen-1 and Baichuan layouts, and reference forwards written from the
published architectures in plain torch (independent of align's loaders and of transformers' model classes)."""

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

LAYERS, FFN = 2, 48
HEAD_DIM = 8  # the hidden size is HEAD_DIM × heads


def _rand(*shape, scale=0.2):
    return torch.randn(*shape) * scale


def qwen1_state(vocab: int, heads: int = 4) -> dict[str, torch.Tensor]:
    """Qwen-1 tensor names and shapes (fused q/k/v with bias, no other biases)."""
    hidden = HEAD_DIM * heads
    state = {"transformer.wte.weight": _rand(vocab, hidden, scale=1.0), "transformer.ln_f.weight": 1 + _rand(hidden),
             "lm_head.weight": _rand(vocab, hidden, scale=1.0)}
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        state |= {p + "ln_1.weight": 1 + _rand(hidden), p + "ln_2.weight": 1 + _rand(hidden),
                  p + "attn.c_attn.weight": _rand(3 * hidden, hidden), p + "attn.c_attn.bias": _rand(3 * hidden),
                  p + "attn.c_proj.weight": _rand(hidden, hidden),
                  p + "mlp.w1.weight": _rand(FFN // 2, hidden), p + "mlp.w2.weight": _rand(FFN // 2, hidden),
                  p + "mlp.c_proj.weight": _rand(hidden, FFN // 2)}
    return state


def qwen1_config(vocab: int, heads: int = 4, naming: str = "new", seq_length: int = 256) -> dict:
    """A Qwen-1 config.json in the newer (`hidden_size`…) or older (`n_embd`…) naming of the releases."""
    hidden = HEAD_DIM * heads
    common = {"architectures": ["QWenLMHeadModel"], "auto_map": {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
              "model_type": "qwen", "kv_channels": HEAD_DIM, "rotary_emb_base": 10000, "rotary_pct": 1.0,
              "seq_length": seq_length, "no_bias": True, "use_dynamic_ntk": True, "use_logn_attn": True,
              "bos_token_id": 151643, "eos_token_id": 151643, "tie_word_embeddings": False}
    if naming == "new":
        return common | {"hidden_size": hidden, "num_attention_heads": heads, "num_hidden_layers": LAYERS,
                         "intermediate_size": FFN, "max_position_embeddings": 4 * seq_length,
                         "layer_norm_epsilon": 1e-6, "vocab_size": vocab}
    return common | {"n_embd": hidden, "n_head": heads, "n_layer": LAYERS, "ffn_hidden_size": FFN,
                     "n_positions": 4 * seq_length, "layer_norm_epsilon": 1e-5, "padded_vocab_size": vocab,
                     "vocab_size": vocab}


def baichuan_state(vocab: int, heads: int = 4) -> dict[str, torch.Tensor]:
    """Baichuan tensor names and shapes (LLaMA blocks with q/k/v fused in `W_pack`)."""
    hidden = HEAD_DIM * heads
    state = {"model.embed_tokens.weight": _rand(vocab, hidden, scale=1.0), "model.norm.weight": 1 + _rand(hidden),
             "lm_head.weight": _rand(vocab, hidden, scale=1.0)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        state |= {p + "input_layernorm.weight": 1 + _rand(hidden), p + "post_attention_layernorm.weight": 1 + _rand(hidden),
                  p + "self_attn.W_pack.weight": _rand(3 * hidden, hidden), p + "self_attn.o_proj.weight": _rand(hidden, hidden),
                  p + "mlp.gate_proj.weight": _rand(FFN, hidden), p + "mlp.up_proj.weight": _rand(FFN, hidden),
                  p + "mlp.down_proj.weight": _rand(hidden, FFN)}
    return state


def baichuan_config(vocab: int, heads: int = 4, alibi: bool = False) -> dict:
    """A Baichuan config.json: 7B-style (RoPE, names max_position_embeddings) or 13B-style (ALiBi, does not)."""
    config = {"architectures": ["BaichuanForCausalLM"], "auto_map": {"AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
              "model_type": "baichuan", "hidden_size": HEAD_DIM * heads, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
              "num_attention_heads": heads, "rms_norm_eps": 1e-6, "hidden_act": "silu", "model_max_length": 256,
              "vocab_size": vocab, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
    return config if alibi else config | {"max_position_embeddings": 256}


def write_checkpoint(directory: Path, state: dict, config: dict, fmt: str = "bin", shards: int = 1) -> Path:
    """Write `state` as the releases do: `pytorch_model*.bin` or `model*.safetensors`, sharded with an index."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"max_new_tokens": 64}))
    names = sorted(state)
    groups = [names[i::shards] for i in range(shards)]
    stem, suffix = ("pytorch_model", "bin") if fmt == "bin" else ("model", "safetensors")
    weight_map = {}
    for index, group in enumerate(groups, 1):
        file = f"{stem}.{suffix}" if shards == 1 else f"{stem}-{index:05d}-of-{shards:05d}.{suffix}"
        part = {name: state[name].contiguous() for name in group}
        if fmt == "bin":
            torch.save(part, directory / file)
        else:
            save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map |= {name: file for name in group}
    if shards > 1:
        (directory / f"{stem}.{suffix}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


# -- reference forwards (one unpadded sequence, fp32) -----------------------------------------------------------------

def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotary(x, base=10000.0):
    """RoPE as Qwen-1 and LLaMA apply it: [T, heads, d], halves rotated."""
    length, _, dim = x.shape
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(torch.arange(length).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    x1, x2 = x[..., : dim // 2], x[..., dim // 2:]
    return x * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()


def _attention(q, k, v, extra=None):
    """q, k, v [T, heads, d] → [T, heads*d], causal, with an optional [heads, T, T] additive bias."""
    length, heads, dim = q.shape
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(dim)
    if extra is not None:
        scores = scores + extra
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(length, heads * dim)


def qwen1_reference(state: dict, embeds: torch.Tensor, heads: int = 4, eps: float = 1e-6) -> torch.Tensor:
    """Qwen-1's forward: [T, H] input embeddings → [T, vocab] logits."""
    x, hidden = embeds, HEAD_DIM * heads
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        h = _rms(x, state[p + "ln_1.weight"], eps)
        q, k, v = (h @ state[p + "attn.c_attn.weight"].T + state[p + "attn.c_attn.bias"]).split(hidden, dim=-1)
        q, k, v = (t.reshape(len(x), heads, -1) for t in (q, k, v))
        x = x + _attention(_rotary(q), _rotary(k), v) @ state[p + "attn.c_proj.weight"].T
        h = _rms(x, state[p + "ln_2.weight"], eps)
        a1, a2 = h @ state[p + "mlp.w1.weight"].T, h @ state[p + "mlp.w2.weight"].T
        x = x + (a1 * torch.nn.functional.silu(a2)) @ state[p + "mlp.c_proj.weight"].T
    return _rms(x, state["transformer.ln_f.weight"], eps) @ state["lm_head.weight"].T


def baichuan_alibi_slopes(n: int) -> list[float]:
    """ALiBi slopes as Baichuan's `_get_interleave` defines them."""
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + baichuan_alibi_slopes(2 * closest)[0::2][: n - closest]


def baichuan_reference(state: dict, embeds: torch.Tensor, heads: int = 4, alibi: bool = False,
                       norm_head: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Baichuan's forward (RoPE for 7B, ALiBi for 13B; NormHead for Baichuan2): [T, H] → [T, vocab] logits."""
    x, length, hidden = embeds, len(embeds), HEAD_DIM * heads
    # Baichuan's inference mask: slope × key position (softmax ignores the per-row constant of slope × (j − i)).
    bias = torch.tensor(baichuan_alibi_slopes(heads))[:, None, None] * torch.arange(length).float()[None, None, :]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        h = _rms(x, state[p + "input_layernorm.weight"], eps)
        q, k, v = (t.reshape(length, heads, -1) for t in (h @ state[p + "self_attn.W_pack.weight"].T).split(hidden, -1))
        if alibi:
            out = _attention(q, k, v, bias.expand(heads, length, length))
        else:
            out = _attention(_rotary(q), _rotary(k), v)
        x = x + out @ state[p + "self_attn.o_proj.weight"].T
        h = _rms(x, state[p + "post_attention_layernorm.weight"], eps)
        gate, up = h @ state[p + "mlp.gate_proj.weight"].T, h @ state[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ state[p + "mlp.down_proj.weight"].T
    head = state["lm_head.weight"]
    if norm_head:
        head = torch.nn.functional.normalize(head, dim=-1)
    return _rms(x, state["model.norm.weight"], eps) @ head.T


def reference_greedy(forward, table: torch.Tensor, embeds: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding by re-running the reference forward on the whole sequence each step."""
    out = []
    for _ in range(steps):
        token = int(forward(embeds)[-1].argmax())
        out.append(token)
        embeds = torch.cat([embeds, table[token][None]])
    return out
