"""Hugging Face fast tokenizers (`tokenizer.json`), loaded natively through transformers."""

from pathlib import Path

from transformers import PreTrainedTokenizerFast

from align.backbones.tokenizers.registry import PadRule, TokenizerKind, register_tokenizer_kind, resolve_pad
from align.errors import TokenizerError


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

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def normalize(self, text: str) -> str:
        return text

    def encode(self, text: str) -> list[int]:
        return self.encode_with_offsets(text)[0]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tok(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(span) for span in enc["offset_mapping"]]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, clean_up_tokenization_spaces=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.backend_tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self.tok.convert_ids_to_tokens(token_id)


register_tokenizer_kind(TokenizerKind("hf", "tokenizer.json", HFTokenizer))
