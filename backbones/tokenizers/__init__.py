"""Native tokenizers (HF fast, SentencePiece, Qwen tiktoken) behind one small interface.

Registration order is detection order: a directory with `tokenizer.json` is read as HF first.
"""

from align.backbones.tokenizers import hf_tokenizer, qwen_tiktoken, sentencepiece_tokenizer  # noqa: F401
from align.backbones.tokenizers.registry import (
    detect_tokenizer_kind,
    load_tokenizer,
    tokenizer_kind,
    tokenizer_kind_names,
)

__all__ = ["detect_tokenizer_kind", "load_tokenizer", "tokenizer_kind", "tokenizer_kind_names"]
