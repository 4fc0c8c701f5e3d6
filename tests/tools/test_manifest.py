"""Manifests: every line is a record or a reject with its reason; nothing a line holds can kill a long job."""

import json

from align.tools.manifest import read_manifest


class Reasons:
    def __init__(self):
        self.rows = []

    def add(self, source, reason):
        self.rows.append((source.rsplit(":", 1)[1], reason))


def test_hostile_lines_become_rejects(tmp_path):
    good = json.dumps({"image": "a.jpg", "caption": "a cat"})
    lines = [
        good.encode(),
        b'{"image": "b.jpg", "caption": "caf\xe9"}',  # Latin-1, not UTF-8
        b'{"image": "c.jpg", "caption": "\\ud800"}',  # a lone surrogate escape
        ("[" * 100_000 + "]" * 100_000).encode(),  # nested past the recursion limit
        b"",
        b"[1, 2]",
        good.encode(),
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    reasons = Reasons()
    records = list(read_manifest(manifest, reasons))
    assert [r.line for r in records] == [1, 7]
    found = dict(reasons.rows)
    assert "not UTF-8" in found["2"] and "lone surrogate" in found["3"] and "nested too deeply" in found["4"]
    assert "not a JSON object" in found["6"] and "5" not in found  # a blank line is no record and no reject
