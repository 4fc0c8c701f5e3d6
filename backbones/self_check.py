"""The checks a backbone must pass before it is accepted: what the LLM will be trained on is what we meant."""

from dataclasses import dataclass

from pathlib import Path

from align.backbones.chat_templates import template_for
from align.backbones.spec import BackboneSpec
from align.errors import AlignError, NotPrefixStableError
from align.words import counted
from align.templates import (
    HF_CHAT,
    IGNORE_INDEX,
    Rendered,
    Template,
    conversation_from_record,
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
        raise AlignError(f"{counted(len(spans), 'supervised stretch')} for {counted(len(replies), 'assistant reply')}")
    for (start, end), reply in zip(spans, replies):
        labels = rendered.labels[start:end]
        if template.reply_end_control and labels[-1] != controls[template.reply_end_control]:
            raise AlignError(f"the reply {reply!r} does not end with a learnt {template.reply_end_control}")
        learnt = tokenizer.decode([t for t in labels if t not in control_ids])
        if _words(learnt) != _words(reply + template.reply_end_text):
            raise AlignError(f"learnt text {learnt!r} is not the reply {reply!r}")
    return f"{counted(len(spans), 'reply')}, {counted(sum(e - s for s, e in spans), 'supervised token')}"


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


# Text-only conversations (the model's own template knows nothing of image slots) for the comparison with
# transformers' apply_chat_template: what chat renders (a prompt, one with a system prompt, the second turn's prompt)
# and what training renders (a reply, two turns).
REFERENCE_TURNS = [
    [("user", "What is in this image?")],
    [("user", "What is in this image?"), ("assistant", "A cat sitting on a sofa.")],
    [("system", "You describe pictures."), ("user", "What is in this image?")],
    [("user", "What is in this image?"), ("assistant", "A cat."), ("user", "What color is it?")],
    [("user", "What is in this image?"), ("assistant", "A cat."), ("user", "What color is it?"),
     ("assistant", "Orange.")],
]


def check_against_apply_chat_template(template: Template, tokenizer: TextTokenizer, model: Path) -> str:
    """The model's own template, rendered by align, gives the ids `tokenizer.apply_chat_template` gives."""
    from transformers import PreTrainedTokenizerFast

    reference = PreTrainedTokenizerFast.from_pretrained(str(model))
    compared, rejected = 0, 0
    for turns in REFERENCE_TURNS:
        messages = [{"role": role, "content": text} for role, text in turns]
        record = {"conversations": [m for m in messages if m["role"] != "system"]}
        record |= {"system": messages[0]["content"]} if messages[0]["role"] == "system" else {}
        try:
            ours = render(template, conversation_from_record(record), tokenizer).input_ids
        except NotPrefixStableError:
            rejected += 1  # training rejects such a record; chat renders each prompt afresh (compared above)
            continue
        except AlignError as exc:
            if "refuses this conversation" in str(exc):
                continue  # e.g. no system role: the template says so itself
            raise
        prompt = turns[-1][0] == "user"
        theirs = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt,
                                               return_dict=True)["input_ids"]
        if ours != list(theirs):
            raise AlignError(f"for {[r for r, _ in turns]} align renders {len(ours)} ids that differ from "
                             f"apply_chat_template's {len(theirs)}")
        compared += 1
    if not compared:
        raise AlignError("the chat template refused every sample conversation")
    note = (f"; {counted(rejected, 'multi-turn training record')} not prefix-stable: rejected in training"
            if rejected else "")
    return f"{counted(compared, 'conversation')}, id for id{note}"


def self_check(spec: BackboneSpec, tokenizer: TextTokenizer) -> list[Check]:
    """Run every check; each failure is reported, none raised."""
    results: list[Check] = [Check("tokenizer loads", True, f"{spec.tokenizer}, {tokenizer.vocab_size} ids")]
    try:
        template = template_for(spec, tokenizer)
    except AlignError as exc:
        return results + [Check("chat template loads", False, str(exc))]

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
        try:
            return render(template, conversation, tokenizer, system=spec.system)
        except NotPrefixStableError:
            # Training rejects such multi-turn records; it trains on single exchanges, checked here instead.
            return render(template, conversation.truncated(2), tokenizer, system=spec.system)

    records = [template.sample_record()] + ([CHINESE_RECORD] if "zh" in spec.languages else [])
    for record in records:
        conversation = conversation_from_record(record)
        replies = [m.text for m in conversation.messages if m.role == "assistant"]
        rendered = run(
            "sample conversation renders", render_sample, conversation,
            describe=lambda r: f"{counted(len(r.input_ids), 'token')}, {counted(len(r.images), 'image')}" + (
                "" if len(_label_spans(r.labels)) == len(replies) else
                "; multi-turn records are not prefix-stable: training rejects them, single exchanges train"),
        )
        if rendered is None:
            continue
        replies = replies[:len(_label_spans(rendered.labels))]
        run("labels cover exactly the replies and their end tokens", check_labels, template, tokenizer, rendered, replies)
        run("decoded text round-trips", check_round_trip, tokenizer, rendered)
    if spec.template == HF_CHAT and spec.tokenizer == "hf" and spec.model_path:
        run("equals the model's own apply_chat_template", check_against_apply_chat_template, template, tokenizer,
            Path(spec.model_path))
    run("embedding matrix covers every id", check_vocab, spec, template, tokenizer)
    return results
