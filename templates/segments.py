"""What a template emits: text, control tokens, image slots and run breaks, in order.

Consecutive `Text` segments are tokenized together as one run (so labels are assigned by character span);
a `Control`, an `Image` or a `Break` ends the run. Templates choose where runs break to match their reference
implementation token for token.
"""

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class Text:
    """Plain text; user and data text can never become a control token."""

    text: str
    supervised: bool = False
    message: int | None = None


@dataclass(frozen=True)
class Control:
    """A control token named by the template (`bos`, `eos`, or a key of the template's `controls`).

    `label` names a different control whose id is the training label at this position (Baichuan2 teaches eos at
    the next user token); otherwise the label is the token itself when supervised, else ignored.
    `optional` controls are skipped when the tokenizer has no such token (e.g. bos for Qwen).
    """

    name: str
    supervised: bool = False
    label: str | None = None
    optional: bool = False
    message: int | None = None


@dataclass(frozen=True)
class Image:
    """The slots of one image: one placeholder id per Q-Former query, overwritten by projected features."""

    index: int
    message: int | None = None


@dataclass(frozen=True)
class Break:
    """Ends the current text run without emitting anything."""


Segment = Union[Text, Control, Image, Break]
