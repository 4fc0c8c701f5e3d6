"""Typed errors that say what to do; the CLI prints them as one line and exits with code 2."""

import difflib
from collections.abc import Iterable


class AlignError(Exception):
    """Base of every error a user can fix: the message names the key or file and the fix."""


class UnknownNameError(AlignError):
    """A registry lookup with a name nobody registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str], hint: str = ""):
        known = sorted(known)
        close = difflib.get_close_matches(name.lower(), known, n=1)
        suggestion = f" Did you mean '{close[0]}'?" if close else ""
        super().__init__(f"unknown {kind} '{name}'.{suggestion} Known: {', '.join(known)}.{hint}")


class DuplicateNameError(AlignError):
    """A second registration under a name that is already taken."""


class ConversationError(AlignError):
    """A conversation record that cannot be rendered (the message names the message index)."""


class TemplateError(AlignError):
    """A template that does not fit a tokenizer, or a sample it cannot render."""


class TokenizerError(AlignError):
    """A tokenizer that cannot be loaded from the files given."""


class BackboneError(AlignError):
    """A backbone entry or model directory that cannot be used as asked."""
