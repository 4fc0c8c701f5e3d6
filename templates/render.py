"""Turn a conversation into input ids, labels and image slots with a template and a tokenizer."""

from collections.abc import Mapping
from dataclasses import dataclass, field

from align.errors import TemplateError
from align.templates.conversation import Conversation
from align.templates.segments import Break, Control, Image, Segment, Text
from align.templates.template import Template
from align.templates.text_tokenizer import TextTokenizer

IGNORE_INDEX = -100
IMAGE_TEXT = "<ImageHere>"
DEFAULT_QUERY_TOKENS = 32


@dataclass
class Rendered:
    """What the model sees: ids, labels (IGNORE_INDEX except supervised tokens) and image slots."""

    input_ids: list[int]
    labels: list[int]
    images: list[tuple[int, int]]  # (start, length) of each image's slots
    image_indices: list[int]  # which of the conversation's images fills each slot range
    text: str  # slots as <ImageHere>, control tokens as their token string
    runs: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end, text) of each text run

    def as_json(self) -> dict:
        """The `align render --json` contract."""
        return {
            "text": self.text,
            "input_ids": self.input_ids,
            "labels": self.labels,
            "images": [list(span) for span in self.images],
        }


def resolve_controls(template: Template, tokenizer: TextTokenizer) -> dict[str, int]:
    """Ids of every control the template may write; a token string that is not one id is an error."""
    ids: dict[str, int] = {"eos": tokenizer.eos_id}
    if tokenizer.bos_id is not None:
        ids["bos"] = tokenizer.bos_id
    for name, token in template.controls.items():
        token_id = token if isinstance(token, int) else tokenizer.token_to_id(token)
        if token_id is None:
            raise TemplateError(f"template '{template.name}' needs {token!r} as a single token; the tokenizer has none")
        if not 0 <= token_id < tokenizer.vocab_size:
            raise TemplateError(f"template '{template.name}' needs id {token_id} ({name}); the tokenizer has {tokenizer.vocab_size} ids")
        ids[name] = token_id
    for name, token in template.optional_controls.items():
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            ids[name] = token_id
    return ids


def stop_ids(template: Template, tokenizer: TextTokenizer) -> list[int]:
    """Ids that end generation for this template and tokenizer."""
    ids = resolve_controls(template, tokenizer)
    return sorted({ids[name] for name in template.stop_controls if name in ids})


def render(
    template: Template,
    conversation: Conversation,
    tokenizer: TextTokenizer,
    *,
    system: str | None = None,
    num_query_tokens: int = DEFAULT_QUERY_TOKENS,
    max_length: int | None = None,
) -> Rendered:
    """Render a conversation; too long drops whole turns from the end; nothing supervised is an error.

    `system` is the backbone's default (ignored by templates without a system role); the conversation's own system
    text wins, then the template's default.
    """
    if conversation.system is not None:
        system = conversation.system
    elif system is None or not template.supports_system:
        # A backbone's default system text is for its chat template, not for a system-less one such as caption.
        system = template.default_system
    template.check_system(system)
    controls = resolve_controls(template, tokenizer)

    rendered = _assemble(template.segments(conversation, system), tokenizer, controls, num_query_tokens)
    kept = len(conversation.messages)
    while max_length is not None and len(rendered.input_ids) > max_length:
        if conversation.ends_with_user:
            raise TemplateError(f"the prompt is {len(rendered.input_ids)} tokens, over the maximum length {max_length}")
        kept -= 2  # one whole exchange: the last reply and the user turn before it
        if kept <= 0:
            raise TemplateError(
                f"the first exchange alone is {len(rendered.input_ids)} tokens, over the maximum length {max_length}"
            )
        rendered = _assemble(template.segments(conversation.truncated(kept), system), tokenizer, controls, num_query_tokens)
    if not conversation.ends_with_user and all(label == IGNORE_INDEX for label in rendered.labels):
        raise TemplateError("the sample has no supervised token (nothing to learn)")
    return rendered


def _assemble(
    segments: list[Segment], tokenizer: TextTokenizer, controls: Mapping[str, int], num_query_tokens: int
) -> Rendered:
    out = Rendered(input_ids=[], labels=[], images=[], image_indices=[], text="")
    texts: list[str] = []
    run: list[Text] = []
    # Whether text came before: a leading Control("bos") is the tokenizer's own bos, added outside the text (as
    # `tokenizer(prompt)` adds it), so the text after it still starts the text; a special token the template
    # writes as text (hf-chat's "<s>") does not.
    started = False

    def flush() -> None:
        nonlocal started
        if not run:
            return
        pieces = [tokenizer.normalize(t.text) for t in run]
        joined = "".join(pieces)
        supervised_spans, pos = [], 0
        for segment, piece in zip(run, pieces):
            if segment.supervised:
                supervised_spans.append((pos, pos + len(piece)))
            pos += len(piece)
        ids, offsets = tokenizer.encode_with_offsets(joined, continuation=started)
        start = len(out.input_ids)
        for token_id, (a, b) in zip(ids, offsets):
            # A token is learnt when any character it covers belongs to supervised text.
            supervised = any(a < end and max(b, a + 1) > begin for begin, end in supervised_spans)
            out.input_ids.append(token_id)
            out.labels.append(token_id if supervised else IGNORE_INDEX)
        out.runs.append((start, len(out.input_ids), joined))
        texts.append("".join(t.text for t in run))
        run.clear()
        started = True

    for segment in segments:
        if isinstance(segment, Text):
            run.append(segment)
            continue
        flush()
        if isinstance(segment, Control):
            if segment.name not in controls:
                if segment.optional:
                    continue
                raise TemplateError(f"the tokenizer has no '{segment.name}' token")
            token_id = controls[segment.name]
            started = started or segment.name != "bos" or bool(out.input_ids)
            if segment.label is not None:
                label = controls[segment.label]
            else:
                label = token_id if segment.supervised else IGNORE_INDEX
            out.input_ids.append(token_id)
            out.labels.append(label)
            texts.append(tokenizer.id_to_token(token_id))
        elif isinstance(segment, Image):
            started = True
            out.images.append((len(out.input_ids), num_query_tokens))
            out.image_indices.append(segment.index)
            out.input_ids.extend([tokenizer.pad_id] * num_query_tokens)
            out.labels.extend([IGNORE_INDEX] * num_query_tokens)
            texts.append(IMAGE_TEXT)
        elif not isinstance(segment, Break):
            raise TypeError(f"not a segment: {segment!r}")
    flush()
    out.text = "".join(texts)
    return out
