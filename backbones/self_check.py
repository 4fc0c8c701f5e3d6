"""The checks a backbone must pass before it is accepted: what the LLM will be trained on is what we meant."""

from dataclasses import dataclass

from align.backbones.spec import BackboneSpec
from align.errors import AlignError
from align.templates import (
    IGNORE_INDEX,
    Rendered,
    Template,
    conversation_from_record,
    get_template,
    render,
    resolve_controls,
)
from align.templates.text_tokenizer import TextTokenizer

CHINESE_RECORD = {
    "image": "sample.jpg",
    "conversations": [
        {"from": "human", "value": "<image>\n这张图片里有什么？"},
        {"from": "gpt", "value": "一只猫坐在沙发上。"},
    ],
}


@dataclass(frozen=True)
class Check:
    """One self-check: its name, whether it passed, and what it found."""

    name: str
    ok: bool
    detail: str


def _words(text: str) -> str:
    return " ".join(text.split())


def _label_spans(labels: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def check_controls(template: Template, tokenizer: TextTokenizer) -> str:
    """Every control the template writes is one id, and its string in user text never becomes that id."""
    controls = resolve_controls(template, tokenizer)
    for name, token_id in controls.items():
        token = tokenizer.id_to_token(token_id)
        if token_id in tokenizer.encode(f"x {token} y"):
            raise AlignError(f"the text {token!r} encodes to the control id {token_id} ({name}): injection possible")
    return ", ".join(f"{name}={token_id}" for name, token_id in sorted(controls.items()))


def check_labels(template: Template, tokenizer: TextTokenizer, rendered: Rendered, replies: list[str]) -> str:
    """Supervised tokens are exactly each reply plus the token(s) that end it."""
    controls = resolve_controls(template, tokenizer)
    control_ids = set(controls.values())
    spans = _label_spans(rendered.labels)
    if len(spans) != len(replies):
        raise AlignError(f"{len(spans)} supervised stretch(es) for {len(replies)} assistant repl(ies)")
    for (start, end), reply in zip(spans, replies):
        labels = rendered.labels[start:end]
        if template.reply_end_control and labels[-1] != controls[template.reply_end_control]:
            raise AlignError(f"the reply {reply!r} does not end with a learnt {template.reply_end_control}")
        learnt = tokenizer.decode([t for t in labels if t not in control_ids])
        if _words(learnt) != _words(reply + template.reply_end_text):
            raise AlignError(f"learnt text {learnt!r} is not the reply {reply!r}")
    return f"{len(spans)} repl(ies), {sum(e - s for s, e in spans)} supervised tokens"


def check_round_trip(tokenizer: TextTokenizer, rendered: Rendered) -> str:
    """Decoding each text run gives back its text (no unknown or lossy pieces)."""
    for start, end, text in rendered.runs:
        decoded = tokenizer.decode(rendered.input_ids[start:end])
        if _words(decoded) != _words(text):
            raise AlignError(f"{text!r} decodes back as {decoded!r}")
    return f"{len(rendered.runs)} text runs"


def check_vocab(spec: BackboneSpec, template: Template, tokenizer: TextTokenizer) -> str:
    """The LLM's embedding matrix has a row for every id the tokenizer and template can emit."""
    highest = max([tokenizer.vocab_size - 1, tokenizer.pad_id, *resolve_controls(template, tokenizer).values()])
    if highest >= spec.vocab_size:
        raise AlignError(f"id {highest} can be emitted but the embedding matrix has {spec.vocab_size} rows")
    return f"highest id {highest} < {spec.vocab_size} embedding rows"


def self_check(spec: BackboneSpec, tokenizer: TextTokenizer) -> list[Check]:
    """Run every check; each failure is reported, none raised."""
    template = get_template(spec.template)
    results: list[Check] = [Check("tokenizer loads", True, f"{spec.tokenizer}, {tokenizer.vocab_size} ids")]

    def run(name, fn, *args, describe=str):
        try:
            value = fn(*args)
        except AlignError as exc:
            results.append(Check(name, False, str(exc)))
            return None
        results.append(Check(name, True, describe(value)))
        return value

    if run("control tokens are single ids", check_controls, template, tokenizer) is None:
        return results  # every later check writes those controls
    def render_sample(conversation):
        render(template, conversation.truncated(1), tokenizer, system=spec.system)  # the generation prompt too
        return render(template, conversation, tokenizer, system=spec.system)

    records = [template.sample_record()] + ([CHINESE_RECORD] if "zh" in spec.languages else [])
    for record in records:
        conversation = conversation_from_record(record)
        replies = [m.text for m in conversation.messages if m.role == "assistant"]
        rendered = run(
            "sample conversation renders", render_sample, conversation,
            describe=lambda r: f"{len(r.input_ids)} tokens, {len(r.images)} image(s)",
        )
        if rendered is None:
            continue
        run("labels cover exactly the replies and their end tokens", check_labels, template, tokenizer, rendered, replies)
        run("decoded text round-trips", check_round_trip, tokenizer, rendered)
    run("embedding matrix covers every id", check_vocab, spec, template, tokenizer)
    return results
