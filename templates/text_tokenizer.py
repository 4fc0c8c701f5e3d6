"""The tokenizer interface templates need; the implementations live in `align.backbones.tokenizers`."""

from typing import Protocol


class TextTokenizer(Protocol):
    """Encodes ordinary text (control-token strings stay plain text) and names its special ids."""

    bos_id: int | None
    eos_id: int
    pad_id: int

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (control tokens included)."""

    def normalize(self, text: str) -> str:
        """The text as the tokenizer sees it before splitting (e.g. Qwen's NFC)."""

    def encode(self, text: str) -> list[int]:
        """Ids of ordinary text; `<|im_end|>` or `</s>` in it never become control ids."""

    def encode_with_offsets(self, text: str, continuation: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ordinary text and, for each, the [start, end) character span it covers.

        `continuation`: the text follows earlier tokens (a control token, say) rather than starting the sequence,
        which changes the leading-space handling of some tokenizers, as their own whole-string encoding does.
        """

    def decode(self, ids: list[int]) -> str:
        """Text of ids."""

    def token_to_id(self, token: str) -> int | None:
        """The single id of a token string (e.g. `<|im_end|>`), or None when it is not one token."""

    def id_to_token(self, token_id: int) -> str:
        """The token string of an id."""

    def special_tokens(self) -> list:
        """The special tokens (`SpecialToken`s) a model's own chat template may write as control tokens."""

    def template_variables(self) -> dict[str, object]:
        """What transformers passes to chat templates besides the messages (`bos_token`, `eos_token`, …)."""
