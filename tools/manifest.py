"""Manifests: JSON Lines of conversation or caption records, read line by line with bad lines rejected."""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from align.errors import AlignError
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


def read_manifest(path: Path, rejects: RejectLog | None) -> Iterator[ManifestRecord]:
    """Every JSON object of a manifest; malformed lines and non-objects go to `rejects` (if given) and are skipped."""
    path = Path(path)
    if not path.is_file():
        raise AlignError(f"manifest {path} does not exist")
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                record, problem = None, f"malformed manifest line: {exc}"
            else:
                problem = None if isinstance(record, dict) else "malformed manifest line: not a JSON object"
            if problem:
                if rejects is not None:
                    rejects.add(f"{path}:{number}", problem)
                continue
            yield ManifestRecord(path, number, record)


def image_refs(record: dict) -> list[str]:
    """The image references of a record (`image` as a string or a list); empty when it has none."""
    image = record.get("image", record.get("images"))
    if isinstance(image, str) and image:
        return [image]
    if isinstance(image, list):
        return [i for i in image if isinstance(i, str) and i]
    return []


def resolve_image(ref: str, manifest: Path, image_root: Path | None) -> Path:
    """An image path: absolute as given, else relative to `image_root`, else to the manifest's folder."""
    path = Path(ref).expanduser()
    if path.is_absolute():
        return path
    return ((image_root or Path(manifest).parent) / path).resolve()
