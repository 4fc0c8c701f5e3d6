"""`align render`: show exactly what a backbone's LLM is trained on or asked, token by token."""

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from align.backbones.chat_templates import template_for
from align.backbones.registry import backbone_tokenizer, get_backbone
from align.backbones.spec import BackboneSpec
from align.errors import AlignError
from align.words import counted
from align.templates import IGNORE_INDEX, Rendered, conversation_from_record, render
from align.templates.render import DEFAULT_QUERY_TOKENS
from align.templates.text_tokenizer import TextTokenizer
from align.tools.manifest import read_manifest
from align.tools.training.training_data import training_conversation

SUPERVISED_STYLE, CONTROL_STYLE, IMAGE_STYLE = "bold green", "cyan", "magenta"


def read_record(path: Path) -> dict:
    """One conversation record from a JSON file (or the first line of a JSON Lines file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AlignError(f"cannot read conversation file {path}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        try:
            return json.loads(text.strip().splitlines()[0])
        except (json.JSONDecodeError, IndexError) as exc:
            raise AlignError(f"{path} is not a JSON conversation record: {exc}") from None


def query_count(explicit: int | None = None, encoder: Path | None = None, store: Path | None = None) -> int:
    """Image slots per image: as given, else the encoder's query count, else the feature store's rows', else
    BLIP-2's 32."""
    if explicit is not None:
        return explicit
    if encoder is not None:
        from align.backbones.vision import encoder_query_count

        return encoder_query_count(encoder)
    if store is not None:
        from align.tools.feature_store import FeatureStore

        return int(FeatureStore.read_meta(store)["row_shape"][1])
    return DEFAULT_QUERY_TOKENS


def render_file(
    name: str, conversation: Path, model: Path | None = None, max_length: int | None = None,
    query_tokens: int = DEFAULT_QUERY_TOKENS, template: str | None = None,
) -> tuple[BackboneSpec, TextTokenizer, Rendered]:
    """Render the record in `conversation` for backbone `name` (in `template`, default the backbone's)."""
    spec = get_backbone(name)
    tokenizer = backbone_tokenizer(spec, model)
    record = conversation_from_record(read_record(conversation))
    template = template_for(spec, tokenizer, name=template, model=model)
    rendered = render(template, record, tokenizer, system=spec.system, max_length=max_length,
                      num_query_tokens=query_tokens)
    return spec, tokenizer, rendered


def render_manifest(
    name: str, manifest: Path, model: Path | None = None, max_length: int | None = None,
    emit: Callable[[dict], None] | None = None, query_tokens: int = DEFAULT_QUERY_TOKENS, template: str | None = None,
) -> dict:
    """Render every record of a manifest as training would (in `template`, default the backbone's); `emit` gets
    `{"line", "input_ids", "labels", "images"}` or `{"line", "reject"}` per record. Returns the summary: counts,
    supervised tokens, lengths, rejects by reason."""
    spec = get_backbone(name)
    tokenizer = backbone_tokenizer(spec, model)
    template = template_for(spec, tokenizer, name=template, model=model)
    lengths: list[int] = []
    supervised = 0
    reasons: Counter[str] = Counter()

    def reject(line: int, reason: str) -> None:
        reasons[reason.split(":")[0]] += 1
        if emit:
            emit({"line": line, "reject": reason})

    class MalformedLines:  # read_manifest reports lines that are not JSON objects here
        def add(self, source: str, reason: str) -> None:
            reject(int(source.rsplit(":", 1)[1]), reason)

    for item in read_manifest(manifest, MalformedLines()):
        try:
            rendered = render(template, training_conversation(item.record), tokenizer, system=spec.system,
                              max_length=max_length, num_query_tokens=query_tokens)
        except AlignError as exc:
            reject(item.line, str(exc))
            continue
        lengths.append(len(rendered.input_ids))
        supervised += sum(label != IGNORE_INDEX for label in rendered.labels)
        if emit:
            emit({"line": item.line, "input_ids": rendered.input_ids, "labels": rendered.labels,
                  "images": [list(span) for span in rendered.images]})
    percentiles = {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)} if lengths else {}
    return {
        "records": len(lengths) + sum(reasons.values()),
        "samples": len(lengths),
        "supervised_tokens": supervised,
        "length": {**percentiles, "max": max(lengths, default=0)},
        "rejects": dict(reasons.most_common()),
    }


def _pieces(tokenizer: TextTokenizer, rendered: Rendered) -> list[tuple[str, str, int]]:
    """(kind, surface text, position) for every token; text tokens show the exact characters they cover."""
    kinds: dict[int, tuple[str, str]] = {}
    for start, end, text in rendered.runs:
        _, offsets = tokenizer.encode_with_offsets(text, continuation=start > 0)
        starts = [a for a, _ in offsets] + [len(text)]
        starts[0] = 0
        for k in range(end - start):
            kinds[start + k] = ("text", text[starts[k]:starts[k + 1]])
    for number, (start, length) in enumerate(rendered.images):
        for k in range(length):
            kinds[start + k] = ("image", f"image {rendered.image_indices[number]}")
    return [
        (*kinds.get(i, ("control", tokenizer.id_to_token(token_id))), i) for i, token_id in enumerate(rendered.input_ids)
    ]


def text_view(spec: BackboneSpec, tokenizer: TextTokenizer, rendered: Rendered, template: str | None = None) -> Text:
    """The rendered text with learnt tokens in ⟪ ⟫ (and green), controls in cyan, image slots collapsed; the
    footer names the `template` it was rendered in (default: the backbone's)."""
    out = Text()
    supervised_open = False
    previous_image = None
    for kind, surface, i in _pieces(tokenizer, rendered):
        learnt = rendered.labels[i] != IGNORE_INDEX
        if learnt != supervised_open:
            out.append("⟪" if learnt else "⟫", style=SUPERVISED_STYLE)
            supervised_open = learnt
        if kind == "image":
            if surface != previous_image:
                length = next(n for s, n in rendered.images if s <= i < s + n)
                out.append(f"[{surface}: {length} slots]", style=IMAGE_STYLE)
            previous_image = surface
            continue
        previous_image = None
        style = SUPERVISED_STYLE if learnt else (CONTROL_STYLE if kind == "control" else "")
        out.append(surface, style=style)
    if supervised_open:
        out.append("⟫", style=SUPERVISED_STYLE)
    learnt = sum(label != IGNORE_INDEX for label in rendered.labels)
    out.append(
        f"\n\n{spec.name} · template {template or spec.template} · {counted(len(rendered.input_ids), 'token')} · "
        f"{learnt} learnt (⟪ ⟫) · {counted(len(rendered.images), 'image')}",
        style="dim",
    )
    return out


def token_table(tokenizer: TextTokenizer, rendered: Rendered) -> Table:
    """One row per token (image slots folded into one row per image): position, id, kind, text, label."""
    table = Table("pos", "id", "kind", "text", "label")
    for kind, surface, i in _pieces(tokenizer, rendered):
        label = rendered.labels[i]
        if kind == "image":
            start, length = next((s, n) for s, n in rendered.images if s <= i < s + n)
            if i == start:
                table.add_row(f"{start}-{start + length - 1}", str(rendered.input_ids[i]), "image", surface, "-")
            continue
        shown = "-" if label == IGNORE_INDEX else str(label)
        table.add_row(str(i), str(rendered.input_ids[i]), kind, escape(repr(surface)), shown)
    return table
