"""SentencePiece `tokenizer.model` files (LLaMA, Vicuna, Baichuan), read with the sentencepiece library."""

import json
import re
from pathlib import Path

import sentencepiece
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from align.backbones.tokenizers.registry import PadRule, TokenizerKind, register_tokenizer_kind, resolve_pad
from align.errors import TokenizerError
from align.templates.hf_chat import SpecialToken


# Reserved pieces (Baichuan's `<reserved_106>` = user, `<reserved_107>` = assistant) are stored as USER_DEFINED, which
# SentencePiece matches in text; as CONTROL they keep their ids for templates but are never produced from text.
RESERVED_PIECE = re.compile(r"<reserved_\d+>")


def _model_proto(path: Path) -> model_pb2.ModelProto:
    """The model file with every reserved user-defined piece turned into a control piece; nothing else changes."""
    proto = model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    for piece in proto.pieces:
        if piece.type == model_pb2.ModelProto.SentencePiece.USER_DEFINED and RESERVED_PIECE.fullmatch(piece.piece):
            piece.type = model_pb2.ModelProto.SentencePiece.CONTROL
    return proto


def _is_legacy(path: Path) -> bool:
    """HF's `legacy` flag from the tokenizer_config.json beside the model (absent: legacy, as HF defaults)."""
    config = path.parent / "tokenizer_config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("legacy", True) is not False
    except (OSError, ValueError, AttributeError):
        return True


class SentencePieceTokenizer:
    """A SentencePiece model; control pieces such as `</s>` or Baichuan's reserved ones are never produced from text."""

    def __init__(self, path: Path, pad: PadRule = None):
        proto = _model_proto(path)
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
        # Non-legacy tokenizers (HF `legacy: false`) add no dummy prefix to text that follows a special token.
        self._bare = None
        if not _is_legacy(path) and proto.normalizer_spec.add_dummy_prefix:
            proto.normalizer_spec.add_dummy_prefix = False
            self._bare = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
            self._unk = self.sp.id_to_piece(self.sp.unk_id())
            self._unk_pieces = len(self._bare.encode(self._unk))
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        if self.sp.eos_id() < 0:
            raise TokenizerError(f"{path} defines no eos piece")
        self.eos_id = self.sp.eos_id()
        own_pad = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        self.pad_id = resolve_pad(own_pad, pad, self.token_to_id, self.eos_id, str(path))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def normalize(self, text: str) -> str:
        return text

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_with_offsets(self, text: str, continuation: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        if continuation and self._bare is not None:
            return self._encode_continuation(text)
        return _with_char_offsets(self.sp, text)

    def _encode_continuation(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """As HF's non-legacy LlamaTokenizer: no dummy prefix; a leading space is encoded after an <unk> and the
        <unk> pieces dropped, so the space stays its own `▁` rather than merging differently."""
        if not text.startswith(" "):
            return _with_char_offsets(self._bare, text)
        ids, offsets = _with_char_offsets(self._bare, self._unk + text)
        shift, skip = len(self._unk), self._unk_pieces
        return ids[skip:], [(max(a - shift, 0), b - shift) for a, b in offsets[skip:]]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        token_id = self.sp.piece_to_id(token)
        return None if token_id == self.sp.unk_id() and token != self.sp.id_to_piece(token_id) else token_id

    def id_to_token(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def special_tokens(self) -> list[SpecialToken]:
        """The control pieces (`<s>`, `</s>`, Baichuan's reserved ones) and `<unk>`."""
        return [SpecialToken(self.sp.id_to_piece(i)) for i in range(self.vocab_size)
                if self.sp.is_control(i) or self.sp.is_unknown(i)]

    def template_variables(self) -> dict[str, object]:
        """The special-token strings a chat template may name (`bos_token`, `eos_token`, `unk_token`)."""
        names = {"bos_token": self.sp.bos_id(), "eos_token": self.sp.eos_id(), "unk_token": self.sp.unk_id(),
                 "pad_token": self.sp.pad_id()}
        return {name: self.sp.id_to_piece(i) for name, i in names.items() if i >= 0}


def _with_char_offsets(sp: sentencepiece.SentencePieceProcessor, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and [start, end) character spans (SentencePiece reports byte offsets)."""
    proto = sp.encode(text, out_type="proto")
    char_at = [0] * (len(text.encode("utf-8")) + 1)
    byte = 0
    for index, char in enumerate(text):
        width = len(char.encode("utf-8"))
        for k in range(width):
            char_at[byte + k] = index
        byte += width
    char_at[byte] = len(text)
    return [piece.id for piece in proto.pieces], [(char_at[p.begin], char_at[p.end]) for p in proto.pieces]


register_tokenizer_kind(TokenizerKind("sentencepiece", "tokenizer.model", SentencePieceTokenizer))
