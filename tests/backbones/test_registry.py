"""The backbone registry: shipped presets, add-backbone with its self-check, and the user registry."""

import hashlib
import json
import shutil

import pytest
import yaml

from align.backbones.registry import add_backbone, get_backbone, list_backbones, presets, user_registry_dir
from align.backbones.self_check import check_labels
from align.backbones.tokenizers import load_tokenizer, tokenizer_kind_names
from align.errors import AlignError, BackboneError, UnknownNameError
from align.templates import conversation_from_record, get_template, render, template_names
from conftest import BAICHUAN2_MODEL, CHATML_JINJA, LLAMA_MODEL, QWEN_TIKTOKEN, write_config

PRESETS = [
    "vicuna-7b-v0", "vicuna-13b-v0", "vicuna-7b-v1.5", "llama-2-7b-chat", "llama-2-13b-chat", "qwen-7b-chat",
    "qwen-14b-chat", "qwen2.5-7b-instruct", "baichuan-13b-chat", "baichuan2-7b-chat", "baichuan2-13b-chat", "demo-tiny",
    "demo-tiny-llama", "smollm2",
]


def test_every_preset_ships_and_names_real_parts():
    assert sorted(presets()) == sorted(PRESETS)
    for spec in presets().values():
        assert spec.remote_code is False  # every shipped backbone loads natively
        assert spec.template in [*template_names(), "hf-chat"] and spec.tokenizer in tokenizer_kind_names()
        assert spec.hidden_size > 0 and spec.vocab_size > 0 and spec.languages
        assert spec.model_path is None  # presets never point at a machine's files


def test_lookup_is_exact(align_home):
    assert get_backbone("qwen-7b-chat").template == "chatml"
    with pytest.raises(UnknownNameError, match="Did you mean 'qwen-7b-chat'"):
        get_backbone("Qwen-7B-Chat")


def test_add_preset_with_local_model(align_home, qwen_model_dir):
    result = add_backbone("qwen-7b-chat", qwen_model_dir)
    assert result.ok, result.checks
    assert result.path == user_registry_dir() / "qwen-7b-chat.yaml" and result.path.is_file()
    spec = get_backbone("qwen-7b-chat")
    assert spec.model_path == str(qwen_model_dir) and spec.preset == "qwen-7b-chat"
    assert spec.vocab_size == 480  # the model's own config.json wins over the preset's figure
    rows = {row.spec.name: row for row in list_backbones()}
    assert rows["qwen-7b-chat"].is_added and rows["qwen-7b-chat"].is_preset
    assert not rows["qwen-14b-chat"].is_added


def test_add_new_llm_uses_its_own_chat_template_and_sizes(align_home, hf_chatml_dir):
    result = add_backbone("tiny-chatml", hf_chatml_dir)
    assert result.ok, result.checks
    spec = get_backbone("tiny-chatml")
    assert (spec.template, spec.tokenizer, spec.hidden_size, spec.vocab_size) == ("hf-chat", "hf", 48, 512)
    assert spec.chat_template_sha256 == hashlib.sha256(CHATML_JINJA.encode()).hexdigest()
    compared = next(c for c in result.checks if c.name == "equals the model's own apply_chat_template")
    assert compared.ok and compared.detail == "5 conversations, id for id"
    assert add_backbone("tiny-chatml-v", hf_chatml_dir, template="chatml").spec.template == "chatml"  # --template wins
    assert spec.remote_code is False and spec.dtype == "bf16" and spec.quantization == "none"
    names = [check.name for check in result.checks]
    assert names[:3] == ["tokenizer loads", "control tokens are single ids", "sample conversation renders"]
    assert "labels cover exactly the replies and their end tokens" in names
    assert "decoded text round-trips" in names and "embedding matrix covers every id" in names


def test_failed_self_check_writes_nothing(align_home, hf_chatml_dir, tmp_path):
    small = tmp_path / "small"
    shutil.copytree(hf_chatml_dir, small)
    write_config(small, vocab_size=100, architectures=["Qwen2ForCausalLM"])
    result = add_backbone("too-small", small)
    assert not result.ok and result.path is None
    failed = [check for check in result.checks if not check.ok]
    assert [check.name for check in failed] == ["embedding matrix covers every id"]
    assert "100 rows" in failed[0].detail
    assert not (user_registry_dir() / "too-small.yaml").exists()


