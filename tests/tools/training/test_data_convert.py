"""`align data convert`: each public layout becomes records the templates accept; Chinese text is kept as is."""

import json
import subprocess
import sys

import pytest

from align.errors import AlignError
from align.templates import conversation_from_record
from align.tools.training.data_convert import convert


def records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_cc_sbu_align(tmp_path):
    src = tmp_path / "cc_sbu_align"
    (src / "image").mkdir(parents=True)
    (src / "filter_cap.json").write_text(json.dumps(
        {"annotations": [{"image_id": "2", "caption": "A dog."}, {"image_id": "3"}]}))
    summary = convert("cc_sbu_align", src, tmp_path / "m.jsonl")
    assert (summary.written, summary.rejected) == (1, 1)
    [record] = records(tmp_path / "m.jsonl")
    # Relative to the manifest's folder: the manifest and its images move together.
    assert record == {"image": "cc_sbu_align/image/2.jpg", "caption": "A dog."}


def test_minigpt4qwen_single_and_lists_keep_chinese(tmp_path):
    data = [
        {"image": "a.jpg", "instruction": "<Img><ImageHere></Img> 描述这张图片。", "output": "一只猫。"},
        {"image": "b.jpg", "instruction": ["<Img><ImageHere></Img> 这是什么？", "什么颜色？"], "output": ["猫。", "橙色。"]},
        {"image": "c.jpg", "instruction": ["a", "b"], "output": ["only one"]},
    ]
    (tmp_path / "instructions.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    summary = convert("minigpt4qwen", tmp_path / "instructions.json", tmp_path / "m.jsonl", image_root=tmp_path)
    assert (summary.written, summary.rejected) == (2, 1)
    text = (tmp_path / "m.jsonl").read_text(encoding="utf-8")
    assert "描述这张图片" in text and "\\u" not in text
    first, second = records(tmp_path / "m.jsonl")
    assert first["image"] == "a.jpg" and first["conversations"][0]["value"] == "<image> 描述这张图片。"
    assert len(conversation_from_record(second).messages) == 4


def test_llava_and_caption_folder(tmp_path):
    (tmp_path / "llava.json").write_text(json.dumps([
        {"id": "1", "image": "x.jpg", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yo"}]},
        {"id": "2"},
    ]))
    summary = convert("llava", tmp_path / "llava.json", tmp_path / "l.jsonl", image_root=tmp_path)
    assert (summary.written, summary.rejected) == (1, 1) and records(tmp_path / "l.jsonl")[0]["image"] == "x.jpg"

    folder = tmp_path / "shards" / "00000"
    folder.mkdir(parents=True)
    for name in ("a", "b", "c"):
        (folder / f"{name}.jpg").write_bytes(b"jpeg")
    (folder / "a.txt").write_text("a red square\n")
    (folder / "b.json").write_text(json.dumps({"caption": "一个蓝色的圆"}, ensure_ascii=False))
    summary = convert("caption_folder", tmp_path / "shards", tmp_path / "c.jsonl")
    assert (summary.written, summary.rejected) == (2, 1)
    assert [r["caption"] for r in records(tmp_path / "c.jsonl")] == ["a red square", "一个蓝色的圆"]


@pytest.mark.slow
def test_cli_unknown_format_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "align", "data", "convert", str(tmp_path), "--format", "llava2",
                             "--out", str(tmp_path / "m.jsonl")], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown data format 'llava2'. Did you mean 'llava'?" in result.stderr


def test_image_paths_are_written_relative_to_the_image_root_or_the_manifests_folder(tmp_path):
    # --image-root was ignored (absolute paths written): a manifest moved with its images broke.
    from align.tools.manifest import resolve_image

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.jpg").write_bytes(b"jpg")
    (tmp_path / "llava.json").write_text(json.dumps([{"id": "1", "image": "x.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]}]))
    out = tmp_path / "manifests" / "l.jsonl"
    convert("llava", tmp_path / "llava.json", out, image_root=tmp_path / "images")
    [record] = records(out)
    assert record["image"] == "x.jpg"
    assert resolve_image(record["image"], out, tmp_path / "images") == (tmp_path / "images" / "x.jpg").resolve()
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "x.jpg").write_bytes(b"jpg")
    convert("llava", tmp_path / "llava.json", out)  # LLaVA's paths start beside its json; written from the manifest
    [record] = records(out)
    assert record["image"] == "../x.jpg" and resolve_image(record["image"], out, None) == tmp_path / "x.jpg"
    src = tmp_path / "cc"
    (src / "image").mkdir(parents=True)
    (src / "filter_cap.json").write_text(json.dumps({"annotations": [{"image_id": "2", "caption": "A dog."}]}))
    with pytest.raises(AlignError, match="nothing to convert.*image PATH is not under --image-root PATH"):
        convert("cc_sbu_align", src, tmp_path / "m.jsonl", image_root=tmp_path / "pictures")


def test_convert_never_writes_over_its_input_nor_leaves_a_partial_manifest(tmp_path):
    from align.errors import AlignError

    src = tmp_path / "llava.json"
    src.write_text(json.dumps([{"image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]}]))
    with pytest.raises(AlignError, match="is the input"):
        convert("llava", src, src)
    assert json.loads(src.read_text())[0]["image"] == "a.jpg"  # untouched
    with pytest.raises(AlignError, match="is a directory"):
        convert("llava", src, tmp_path)
    good = convert("llava", src, tmp_path / "m.jsonl")
    assert good.written == 1
    # A conversion that finds nothing to write fails and keeps the previous manifest as it was.
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps([{"image": "b.jpg"}]))
    with pytest.raises(AlignError, match="nothing to convert"):
        convert("llava", empty, tmp_path / "m.jsonl")
    assert len(records(tmp_path / "m.jsonl")) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.json", "llava.json", "m.jsonl"]  # no rejects, no file
