"""Tokenizer kinds, keyed by exact name; each knows its file and how to load it natively (no remote code)."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from align.errors import TokenizerError
from align.named import Registry
from align.templates.text_tokenizer import TextTokenizer

PadRule = str | int | None  # the pad token (string or id) to use when the tokenizer defines none


@dataclass(frozen=True)
class TokenizerKind:
    """How one kind of tokenizer is found in a model directory and loaded."""

    name: str
    filename: str  # the file in a model directory that identifies this kind
    load: Callable[[Path, PadRule], TextTokenizer]


_KINDS: Registry[TokenizerKind] = Registry("tokenizer kind")


def register_tokenizer_kind(kind: TokenizerKind) -> TokenizerKind:
    """Add a tokenizer kind; a duplicate name is an error."""
    return _KINDS.register(kind.name, kind)


def tokenizer_kind(name: str) -> TokenizerKind:
    """The tokenizer kind registered under exactly `name`."""
    return _KINDS.get(name)


def tokenizer_kind_names() -> list[str]:
    """Every registered tokenizer kind, sorted."""
    return _KINDS.names()


def detect_tokenizer_kind(model_dir: Path) -> str:
    """The kind whose file a model directory holds (the first found, in registration order)."""
    for kind in _KINDS.values():
        if (model_dir / kind.filename).is_file():
            return kind.name
    wanted = ", ".join(f"{k.filename} ({k.name})" for k in _KINDS.values())
    raise TokenizerError(f"{model_dir} has no tokenizer file; expected one of: {wanted}")


def load_tokenizer(kind: str, path: Path | str, pad: PadRule = None) -> TextTokenizer:
    """Load a tokenizer of `kind` from a model directory or from the tokenizer file itself."""
    spec = tokenizer_kind(kind)
    path = Path(path)
    file = path / spec.filename if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"no {spec.filename} in {path}: a '{kind}' tokenizer needs that file")
    try:
        return spec.load(file, pad)
    except TokenizerError:
        raise
    except Exception as exc:  # a corrupt file: say which one, whatever the library raised
        raise TokenizerError(f"cannot load the {kind} tokenizer {file}: {exc}") from exc


def resolve_pad(
    tokenizer_pad: int | None, rule: PadRule, token_to_id: Callable[[str], int | None], eos_id: int, where: str
) -> int:
    """The tokenizer's own pad id, else the family rule's (a token string or an id), else eos.

    Padding is never attended to nor learnt, so any id works; eos is the safe default for an LLM with no rule.
    """
    if tokenizer_pad is not None:
        return tokenizer_pad
    if isinstance(rule, int):
        return rule
    if rule is None:
        return eos_id
    token_id = token_to_id(rule)
    if token_id is None:
        raise TokenizerError(f"{where} has no pad token and no {rule!r} token to pad with")
    return token_id