def test_template_without_its_control_tokens_is_refused(align_home, sp_model_dir):
    result = add_backbone("sp-chatml", sp_model_dir, template="chatml")
    assert not result.ok and result.path is None
    failed = {check.name: check.detail for check in result.checks if not check.ok}
    assert "<|im_start|>" in failed["control tokens are single ids"]


def test_baichuan2_preset_on_a_baichuan_vocabulary(align_home, sp_model_dir):
    assert add_backbone("baichuan2-7b-chat", sp_model_dir).ok


def test_adding_twice_needs_force(align_home, qwen_model_dir):
    add_backbone("qwen-7b-chat", qwen_model_dir)
    with pytest.raises(BackboneError, match="already added; pass --force"):
        add_backbone("qwen-7b-chat", qwen_model_dir)
    assert add_backbone("qwen-7b-chat", qwen_model_dir, force=True).ok


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"name": "new-llm"}, "unknown backbone 'new-llm'"),
        ({"name": "qwen-14b-chat"}, "needs --model PATH .*never downloads"),
        ({"name": "Bad Name", "model": "."}, "not a valid backbone name"),
        ({"name": "x", "model": "/no/such/dir"}, "does not exist"),
        ({"name": "x", "model": ".", "template": "chatmI"}, "unknown template"),
        ({"name": "x", "model": ".", "tokenizer": "bpe"}, "unknown tokenizer kind"),
    ],
)
def test_bad_requests_are_one_clear_error(align_home, arguments, message, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    if arguments.get("model"):
        arguments["model"] = tmp_path / arguments["model"] if arguments["model"] == "." else arguments["model"]
        from pathlib import Path

        arguments["model"] = Path(arguments["model"])
    with pytest.raises(AlignError, match=message):
        add_backbone(**arguments)


def test_directory_without_config_or_tokenizer(align_home, tmp_path):
    with pytest.raises(BackboneError, match="no config.json"):
        add_backbone("x", tmp_path)
    write_config(tmp_path)
    with pytest.raises(AlignError, match="no tokenizer file"):
        add_backbone("x", tmp_path, template="chatml")


def test_broken_user_entry_names_the_file(align_home):
    user_registry_dir().mkdir(parents=True)
    entry = user_registry_dir() / "mine.yaml"
    entry.write_text(yaml.safe_dump({"name": "mine", "tokenizer": "hf", "template": "chatml", "hiden_size": 1}))
    with pytest.raises(BackboneError, match="mine.yaml.*hiden_size"):
        get_backbone("mine")


def test_label_check_catches_wrong_supervision(qwen_model_dir):
    tok = load_tokenizer("qwen-tiktoken", qwen_model_dir)
    template = get_template("chatml")
    conversation = conversation_from_record({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "cat"}]})
    rendered = render(template, conversation, tok)
    assert "1 repl" in check_labels(template, tok, rendered, ["cat"])
    rendered.labels[1] = rendered.input_ids[1]  # learn the role name too
    with pytest.raises(AlignError, match="supervised stretch"):
        check_labels(template, tok, rendered, ["cat"])


def _real_model_dir(tmp_path, tokenizer_file, name, vocab_size):
    if not tokenizer_file.is_file():
        pytest.skip(f"{tokenizer_file} not present")
    directory = tmp_path / name
    directory.mkdir()
    (directory / tokenizer_file.name).symlink_to(tokenizer_file.resolve())
    (directory / "config.json").write_text(json.dumps({"hidden_size": 64, "vocab_size": vocab_size}))
    return directory


@pytest.mark.parametrize("name", ["vicuna-7b-v0", "vicuna-7b-v1.5", "llama-2-7b-chat"])
def test_llama_presets_pass_self_check_on_the_real_vocabulary(align_home, tmp_path, name):
    assert add_backbone(name, _real_model_dir(tmp_path, LLAMA_MODEL, name, 32000)).ok


