"""`align data convert`: public data set layouts → align manifests (JSON Lines, UTF-8, Chinese kept as is)."""

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jsonlines

from align.errors import AlignError
from align.named import Registry
from align.words import counted
from align.files import read_json_object, writing
from align.tools.images import IMAGE_SUFFIXES
from align.tools.rejects import RejectLog, rejects_path

MINIGPT4_PLACEHOLDER = "<Img><ImageHere></Img>"

# A converter yields (where, record) for good entries and (where, reason-string) for bad ones.
Converted = Iterator[tuple[str, dict | str]]


def _load_json(path: Path, shape: type = list):
    """The JSON document in `path`, which must be a `shape` (list or dict): one-line errors for anything else."""
    if path.is_dir():
        raise AlignError(f"{path} is a directory, not a JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AlignError(f"cannot read {path}: {exc}") from None
    except RecursionError:
        raise AlignError(f"cannot read {path}: JSON nested too deeply") from None
    if not isinstance(data, shape):
        raise AlignError(f"{path} holds a JSON {type(data).__name__}, not the {shape.__name__} this format has")
    return data


def _with_image(record: dict, entry: dict, base: Path, image_root: Path | None) -> dict | str:
    """`record` with the entry's image (relative to `base`) first, when it has one; a reason when its image field is
    not a path string."""
    image = entry.get("image")
    if image is None or image == "":
        return record
    if not isinstance(image, str):
        return "'image' is not a path string"
    return {"image": _image(base / image, image_root), **record}


def _image(path: Path, image_root: Path | None) -> str:
    """The image as found (absolute, symbolic links kept); `convert` writes it relative to where it is looked up."""
    return os.path.abspath(path)


def _reference(image: str, manifest_dir: Path, image_root: Path | None) -> str | None:
    """What the manifest says, so that it stays valid when moved together with its images: the path relative to
    `image_root` (what `features extract --image-root` and a data source's `image_root` resolve against), else
    relative to the manifest's own folder. None when the image lies outside `image_root`."""
    base = os.path.abspath(image_root or manifest_dir)
    relative = os.path.relpath(image, base)
    if image_root is not None and relative.split(os.sep)[0] == os.pardir:
        return None
    return relative


def cc_sbu_align(src: Path, image_root: Path | None) -> Converted:
    """MiniGPT-4's stage-2 set: `filter_cap.json` {annotations: [{image_id, caption}]} + `image/<image_id>.jpg`."""
    annotations = _load_json(src / "filter_cap.json", dict).get("annotations", [])
    if not isinstance(annotations, list):
        raise AlignError(f"{src / 'filter_cap.json'}: 'annotations' is not a list")
    for i, entry in enumerate(annotations):
        where = f"{src / 'filter_cap.json'}#{i}"
        if (not isinstance(entry, dict) or not isinstance(entry.get("caption"), str) or not entry["caption"].strip()
                or not isinstance(entry.get("image_id"), (str, int))):
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
        yield where, _with_image({"conversations": turns}, entry, src.parent, image_root)


def llava(src: Path, image_root: Path | None) -> Converted:
    """LLaVA conversation JSON: [{id, image, conversations: [{from, value}]}], images relative to --image-root."""
    base = image_root or src.parent
    for i, entry in enumerate(_load_json(src)):
        where = f"{src}#{i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
            yield where, "entry without a conversations list"
            continue
        record = _with_image({"conversations": entry["conversations"]}, entry, base, image_root)
        if isinstance(record, dict) and entry.get("system"):
            record["system"] = entry["system"]
        yield where, record


def caption_folder(src: Path, image_root: Path | None) -> Converted:
    """img2dataset-style folders: `x.jpg` beside `x.txt` (the caption) or `x.json` (with a `caption` key)."""
    for image in sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        text, meta = image.with_suffix(".txt"), image.with_suffix(".json")
        caption = None
        if text.is_file():
            try:
                caption = text.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                yield str(image), "caption file is not UTF-8"
                continue
        elif meta.is_file():
            try:
                caption = read_json_object(meta).get("caption")
            except AlignError:
                caption = None
        if not isinstance(caption, str) or not caption.strip():
            yield str(image), "no caption (.txt or .json with 'caption') beside the image"
            continue
        yield str(image), {"image": _image(image, image_root), "caption": caption.strip()}


CONVERTERS: Registry[Callable[[Path, Path | None], Converted]] = Registry("data format")
for _converter in (cc_sbu_align, minigpt4qwen, llava, caption_folder):
    CONVERTERS.register(_converter.__name__, _converter)


@dataclass(frozen=True)
class ConvertSummary:
    """Records written and entries rejected."""

    written: int
    rejected: int
    out: str
    rejects: str


def convert(fmt: str, src: Path, out: Path, image_root: Path | None = None) -> ConvertSummary:
    """Convert `src` in format `fmt` into the manifest `out`; bad entries go to `<out>.rejects.jsonl`. Image paths
    are written relative to `image_root` when given (LLaVA's relative paths are read from there too), else to the
    manifest's folder."""
    converter = CONVERTERS.get(fmt)
    if not src.exists():
        raise AlignError(f"{src} does not exist")
    if out.is_dir():
        raise AlignError(f"--out {out} is a directory; give the manifest file to write")
    if out.resolve() == src.resolve() or rejects_path(out).resolve() == src.resolve():
        raise AlignError(f"--out {out} is the input; write the manifest elsewhere")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Both files are written aside and moved into place only when the conversion finished: a failed or killed run
    # never leaves an empty or partial manifest, nor replaces a previous one.
    partial = out.with_name(f".{out.name}.partial")
    partial_rejects = rejects_path(partial)
    partial_rejects.unlink(missing_ok=True)
    rejects, written = RejectLog(partial_rejects), 0
    try:
        with writing(partial), jsonlines.open(partial, "w", dumps=lambda o: json.dumps(o, ensure_ascii=False)) as writer:
            for where, result in converter(src, image_root):
                if isinstance(result, str):
                    rejects.add(where, result)
                else:
                    if isinstance(result.get("image"), str):
                        reference = _reference(result["image"], out.parent, image_root)
                        if reference is None:
                            rejects.add(where, f"image {result['image']} is not under --image-root {image_root}")
                            continue
                        result["image"] = reference
                    writer.write(result)
                    written += 1
        rejects.close()
        if written == 0:
            raise AlignError(f"nothing to convert in {src}: {counted(rejects.total, 'entry')} rejected "
                             f"({', '.join(sorted(rejects.counts)) or 'none found'})")
        if partial_rejects.is_file():
            os.replace(partial_rejects, rejects_path(out))
        else:  # none this time: a previous conversion's rejects must not be read as this one's
            rejects_path(out).unlink(missing_ok=True)
        os.replace(partial, out)
    finally:
        rejects.close()
        partial.unlink(missing_ok=True)
        partial_rejects.unlink(missing_ok=True)
    return ConvertSummary(written, rejects.total, str(out), str(rejects_path(out)))
