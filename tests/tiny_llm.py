"""Tiny random LLMs (LLaMA and Qwen2 architectures) saved with a tokenizer, as a model directory would be."""

import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

HIDDEN = 32


def save_tiny_llama(directory: Path, tokenizer_model: Path, seed: int = 0) -> Path:
    """A 2-layer LLaMA over a SentencePiece tokenizer.model."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=640, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         initializer_range=0.2)  # sensitive to its inputs, so the projector has something to steer
    LlamaForCausalLM(config).save_pretrained(directory)
    shutil.copy(tokenizer_model, directory / "tokenizer.model")
    return directory


def save_tiny_qwen2(directory: Path, hf_tokenizer_dir: Path, seed: int = 0) -> Path:
    """A 2-layer Qwen2 over an HF tokenizer.json (ChatML control tokens)."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=512, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_tokenizer_dir / name, directory / name)
    return directory