@pytest.mark.parametrize("name", ["qwen-7b-chat", "qwen-14b-chat"])
def test_qwen_presets_pass_self_check_on_the_real_vocabulary(align_home, tmp_path, name):
    result = add_backbone(name, _real_model_dir(tmp_path, QWEN_TIKTOKEN, name, 151936))
    assert result.ok, [c for c in result.checks if not c.ok]


def test_baichuan2_preset_accepts_the_real_tokenizer(baichuan2_tokenizer, tmp_path, align_home):
    model = tmp_path / "Baichuan2-7B-Chat"
    model.mkdir()
    (model / "tokenizer.model").symlink_to(BAICHUAN2_MODEL.resolve())
    write_config(model, hidden_size=4096, vocab_size=125696, architectures=["BaichuanForCausalLM"],
                 max_position_embeddings=4096)
    result = add_backbone("baichuan2-7b-chat", model)
    assert result.ok, [c for c in result.checks if not c.ok]
    assert result.spec.remote_code is False
    controls = next(c for c in result.checks if c.name == "control tokens are single ids")
    assert "user=195" in controls.detail and "assistant=196" in controls.detail


def test_qwen25_preset_renders_with_the_models_own_template_and_notices_a_change(align_home, tmp_path):
    from align.backbones.chat_templates import template_for
    from align.backbones.registry import backbone_tokenizer
    from hf_tokenizers import save_template

    model = save_template(tmp_path / "Qwen2.5-7B-Instruct", "qwen2.5-instruct")
    write_config(model, hidden_size=3584, vocab_size=600, architectures=["Qwen2ForCausalLM"])
    result = add_backbone("qwen2.5-7b-instruct", model)
    assert result.ok, [c for c in result.checks if not c.ok]
    spec = get_backbone("qwen2.5-7b-instruct")
    assert spec.template == "hf-chat" and spec.system is None
    tokenizer = backbone_tokenizer(spec)
    prompt = render(template_for(spec, tokenizer), conversation_from_record({"conversations": [
        {"role": "user", "content": "Hi"}]}), tokenizer)
    assert "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." in prompt.text
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("You are Qwen", "You are Bob")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(BackboneError, match="changed since backbone 'qwen2.5-7b-instruct' was checked"):
        template_for(spec, tokenizer)


def test_a_model_without_a_chat_template_must_name_one(align_home, tmp_path, hf_chatml_dir):
    model = tmp_path / "plain"
    model.mkdir()
    shutil.copy(hf_chatml_dir / "tokenizer.json", model / "tokenizer.json")
    config = json.loads((hf_chatml_dir / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "chat_template"}))
    write_config(model, hidden_size=48, vocab_size=512, architectures=["Qwen2ForCausalLM"])
    with pytest.raises(BackboneError, match="has no chat template .*--template"):
        add_backbone("plain-llm", model)
    assert add_backbone("plain-llm", model, template="chatml").ok


@pytest.mark.parametrize("name", ["llama-3-instruct", "gemma-it", "mixtral-instruct"])
def test_add_backbone_reads_chat_template_jinja_and_checks_it_against_transformers(align_home, tmp_path, name):
    from hf_tokenizers import save_template

    model = save_template(tmp_path / name, name, as_jinja_file=True)  # as transformers 5 saves it
    write_config(model, hidden_size=64, vocab_size=1024, architectures=["LlamaForCausalLM"])
    result = add_backbone(f"my-{name}", model)
    assert result.ok, [c for c in result.checks if not c.ok]
    assert result.spec.template == "hf-chat"
    compared = next(c for c in result.checks if c.name == "equals the model's own apply_chat_template")
    assert compared.detail.endswith("id for id")


def test_one_bad_entry_in_align_home_is_skipped_with_a_warning_naming_it(align_home, capsys):
    import os

    from align.backbones.registry import get_backbone, list_backbones, user_registry_dir

    folder = user_registry_dir()
    folder.mkdir(parents=True)
    (folder / "broken.yaml").write_text("name: [unclosed")
    (folder / "huge.yaml").write_text("# " + "x" * 200_000)
    os.mkfifo(folder / "fifo.yaml")  # reading it would block every command forever
    (folder / "wrong.yaml").write_text("name: wrong\nhidden_size: -3\n")
    names = {entry.spec.name for entry in list_backbones()}
    assert "qwen-7b-chat" in names and get_backbone("qwen-7b-chat").hidden_size == 4096
    warnings = capsys.readouterr().err.splitlines()
    for bad in ("broken", "huge", "fifo", "wrong"):
        assert sum(f"{bad}.yaml" in line and line.startswith("warning: skipping") for line in warnings) == 1


