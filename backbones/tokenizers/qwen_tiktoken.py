"""Qwen(-1)'s `qwen.tiktoken` BPE ranks, read with tiktoken exactly as Qwen's own tokenizer does (no remote code)."""

import unicodedata
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from align.backbones.tokenizers.registry import PadRule, TokenizerKind, register_tokenizer_kind, resolve_pad
from align.templates.hf_chat import SpecialToken

# From Qwen's tokenization_qwen.py: the pre-tokenizer pattern and the control tokens after the last rank.
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
QWEN_CONTROLS = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(205))


class QwenTiktokenTokenizer:
    """Qwen's BPE; text is NFC-normalised as Qwen does, and control strings in it stay plain text."""

    bos_id = None

    def __init__(self, path: Path, pad: PadRule = ENDOFTEXT):
        ranks = load_tiktoken_bpe(str(path))
        first = max(ranks.values()) + 1
        self.controls = {token: first + i for i, token in enumerate(QWEN_CONTROLS)}
        self.enc = tiktoken.Encoding(
            name=f"qwen:{path}", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=self.controls
        )
        self.eos_id = self.controls[ENDOFTEXT]
        self.pad_id = resolve_pad(None, pad if pad is not None else ENDOFTEXT, self.token_to_id, self.eos_id, str(path))
        self._names = {i: token for token, i in self.controls.items()}

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def normalize(self, text: str) -> str:
        return unicodedata.normalize("NFC", text)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(self.normalize(text), allowed_special=set(), disallowed_special=())

    def encode_with_offsets(self, text: str, continuation: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character spans in the NFC-normalised text (byte-level: where the text starts changes nothing)."""
        ids = self.encode(text)
        decoded, starts = self.enc.decode_with_offsets(ids)
        ends = starts[1:] + [len(decoded)]
        return ids, list(zip(starts, ends))

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def special_tokens(self) -> list[SpecialToken]:
        """Qwen's control tokens (all of them special)."""
        return [SpecialToken(token) for token in self.controls]

    def template_variables(self) -> dict[str, object]:
        """What a chat template may name: Qwen's tokenizer defines only its end-of-text token."""
        return {"eos_token": ENDOFTEXT}

    def token_to_id(self, token: str) -> int | None:
        if token in self.controls:
            return self.controls[token]
        try:
            return self.enc.encode_single_token(token.encode("utf-8"))
        except KeyError:
            return None

    def id_to_token(self, token_id: int) -> str:
        if token_id in self._names:
            return self._names[token_id]
        return self.enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")


register_tokenizer_kind(TokenizerKind("qwen-tiktoken", "qwen.tiktoken", QwenTiktokenTokenizer))
