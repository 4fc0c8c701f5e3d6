"""The rejects file: every skipped input with its reason, one JSON line each, counted for the summary."""

import json
import re
from collections import Counter
from pathlib import Path

import jsonlines

from align.constants import REJECTS
from align.files import open_own


def rejects_path(output: Path) -> Path:
    """Where a job that writes the file `output` lists what it skipped: `<output stem>.rejects.jsonl` beside it (a
    job that writes a folder keeps `rejects.jsonl` inside it)."""
    output = Path(output)
    return output.with_name(f"{output.stem}.{REJECTS}")


def reason_kind(reason: str) -> str:
    """What a reason is counted under: its text before the first ': ', with numbers as N and paths as PATH, so
    "message 3: …" and "message 5: …", or two images' paths, count as one kind."""
    head = reason.split(": ", 1)[0]
    words = ["PATH" if "/" in word else re.sub(r"\d+", "N", word) for word in head.split(" ")]
    return " ".join(words)


class RejectLog:
    """Appends rejects to a JSON Lines file (safe to share between processes); a reject already logged is not repeated."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.counts: Counter[str] = Counter()
        self._seen: set[tuple[str, str]] = set()
        self._file = self._writer = None  # opened at the first new reject: a job with none writes nothing
        if self.path.is_symlink():
            open_own(self.path)  # refused in one line: never read or write through a link planted there
        if self.path.is_file():
            with self.path.open(encoding="utf-8", errors="replace") as old_lines:
                for line in old_lines:
                    try:
                        old = json.loads(line)
                        self._seen.add((old["source"], old["reason"]))
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line torn by a kill: harmless, the reject will be logged again

    def add(self, source: str, reason: str, **extra) -> None:
        """Record that `source` was skipped because of `reason`."""
        self.counts[reason_kind(reason)] += 1
        if (source, reason) in self._seen:
            return
        self._seen.add((source, reason))
        if self._writer is None:
            self._file = open_own(self.path)  # never through a link planted where the log goes
            self._writer = jsonlines.Writer(self._file, flush=True, dumps=lambda o: json.dumps(o, ensure_ascii=False))
        self._writer.write({"source": source, "reason": reason, **extra})

    @property
    def total(self) -> int:
        """How many inputs were rejected in this run."""
        return sum(self.counts.values())

    def close(self) -> None:
        """Flush and close the file."""
        if self._writer is not None:
            self._writer.close()
            self._file.close()
