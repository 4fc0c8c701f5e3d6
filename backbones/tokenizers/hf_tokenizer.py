"""Hugging Face fast tokenizers (`tokenizer.json`), loaded natively through transformers."""

import json
from pathlib import Path

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from align.backbones.tokenizers.registry import PadRule, TokenizerKind, register_tokenizer_kind, resolve_pad
from align.errors import TokenizerError
from align.templates.hf_chat import SpecialToken


class HFTokenizer:
    """A `tokenizer.json` with its `tokenizer_config.json`; special-token strings in text are split as plain text."""

    def __init__(self, path: Path, pad: PadRule = None):
        # from_pretrained on the directory also reads tokenizer_config.json (bos/eos/pad); no remote code.
        self.tok = PreTrainedTokenizerFast.from_pretrained(str(path.parent))
        self.bos_id = self.tok.bos_token_id
        if self.tok.eos_token_id is None:
            raise TokenizerError(f"{path.parent} defines no eos_token in tokenizer_config.json")
        self.eos_id = self.tok.eos_token_id
        self.pad_id = resolve_pad(self.tok.pad_token_id, pad, self.token_to_id, self.eos_id, str(path.parent))
        self._continuation = _without_first_prepend(self.tok.backend_tokenizer)
        # What `tok(text, split_special_tokens=True)` runs, without the wrapper's per-call overhead (≈5× the cost
        # of the split itself on short texts): training renders millions of runs.
        self._plain = Tokenizer.from_str(self.tok.backend_tokenizer.to_str())
        self._plain.encode_special_tokens = True

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def normalize(self, text: str) -> str:
        return text

    def encode(self, text: str) -> list[int]:
        return self.encode_with_offsets(text)[0]

    def encode_with_offsets(self, text: str, continuation: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        if continuation and self._continuation is not None:
            enc = self._continuation.encode(text, add_special_tokens=False)
            return list(enc.ids), [tuple(span) for span in enc.offsets]
        enc = self._plain.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(span) for span in enc.offsets]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, clean_up_tokenization_spaces=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.backend_tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self.tok.convert_ids_to_tokens(token_id)

    def special_tokens(self) -> list[SpecialToken]:
        """The added tokens marked special, with how each eats neighbouring whitespace."""
        return [SpecialToken(t.content, t.lstrip, t.rstrip) for t in self.tok.added_tokens_decoder.values() if t.special]

    def template_variables(self) -> dict[str, object]:
        """What transformers passes to chat templates besides the messages: the special-token strings."""
        return dict(self.tok.special_tokens_map)


def _without_first_prepend(backend: Tokenizer) -> Tokenizer | None:
    """For a Metaspace pre-tokenizer that prepends `▁` only at the start of the input (prepend_scheme "first"), the
    same tokenizer never prepending: how text after a special token is split in a whole-string encoding. None when
    the tokenizer has no such rule. Special-token strings in text stay plain text in it too."""
    spec = json.loads(backend.to_str())
    found = False

    def visit(node):
        nonlocal found
        if isinstance(node, dict):
            if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
                node["prepend_scheme"] = "never"
                found = True
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(spec.get("pre_tokenizer"))
    if not found:
        return None
    continuation = Tokenizer.from_str(json.dumps(spec))
    continuation.encode_special_tokens = True
    return continuation


register_tokenizer_kind(TokenizerKind("hf", "tokenizer.json", HFTokenizer))
