"""The `align` command as a user runs it: JSON contracts, readable views, one-line errors with exit code 2."""

import json

import pytest

from conftest import run_align

CONVERSATION = {
    "image": "cat.jpg",
    "conversations": [
        {"from": "human", "value": "<image> hello"},
        {"from": "gpt", "value": "cat"},
        {"from": "human", "value": "hello?"},
    ],
}


@pytest.fixture
def conversation_file(tmp_path):
    path = tmp_path / "conversation.json"
    path.write_text(json.dumps(CONVERSATION))
    return path


@pytest.mark.slow
def test_backbones_list_and_show_json(align_home):
    listed = json.loads(run_align("backbones", "list", "--json", home=align_home).stdout)
    assert {row["name"] for row in listed} >= {"qwen-7b-chat", "vicuna-7b-v0", "baichuan2-13b-chat"}
    assert not any(row["is_added"] for row in listed)
    shown = json.loads(run_align("backbones", "show", "qwen-7b-chat", "--json", home=align_home).stdout)
    assert shown["template"] == "chatml" and shown["stop_controls"] == ["im_end", "endoftext", "eos"]


@pytest.mark.slow
def test_add_then_render_json_contract(align_home, qwen_model_dir, conversation_file):
    added = run_align("add-backbone", "qwen-7b-chat", "--model", qwen_model_dir, home=align_home)
    assert added.returncode == 0, added.stderr
    assert "added 'qwen-7b-chat'" in added.stdout and "FAIL" not in added.stdout

    result = run_align("render", "qwen-7b-chat", "--conversation", conversation_file, "--json", home=align_home)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"text", "input_ids", "labels", "images"}
    assert data["text"] == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<Img><ImageHere></Img> hello"
        "<|im_end|>\n<|im_start|>assistant\ncat<|im_end|>\n<|im_start|>user\nhello?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert len(data["input_ids"]) == len(data["labels"])
    [[start, length]] = data["images"]
    assert length == 32 and all(label == -100 for label in data["labels"][start:start + length])
    eight = run_align("render", "qwen-7b-chat", "--conversation", conversation_file, "--json", "--query-tokens", 8,
                      home=align_home)
    assert json.loads(eight.stdout)["images"] == [[start, 8]]  # an encoder with 8 queries fills 8 slots


@pytest.mark.slow
def test_render_shows_a_stage_template_with_the_encoders_or_stores_slots(align_home, qwen_model_dir, tmp_path,
                                                                         tiny_blip2, train_workspace):
    assert run_align("add-backbone", "qwen-7b-chat", "--model", qwen_model_dir, home=align_home).returncode == 0
    record = tmp_path / "caption.json"
    record.write_text(json.dumps({"image": "x.png", "caption": "a red circle"}))
    for source in (["--encoder", tiny_blip2[1]], ["--encoder", tiny_blip2[2]], ["--features", train_workspace["features"]]):
        shown = run_align("render", "qwen-7b-chat", "--conversation", record, "--template", "caption", "--json",
                          *source, home=align_home)
        assert shown.returncode == 0, shown.stderr
        data = json.loads(shown.stdout)
        assert data["text"].startswith("<ImageHere>") and "<|im_start|>" not in data["text"]  # stage 1's format
        assert [length for _, length in data["images"]] == [4]  # the tiny encoder's 4 queries, not 32
    unknown = run_align("render", "qwen-7b-chat", "--conversation", record, "--template", "captions", home=align_home)
    assert unknown.returncode == 2 and "unknown template 'captions'" in unknown.stderr


@pytest.mark.slow
def test_render_readable_view_marks_learnt_tokens_and_images(align_home, qwen_model_dir, conversation_file):
    result = run_align("render", "qwen-7b-chat", "--conversation", conversation_file, "--model", qwen_model_dir,
                   home=align_home)
    assert result.returncode == 0, result.stderr
    assert "⟪cat<|im_end|>⟫" in result.stdout and "[image 0: 32 slots]" in result.stdout
    table = run_align("render", "qwen-7b-chat", "--conversation", conversation_file, "--model", qwen_model_dir, "--tokens",
                  home=align_home)
    assert "image 0" in table.stdout and "'<|im_start|>'" in table.stdout


