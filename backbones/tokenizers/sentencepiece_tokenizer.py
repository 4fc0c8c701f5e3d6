"""SentencePiece `tokenizer.model` files (LLaMA, Vicuna, Baichuan), read with the sentencepiece library."""

import re
from pathlib import Path

import sentencepiece
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from align.backbones.tokenizers.registry import PadRule, TokenizerKind, register_tokenizer_kind, resolve_pad
from align.errors import TokenizerError


# Reserved pieces (Baichuan's `<reserved_106>` = user, `<reserved_107>` = assistant) are stored as USER_DEFINED, which
# SentencePiece matches in text; as CONTROL they keep their ids for templates but are never produced from text.
RESERVED_PIECE = re.compile(r"<reserved_\d+>")


def _without_reserved_matching(path: Path) -> bytes:
    """The model file with every reserved user-defined piece turned into a control piece; nothing else changes."""
    proto = model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    for piece in proto.pieces:
        if piece.type == model_pb2.ModelProto.SentencePiece.USER_DEFINED and RESERVED_PIECE.fullmatch(piece.piece):
            piece.type = model_pb2.ModelProto.SentencePiece.CONTROL
    return proto.SerializeToString()


class SentencePieceTokenizer:
    """A SentencePiece model; control pieces such as `</s>` or Baichuan's reserved ones are never produced from text."""

    def __init__(self, path: Path, pad: PadRule = None):
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=_without_reserved_matching(path))
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

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        proto = self.sp.encode(text, out_type="proto")
        # SentencePiece reports byte offsets; spans are in characters.
        char_at = [0] * (len(text.encode("utf-8")) + 1)
        byte = 0
        for index, char in enumerate(text):
            width = len(char.encode("utf-8"))
            for k in range(width):
                char_at[byte + k] = index
            byte += width
        char_at[byte] = len(text)
        ids = [piece.id for piece in proto.pieces]
        return ids, [(char_at[p.begin], char_at[p.end]) for p in proto.pieces]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        token_id = self.sp.piece_to_id(token)
        return None if token_id == self.sp.unk_id() and token != self.sp.id_to_piece(token_id) else token_id

    def id_to_token(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)


register_tokenizer_kind(TokenizerKind("sentencepiece", "tokenizer.model", SentencePieceTokenizer))
