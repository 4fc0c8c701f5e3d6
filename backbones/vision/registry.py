"""Encoder kinds, keyed by the exact `kind` an exported encoder's config names; each knows its release layouts."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from align.constants import ENCODER_CONFIG
from align.errors import AlignError
from align.named import Registry
from align.files import read_json_object, recover_dir


class EncoderError(AlignError):
    """An encoder directory that cannot be loaded as asked."""


@dataclass(frozen=True)
class EncoderKind:
    """One kind of frozen image encoder and how its directories load."""

    name: str
    load_export: Callable  # (directory, its encoder_config.json) → Encoder: align's own export of this kind
    detect: Callable  # directory → a loader for the kind's release layout found there, or None
    layouts: str  # the release layouts, for the error that lists what a directory may hold
    query_count: Callable  # (directory, its encoder_config.json or None) → image slots per image, from configs alone


_KINDS: Registry[EncoderKind] = Registry("encoder kind")


def register_encoder_kind(kind: EncoderKind) -> EncoderKind:
    """Add an encoder kind; a duplicate name is an error."""
    return _KINDS.register(kind.name, kind)


def _kind_of(path: Path) -> tuple[EncoderKind, dict | None]:
    """The kind that reads `path`, and its encoder_config.json when it is align's export."""
    if not path.is_dir():
        raise EncoderError(f"encoder directory {path} does not exist")
    if (path / ENCODER_CONFIG).is_file():
        meta = read_json_object(path / ENCODER_CONFIG, EncoderError)
        return _KINDS.get(meta.get("kind", "blip2")), meta  # exports made before kinds existed are BLIP-2
    for kind in _KINDS.values():
        if kind.detect(path) is not None:
            return kind, None
    layouts = "; ".join(f"{kind.layouts} ({kind.name})" for kind in _KINDS.values())
    raise EncoderError(f"{path} is not an encoder: expected {ENCODER_CONFIG} (align export), or {layouts}")


def encoder_query_count(path: Path | str) -> int:
    """How many image slots the encoder in `path` fills per image, read from its configs (no weights loaded)."""
    path = Path(path).expanduser()
    kind, meta = _kind_of(path)
    return kind.query_count(path, meta)


def load_encoder(path: Path | str):
    """The frozen encoder in `path`: align's export (by its `kind`), else a release layout some kind recognises."""
    path = Path(path).expanduser()
    recover_dir(path)  # an export over it that a kill interrupted: the previous version is whole again
    kind, meta = _kind_of(path)
    return kind.load_export(path, meta) if meta is not None else kind.detect(path)(path)