@pytest.mark.slow
def test_add_new_backbone_with_its_own_chat_template(align_home, hf_chatml_dir):
    result = run_align("add-backbone", "tiny-chatml", "--model", hf_chatml_dir, home=align_home)
    assert result.returncode == 0, result.stderr
    assert "template hf-chat" in result.stdout and "ok   equals the model's own apply_chat_template" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add-backbone", "qwen-7b-chat", "--model", "/no/such/model"], "does not exist"),
        (["add-backbone", "mine", "--model", "{empty}", "--template", "chatml"], "no config.json"),
        (["add-backbone", "mine", "--model", "{configured}", "--template", "chatml"], "no tokenizer file"),
        (["add-backbone", "mine", "--model", "{configured}", "--template", "chatmll"], "unknown template 'chatmll'"),
        (["add-backbone", "qwen-7b-chatt", "--model", "{empty}"], None),
        (["render", "qwen-8b-chat", "--conversation", "x.json"], "unknown backbone 'qwen-8b-chat'"),
        (["render", "qwen-7b-chat", "--conversation", "x.json"], "has no local model"),
        (["backbones", "show", "nope"], "unknown backbone 'nope'"),
    ],
)
def test_user_errors_are_one_line_exit_2(align_home, tmp_path, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    configured = tmp_path / "configured"
    configured.mkdir()
    (configured / "config.json").write_text(json.dumps({"hidden_size": 8, "vocab_size": 10}))
    args = [a.format(empty=empty, configured=configured) for a in args]
    result = run_align(*args, home=align_home)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    if message:
        assert message in lines[0]


@pytest.mark.slow
def test_failed_self_check_exits_2_and_lists_failures(align_home, sp_model_dir):
    result = run_align("add-backbone", "mine", "--model", sp_model_dir, "--template", "chatml", home=align_home)
    assert result.returncode == 2
    assert "FAIL control tokens are single ids" in result.stdout
    assert result.stderr.strip() == "error: 'mine' not added; failed: control tokens are single ids"
    assert not (align_home / "backbones" / "mine.yaml").exists()


@pytest.mark.slow
def test_bad_conversation_file_is_one_line(align_home, qwen_model_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"conversations": [{"from": "gpt", "value": "x"}]}')
    result = run_align("render", "qwen-7b-chat", "--conversation", bad, "--model", qwen_model_dir, home=align_home)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: message 0: expected a user turn, got assistant (turns must alternate, user first)"
    )


@pytest.mark.slow
def test_render_a_whole_manifest(align_home, qwen_model_dir, tmp_path):
    assert run_align("add-backbone", "qwen-7b-chat", "--model", qwen_model_dir, home=align_home).returncode == 0
    manifest = tmp_path / "data.jsonl"
    lines = [json.dumps(CONVERSATION), "{not json", json.dumps({"conversations": [{"from": "human", "value": "hi"}]}),
             json.dumps({"conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "cat"}],
                         "image": "a.jpg"})]
    manifest.write_text("\n".join(lines) + "\n")
    result = run_align("render", "qwen-7b-chat", "--manifest", manifest, "--json", home=align_home)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row.get("line") for row in rows[:-1]] == [1, 2, 3, 4]
    assert set(rows[3]) == {"line", "input_ids", "labels", "images"}
    assert "nothing to learn" in rows[0]["reject"] and "malformed" in rows[1]["reject"]  # a prompt is no sample
    summary = rows[-1]["summary"]
    assert (summary["records"], summary["samples"]) == (4, 1) and sum(summary["rejects"].values()) == 3
    assert summary["supervised_tokens"] > 0 and summary["length"]["max"] >= summary["length"]["p50"] > 0
    text = run_align("render", "qwen-7b-chat", "--manifest", manifest, home=align_home)
    assert text.returncode == 0 and "supervised_tokens" in text.stdout
    # Read by people: no Python reprs of mappings, None or booleans.
    assert "{" not in text.stdout and "None" not in text.stdout and "length: p50 " in text.stdout, text.stdout
    both = run_align("render", "qwen-7b-chat", "--manifest", manifest, "--conversation", manifest, home=align_home)
    assert both.returncode == 2 and both.stderr.startswith("error: ")


@pytest.mark.slow
def test_help_reads_as_people_expect():
    result = run_align("chat", "--help")
    assert result.returncode == 0
    lines = {word: line for line in result.stdout.splitlines() for word in line.split() if word.startswith("--")}
    assert "<bool>" not in lines["--trust-remote-code"] and "PATH" in lines["--adapter"]
    assert "list[" not in lines["--question"] and "TEXT" in lines["--question"]


def test_help_describes_every_argument_in_unbroken_sentences():
    import typer

    from align import cli

    command = typer.main.get_command(cli.app)
    cli._readable_help(command)
    undescribed, broken = [], []

    def walk(node, path):
        undescribed.extend(f"{path} {p.name}" for p in node.params if p.name != "help" and not getattr(p, "help", None))
        if node.help is None or any("\n" in paragraph for paragraph in node.help.split("\n\n")):
            broken.append(path)
        for name, sub in getattr(node, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(command, "align")
    assert undescribed == [] and broken == []
