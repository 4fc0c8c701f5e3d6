"""`align data convert`: public data set layouts → align manifests (JSON Lines, UTF-8, Chinese kept as is)."""

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jsonlines

from align.errors import AlignError, UnknownNameError
from align.files import read_json_object
from align.tools.rejects import RejectLog, rejects_path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
MINIGPT4_PLACEHOLDER = "<Img><ImageHere></Img>"

# A converter yields (where, record) for good entries and (where, reason-string) for bad ones.
Converted = Iterator[tuple[str, dict | str]]


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AlignError(f"cannot read {path}: {exc}") from None


def _image(path: Path, image_root: Path | None) -> str:
    """The image as found (absolute); `convert` makes it relative to the manifest's folder where that resolves."""
    return str(path.resolve())


def _reference(image: str, manifest_dir: Path, relative: bool) -> str:
    """What the manifest says: relative to its own folder (as extraction resolves it) when asked and possible."""
    path = Path(image)
    return str(path.relative_to(manifest_dir)) if relative and path.is_relative_to(manifest_dir) else image


def cc_sbu_align(src: Path, image_root: Path | None) -> Converted:
    """MiniGPT-4's stage-2 set: `filter_cap.json` {annotations: [{image_id, caption}]} + `image/<image_id>.jpg`."""
    annotations = _load_json(src / "filter_cap.json").get("annotations", [])
    for i, entry in enumerate(annotations):
        where = f"{src / 'filter_cap.json'}#{i}"
        if not isinstance(entry, dict) or not entry.get("caption") or "image_id" not in entry:
            yield where, "entry without image_id or caption"
            continue
        yield where, {"image": _image(src / "image" / f"{entry['image_id']}.jpg", image_root), "caption": entry["caption"]}


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def minigpt4qwen(src: Path, image_root: Path | None) -> Converted:
    """MiniGPT4Qwen's instruction JSON: [{image, instruction, output}] (strings or aligned lists; image placeholder
    `<Img><ImageHere></Img>`), images relative to the JSON's folder."""
    for i, entry in enumerate(_load_json(src)):
        where = f"{src}#{i}"
        if not isinstance(entry, dict):
            yield where, "entry is not an object"
            continue
        asks, answers = _as_list(entry.get("instruction")), _as_list(entry.get("output"))
        if len(asks) != len(answers) or not all(isinstance(t, str) and t.strip() for t in asks + answers):
            yield where, "instruction and output must be non-empty strings or lists of the same length"
            continue
        turns = []
        for ask, answer in zip(asks, answers):
            turns += [{"from": "human", "value": ask.replace(MINIGPT4_PLACEHOLDER, "<image>")},
                      {"from": "gpt", "value": answer}]
        record = {"conversations": turns}
        if entry.get("image"):
            record = {"image": _image(src.parent / entry["image"], image_root), **record}
        yield where, record


def llava(src: Path, image_root: Path | None) -> Converted:
    """LLaVA conversation JSON: [{id, image, conversations: [{from, value}]}], images relative to --image-root."""
    base = image_root or src.parent
    for i, entry in enumerate(_load_json(src)):
        where = f"{src}#{i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
            yield where, "entry without a conversations list"
            continue
        record = {"conversations": entry["conversations"]}
        if entry.get("image"):
            record = {"image": _image(base / entry["image"], image_root), **record}
        if entry.get("system"):
            record["system"] = entry["system"]
        yield where, record


def caption_folder(src: Path, image_root: Path | None) -> Converted:
    """img2dataset-style folders: `x.jpg` beside `x.txt` (the caption) or `x.json` (with a `caption` key)."""
    for image in sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        text, meta = image.with_suffix(".txt"), image.with_suffix(".json")
        caption = None
        if text.is_file():
            caption = text.read_text(encoding="utf-8", errors="replace").strip()
        elif meta.is_file():
            try:
                caption = read_json_object(meta).get("caption")
            except AlignError:
                caption = None
        if not isinstance(caption, str) or not caption.strip():
            yield str(image), "no caption (.txt or .json with 'caption') beside the image"
            continue
        yield str(image), {"image": _image(image, image_root), "caption": caption.strip()}


CONVERTERS: dict[str, Callable[[Path, Path | None], Converted]] = {
    "cc_sbu_align": cc_sbu_align,
    "minigpt4qwen": minigpt4qwen,
    "llava": llava,
    "caption_folder": caption_folder,
}


@dataclass(frozen=True)
class ConvertSummary:
    """Records written and entries rejected."""

    written: int
    rejected: int
    out: str
    rejects: str


def convert(fmt: str, src: Path, out: Path, image_root: Path | None = None) -> ConvertSummary:
    """Convert `src` in format `fmt` into the manifest `out`; bad entries go to `<out>.rejects.jsonl`."""
    if fmt not in CONVERTERS:
        raise UnknownNameError("data format", fmt, CONVERTERS)
    if not src.exists():
        raise AlignError(f"{src} does not exist")
    out.parent.mkdir(parents=True, exist_ok=True)
    rejects = RejectLog(rejects_path(out))
    written = 0
    with jsonlines.open(out, "w", dumps=lambda o: json.dumps(o, ensure_ascii=False)) as writer:
        for where, result in CONVERTERS[fmt](src, image_root):
            if isinstance(result, str):
                rejects.add(where, result)
            else:
                if isinstance(result.get("image"), str):
                    result["image"] = _reference(result["image"], out.parent.resolve(), image_root is not None)
                writer.write(result)
                written += 1
    rejects.close()
    return ConvertSummary(written, rejects.total, str(out), str(rejects.path))
