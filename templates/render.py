"""Turn a conversation into input ids, labels and image slots with a template and a tokenizer."""

from bisect import bisect_right
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
    truncated: bool = False  # the last reply was cut to fit the maximum length

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


TRUNCATE_MODES = ("reply", "turns")


def render(
    template: Template,
    conversation: Conversation,
    tokenizer: TextTokenizer,
    *,
    system: str | None = None,
    num_query_tokens: int = DEFAULT_QUERY_TOKENS,
    max_length: int | None = None,
    truncate: str = "turns",
) -> Rendered:
    """Render a conversation; nothing supervised is an error.

    Too long drops whole exchanges from the end while more than one remains; if the first exchange alone is too
    long, `truncate="reply"` cuts its reply's text to fit (keeping the reply's end, never an image: MiniGPT-4 cuts
    captions to `max_txt_len`), `"turns"` refuses the sample.
    `system` is the backbone's default (ignored by templates without a system role); the conversation's own system
    text wins, then the template's default.
    """
    if truncate not in TRUNCATE_MODES:
        raise ValueError(f"truncate must be one of {TRUNCATE_MODES}, not {truncate!r}")
    if conversation.system is not None:
        system = conversation.system
    elif system is None or not template.supports_system:
        # A backbone's default system text is for its chat template, not for a system-less one such as caption.
        system = template.default_system
    template.check_system(system)
    controls = resolve_controls(template, tokenizer)

    def assemble(kept: Conversation) -> Rendered:
        return _assemble(template.segments(kept, system), tokenizer, controls, num_query_tokens)

    rendered = assemble(conversation)
    kept = len(conversation.messages)
    while max_length is not None and len(rendered.input_ids) > max_length:
        if conversation.ends_with_user:
            raise TemplateError(f"the prompt is {len(rendered.input_ids)} tokens, over the maximum length {max_length}")
        if kept <= 2:
            if truncate == "reply":
                rendered = _cut_last_reply(conversation.truncated(kept), assemble, max_length, tokenizer)
                break
            raise TemplateError(
                f"the first exchange alone is {len(rendered.input_ids)} tokens, over the maximum length {max_length}"
            )
        kept -= 2  # one whole exchange: the last reply and the user turn before it
        rendered = assemble(conversation.truncated(kept))
    if not conversation.ends_with_user and all(label == IGNORE_INDEX for label in rendered.labels):
        raise TemplateError("the sample has no supervised token (nothing to learn)")
    return rendered


def _cut_last_reply(conversation: Conversation, assemble, max_length: int, tokenizer: TextTokenizer) -> Rendered:
    """The rendering with the last reply's text cut to fit, its end marker kept.

    The cut falls at a token boundary of the reply's own tokenization, `overflow` tokens from its end, and is
    re-rendered, so the ids are exactly what the tokenizer makes of the shorter text (a boundary that tokenizes
    differently in place moves the cut by the difference and renders again)."""
    text = conversation.messages[-1].text
    ends = [end for _, end in tokenizer.encode_with_offsets(tokenizer.normalize(text), continuation=True)[1]]
    length = len(assemble(conversation).input_ids)
    keep = len(ends)
    while True:
        keep -= max(1, length - max_length)
        if keep < 1:
            shortest = assemble(conversation.with_last_reply(text[:ends[0]] if ends else text))
            raise TemplateError(f"the prompt and the reply's end alone are {len(shortest.input_ids)} tokens, over "
                                f"the maximum length {max_length}")
        rendered = assemble(conversation.with_last_reply(text[:ends[keep - 1]].rstrip() or text[:ends[keep - 1]]))
        length = len(rendered.input_ids)
        if length <= max_length:
            rendered.truncated = True
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
        out.input_ids.extend(ids)
        if not supervised_spans:
            out.labels.extend([IGNORE_INDEX] * len(ids))
        else:
            # A token is learnt when any character it covers belongs to supervised text: the first span ending
            # after the token's start must begin before its end (spans are in order and disjoint).
            begins, ends = [b for b, _ in supervised_spans], [e for _, e in supervised_spans]
            for token_id, (a, b) in zip(ids, offsets):
                k = bisect_right(ends, a)
                supervised = k < len(ends) and begins[k] < max(b, a + 1)
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
