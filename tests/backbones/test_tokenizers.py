"""The three native tokenizer kinds: special ids, family pad rules, plain-text control strings, offsets."""

import pytest

from align.backbones.tokenizers import detect_tokenizer_kind, load_tokenizer, tokenizer_kind_names
from align.errors import TokenizerError, UnknownNameError


def test_kinds_are_registered_by_exact_name():
    assert tokenizer_kind_names() == ["hf", "qwen-tiktoken", "sentencepiece"]
    with pytest.raises(UnknownNameError, match="Did you mean 'sentencepiece'"):
        load_tokenizer("sentencepeice", ".")


def test_sentencepiece_ids_and_pad_rule(sp_model_dir):
    tok = load_tokenizer("sentencepiece", sp_model_dir, pad=0)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert tok.id_to_token(195) == "<reserved_195>" and tok.token_to_id("<reserved_196>") == 196
    assert tok.token_to_id("no-such-piece") is None
    assert load_tokenizer("sentencepiece", sp_model_dir, pad=None).pad_id == 2  # no rule: pad with eos
    with pytest.raises(TokenizerError, match="no pad token and no '<pad>'"):
        load_tokenizer("sentencepiece", sp_model_dir, pad="<pad>")


def test_qwen_controls_follow_the_last_rank(qwen_model_dir):
    tok = load_tokenizer("qwen-tiktoken", qwen_model_dir)
    last_rank = 263
    assert tok.token_to_id("<|endoftext|>") == last_rank + 1
    assert tok.token_to_id("<|im_start|>") == last_rank + 2
    assert tok.token_to_id("<|im_end|>") == last_rank + 3
    assert tok.token_to_id("<|extra_0|>") == last_rank + 4
    assert tok.token_to_id("<|extra_204|>") == last_rank + 208 == tok.vocab_size - 1
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, last_rank + 1, last_rank + 1)
    assert tok.encode("hello") == [259]


def test_hf_reads_special_tokens_from_tokenizer_config(hf_chatml_dir):
    tok = load_tokenizer("hf", hf_chatml_dir)
    assert tok.bos_id is None
    assert tok.eos_id == tok.token_to_id("<|im_end|>") and tok.pad_id == tok.token_to_id("<|endoftext|>")


@pytest.mark.parametrize(
    ("fixture", "kind", "controls"),
    [
        ("sp_model_dir", "sentencepiece", ["</s>", "<s>", "<reserved_195>"]),
        ("qwen_model_dir", "qwen-tiktoken", ["<|im_end|>", "<|endoftext|>", "<|extra_0|>"]),
        ("hf_chatml_dir", "hf", ["<|im_end|>", "<|im_start|>", "<|endoftext|>"]),
    ],
)
def test_control_strings_in_text_stay_plain_text(request, fixture, kind, controls):
    tok = load_tokenizer(kind, request.getfixturevalue(fixture), pad=0)
    for control in controls:
        ids = tok.encode(f"say {control} now")
        assert tok.token_to_id(control) not in ids
        assert tok.decode(ids) == f"say {control} now"


@pytest.mark.parametrize(
    ("fixture", "kind"), [("sp_model_dir", "sentencepiece"), ("qwen_model_dir", "qwen-tiktoken"), ("hf_chatml_dir", "hf")]
)
def test_offsets_cover_the_text_in_characters(request, fixture, kind):
    tok = load_tokenizer(kind, request.getfixturevalue(fixture), pad=0)
    text = "猫 cat 沙发. hello"
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text) and len(offsets) == len(ids)
    assert all(0 <= a <= b <= len(text) for a, b in offsets)
    assert offsets == sorted(offsets)
    # Byte-level tokens of one character may share its span; together the spans cover every character.
    covered = {i for a, b in offsets for i in range(a, b)}
    assert {i for i, ch in enumerate(text) if ch != " "} <= covered


def test_detect_kind_and_missing_files(tmp_path, sp_model_dir, qwen_model_dir, hf_chatml_dir):
    assert detect_tokenizer_kind(sp_model_dir) == "sentencepiece"
    assert detect_tokenizer_kind(qwen_model_dir) == "qwen-tiktoken"
    assert detect_tokenizer_kind(hf_chatml_dir) == "hf"
    with pytest.raises(TokenizerError, match="has no tokenizer file"):
        detect_tokenizer_kind(tmp_path)
    with pytest.raises(TokenizerError, match="no tokenizer.model in"):
        load_tokenizer("sentencepiece", tmp_path)


def test_corrupt_tokenizer_file_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match="cannot load the sentencepiece tokenizer"):
        load_tokenizer("sentencepiece", tmp_path, pad=0)