@pytest.mark.parametrize("hidden", [True, "48", float("nan"), -48, 10**12, [48], 48.5])
def test_a_hostile_config_is_one_line_and_registers_nothing(align_home, hf_chatml_dir, tmp_path, hidden):
    # A boolean counted as an integer and 10**12 was taken: absurd entries were registered (a negative size was a
    # pydantic traceback).
    import json
    import shutil

    from align.backbones.registry import add_backbone, user_registry_dir

    model = tmp_path / "model"
    shutil.copytree(hf_chatml_dir, model)
    config = json.loads((model / "config.json").read_text()) | {"hidden_size": hidden}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackboneError, match="config.json"):
        add_backbone("hostile", model)
    assert not (user_registry_dir() / "hostile.yaml").exists()


def test_a_chat_template_that_would_hang_is_refused_at_add_backbone(align_home, tmp_path, hf_chatml_dir):
    # Nested range(100000) loops hung add-backbone past 150 s: every render has a budget now.
    model = tmp_path / "hanging"
    shutil.copytree(hf_chatml_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}" \
        + config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    result = add_backbone("hanging-llm", model)
    assert not result.ok
    assert any("too costly on this conversation: it runs more than" in c.detail for c in result.checks if not c.ok)
    assert not user_registry_dir().exists() or not list(user_registry_dir().iterdir())


HOSTILE_CONFIGS = {  # config.json fields that passed into the registry, or ended in a traceback
    "text_config a list": ({"text_config": [1]}, "text_config must be an object"),
    "architectures a string": ({"architectures": "Qwen2ForCausalLM"}, "architectures must be a list of class names"),
    "architectures of numbers": ({"architectures": [1, 2]}, "architectures must be a list of class names"),
    "model_type a list": ({"model_type": ["qwen2"]}, "model_type must be a name"),
    "layers a string": ({"num_hidden_layers": "32"}, "num_hidden_layers must be a whole number"),
    "layers 10**12": ({"num_hidden_layers": 10**12}, "num_hidden_layers must be a whole number"),
    "layers negative": ({"num_hidden_layers": -4}, "num_hidden_layers must be a whole number"),
    "intermediate a list": ({"intermediate_size": [1]}, "intermediate_size must be a whole number"),
    "no attention heads": ({"num_attention_heads": 0}, "num_attention_heads must be a whole number"),
    "kv heads a boolean": ({"num_key_value_heads": True}, "num_key_value_heads must be a whole number"),
    "positions NaN": ({"max_position_embeddings": float("nan")}, "max_position_embeddings must be a whole number"),
    "tied embeddings a string": ({"tie_word_embeddings": "yes"}, "is not a valid qwen2 config: .*tie_word_embeddings"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CONFIGS))
def test_a_hostile_config_is_one_line_and_registers_nothing(align_home, tmp_path, hf_chatml_dir, case):
    changes, message = HOSTILE_CONFIGS[case]
    model = tmp_path / "model"
    shutil.copytree(hf_chatml_dir, model)
    config = {**json.loads((model / "config.json").read_text()), "model_type": "qwen2", **changes}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackboneError, match=message):
        add_backbone("hostile-llm", model)
    assert not user_registry_dir().exists() or not list(user_registry_dir().iterdir())


@pytest.mark.parametrize("content,message", [
    ('{"a":' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
    ('{"hidden_size": 64, "x": ' + "9" * 5000 + "}", "Exceeds the limit"),
    ('{"hidden_size": 64, "pad": "' + "x" * (17 * 2**20) + '"}', "a file of its kind is far smaller"),
])
def test_a_config_file_too_deep_long_or_large_to_read_is_one_line(align_home, tmp_path, hf_chatml_dir, content, message):
    model = tmp_path / "model"
    shutil.copytree(hf_chatml_dir, model)
    (model / "config.json").write_text(content)
    with pytest.raises(BackboneError, match=message):
        add_backbone("hostile-llm", model)
