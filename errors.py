"""Typed errors that say what to do; the CLI prints them as one line and exits with code 2."""

import difflib
from collections.abc import Iterable


class AlignError(Exception):
    """Base of every error a user can fix: the message names the key or file and the fix."""

    # True when every rank of a job raises this same error (a decision rank 0 took, a check of the recipe): only
    # rank 0 prints it, so a job says it once.
    shared = False


class SharedError(AlignError):
    """An error every rank of a job raises alike."""

    shared = True


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


class NotPrefixStableError(TemplateError):
    """A multi-turn training record whose earlier replies render differently once later turns follow (Qwen3's
    template, say): training rejects the record; the backbone itself is fine."""


class TokenizerError(AlignError):
    """A tokenizer that cannot be loaded from the files given."""


class BackboneError(AlignError):
    """A backbone entry or model directory that cannot be used as asked."""
