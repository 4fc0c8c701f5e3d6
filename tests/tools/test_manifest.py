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


def test_one_hostile_record_is_a_reject_with_its_reason_never_a_crash(tmp_path):
    # Each of these ended extraction, training, captioning or rendering with a traceback.
    from align.errors import AlignError
    from align.tools.training.training_data import training_conversation

    lines = [
        json.dumps({"image": "a\u0000b.png", "caption": "a NUL byte in the path"}),
        json.dumps({"image": "a.png", "conversations": [{"from": ["human"], "value": "<image> hi"},
                                                         {"from": "gpt", "value": "an unhashable role"}]}),
        '{"image": "a.png", "caption": "x", "n": ' + "9" * 5000 + "}",  # over Python's 4,300-digit guard
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    reasons = Reasons()
    problems = []
    for item in read_manifest(manifest, reasons):
        try:
            training_conversation(item.record)
        except AlignError as exc:
            problems.append(str(exc))
    assert problems[0] == "'image' holds a NUL character, which no path can"
    assert problems[1].startswith("message 0: unknown role")
    assert dict(reasons.rows)["3"].startswith("malformed manifest line: Exceeds the limit (4300 digits)")
