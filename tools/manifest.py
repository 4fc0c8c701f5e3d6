"""Manifests: JSON Lines of conversation or caption records, read line by line with bad lines rejected."""

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from align.errors import AlignError
from align.templates.conversation import record_images
from align.tools.rejects import RejectLog


@dataclass(frozen=True)
class ManifestRecord:
    """One record and where it came from."""

    manifest: Path
    line: int
    record: dict

    @property
    def where(self) -> str:
        """`manifest:line`, for rejects and errors."""
        return f"{self.manifest}:{self.line}"


def read_manifest(path: Path, rejects: RejectLog | None, *, start: int = 0, end: int | None = None,
                  first_line: int = 1) -> Iterator[ManifestRecord]:
    """Every JSON object of a manifest (or of its lines from byte `start`, numbered from `first_line`, to byte
    `end`); malformed lines and non-objects go to `rejects` (if given) and are skipped."""
    path = Path(path)
    if path.is_dir():
        raise AlignError(f"manifest {path} is a directory, not a JSON Lines file")
    if not path.is_file():
        raise AlignError(f"manifest {path} does not exist")
    with path.open("rb") as lines:
        lines.seek(start)
        position = start
        for number, raw in enumerate(lines, start=first_line):
            if end is not None and position >= end:
                break
            position += len(raw)
            record, problem = _parse(raw)
            if record is None and problem is None:
                continue  # a blank line
            if problem:
                if rejects is not None:
                    rejects.add(f"{path}:{number}", problem)
                continue
            yield ManifestRecord(path, number, record)


def line_aligned_chunks(path: Path, chunk_bytes: int) -> list[tuple[int, int, int]]:
    """(start byte, end byte, first line number) of consecutive pieces of about `chunk_bytes`, each starting at a
    line, covering the file."""
    size = Path(path).stat().st_size
    chunks, start, line = [], 0, 1
    with Path(path).open("rb") as file:
        while start < size:
            file.seek(min(size, start + chunk_bytes))
            file.readline()
            end = min(size, file.tell()) if start + chunk_bytes < size else size
            file.seek(start)
            chunks.append((start, end, line))
            line += file.read(end - start).count(b"\n")
            start = end
    return chunks


def _parse(raw: bytes) -> tuple[dict | None, str | None]:
    """(record, None), (None, reason) for a line that cannot be a record, or (None, None) for a blank line.

    Text that is not UTF-8, or that holds a lone surrogate escape (`\\ud800`), is refused rather than trained on as
    replacement characters or passed to a tokenizer that cannot encode it; JSON nested deeper than Python's
    recursion limit is refused rather than crashing the job."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"malformed manifest line: not UTF-8 ({exc.reason} at byte {exc.start})"
    if not line.strip():
        return None, None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"malformed manifest line: {exc}"
    except RecursionError:
        return None, "malformed manifest line: JSON nested too deeply"
    except ValueError as exc:  # an integer of over 4,300 digits (Python's guard against slow conversions)
        return None, f"malformed manifest line: {str(exc).split(';')[0]}"
    if not isinstance(record, dict):
        return None, "malformed manifest line: not a JSON object"
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return None, "malformed manifest line: text with a lone surrogate escape"
    except RecursionError:
        return None, "malformed manifest line: JSON nested too deeply"
    return record, None


def image_refs(record: dict) -> list[str]:
    """The image references of a record (the conversation parser's list; a malformed one is an AlignError)."""
    return list(record_images(record))


def resolve_image(ref: str, manifest: Path, image_root: Path | None) -> Path:
    """An image path: absolute as given, else relative to `image_root`, else to the manifest's folder."""
    path = Path(ref).expanduser()
    if path.is_absolute():
        return path
    # realpath, not Path.resolve: a symlink loop stays a path (rejected when read), never a RuntimeError here.
    return Path(os.path.realpath((image_root or Path(manifest).parent) / path))
