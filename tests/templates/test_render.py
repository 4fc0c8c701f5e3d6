"""Rendering rules shared by all templates, on tiny tokenizers built in the test session."""

import dataclasses

import pytest

from align.backbones.tokenizers import load_tokenizer
from align.errors import DuplicateNameError, TemplateError, UnknownNameError
from align.templates import (
    IGNORE_INDEX,
    conversation_from_record,
    get_template,
    render,
    stop_ids,
    template_names,
)
from align.templates.template import register_template

USER_ID, ASSISTANT_ID, EOS = 195, 196, 2


@pytest.fixture(scope="module")
def sp(sp_model_dir):
    return load_tokenizer("sentencepiece", sp_model_dir, pad=0)


@pytest.fixture(scope="module")
def qwen(qwen_model_dir):
    return load_tokenizer("qwen-tiktoken", qwen_model_dir)


def record(*turns, image=None, system=None) -> dict:
    roles = ["human", "gpt"]
    out = {"conversations": [{"from": roles[i % 2], "value": t} for i, t in enumerate(turns)]}
    if image:
        out["image"] = image
    if system is not None:
        out["system"] = system
    return out


def test_every_required_template_is_registered():
    assert template_names() == sorted(
        ["minigpt4-vicuna0", "minigpt4-stage2", "minigpt4-caption", "vicuna-v1.1", "llama2-chat", "chatml", "baichuan",
         "baichuan2", "caption"]
    )


def test_registry_is_exact_and_refuses_duplicates():
    with pytest.raises(UnknownNameError, match="Did you mean 'chatml'"):
        get_template("ChatML")
    with pytest.raises(DuplicateNameError):
        register_template(get_template("chatml"))


def test_baichuan_ids_and_labels(sp):
    conversation = conversation_from_record(record("猫？", "一只猫。", "颜色？"))
    rendered = render(get_template("baichuan"), conversation, sp)
    user1, reply, user2 = sp.encode("猫？"), sp.encode("一只猫。"), sp.encode("颜色？")
    assert rendered.input_ids == [USER_ID, *user1, ASSISTANT_ID, *reply, EOS, USER_ID, *user2, ASSISTANT_ID]
    assert [t for t in rendered.labels if t != IGNORE_INDEX] == reply + [EOS]


def test_baichuan_has_no_system_role(sp):
    with pytest.raises(TemplateError, match="no system role"):
        render(get_template("baichuan"), conversation_from_record(record("a", "b", system="Be brief.")), sp)


@pytest.mark.slow
def test_baichuan2_prompt_and_training_labels(sp):
    template = get_template("baichuan2")
    prompt = render(template, conversation_from_record(record("a", "b", "c", system="S")), sp)
    s, a, b, c = (sp.encode(x) for x in "Sabc")
    assert prompt.input_ids == [*s, USER_ID, *a, ASSISTANT_ID, *b, USER_ID, *c, ASSISTANT_ID]

    train = render(template, conversation_from_record(record("a", "b", "c", "d")), sp)
    d = sp.encode("d")
    assert train.input_ids == [USER_ID, *a, ASSISTANT_ID, *b, USER_ID, *c, ASSISTANT_ID, *d, EOS]
    # As Baichuan2's fine-tune script: the user token after a reply is labelled eos; the final eos is learnt.
    expected = [IGNORE_INDEX] * (2 + len(a)) + b + [EOS] + [IGNORE_INDEX] * (len(c) + 1) + d + [EOS]
    assert train.labels == expected


def test_caption_refuses_text_prompts(sp):
    with pytest.raises(TemplateError, match="image-only prompt"):
        render(get_template("caption"), conversation_from_record(record("<image> describe", "x", image="a")), sp)


def test_backbone_system_text_does_not_reach_a_system_less_template(sp):
    # A stage-1 caption stage on a backbone with a default system text (Qwen-Chat) must still render.
    caption = conversation_from_record({"image": "a", "caption": "x"})
    with_default = render(get_template("caption"), caption, sp, system="You are a helpful assistant.")
    assert with_default.input_ids == render(get_template("caption"), caption, sp).input_ids
    with pytest.raises(TemplateError, match="no system role"):
        render(get_template("caption"), conversation_from_record({"image": "a", "caption": "x", "system": "S"}), sp)


def test_truncation_drops_whole_exchanges_from_the_end(qwen):
    template = get_template("chatml")
    turns = ["<image> hello", "cat", "hello hello hello", "cat cat cat cat", "hello", "cat"]
    conversation = conversation_from_record(record(*turns, image="a.jpg"))
    full = render(template, conversation, qwen)
    two = render(template, conversation.truncated(4), qwen)
    one = render(template, conversation.truncated(2), qwen)
    assert len(one.input_ids) < len(two.input_ids) < len(full.input_ids)

    cut = render(template, conversation, qwen, max_length=len(full.input_ids) - 1)
    assert cut.input_ids == two.input_ids and cut.labels == two.labels
    cut = render(template, conversation, qwen, max_length=len(two.input_ids) - 1)
    assert cut.input_ids == one.input_ids and cut.images == one.images  # the image is never cut
    with pytest.raises(TemplateError, match="first exchange alone"):
        render(template, conversation, qwen, max_length=len(one.input_ids) - 1)


def test_too_long_prompt_is_an_error(qwen):
    conversation = conversation_from_record(record("hello " * 50))
    with pytest.raises(TemplateError, match="over the maximum length 10"):
        render(get_template("chatml"), conversation, qwen, max_length=10)


def test_nothing_supervised_is_rejected_not_all_masked(qwen):
    conversation = conversation_from_record(record("hello", "cat"))
    quiet = dataclasses.replace(
        conversation, messages=tuple(dataclasses.replace(m, supervised=False) for m in conversation.messages)
    )
    with pytest.raises(TemplateError, match="no supervised token"):
        render(get_template("chatml"), quiet, qwen)


def test_images_get_slots_in_order_with_their_index(qwen):
    conversation = conversation_from_record(
        {"image": ["a", "b"], "conversations": [{"from": "human", "value": "<image><image>hello"}, {"from": "gpt", "value": "cat"}]}
    )
    rendered = render(get_template("chatml"), conversation, qwen, num_query_tokens=4)
    (s0, n0), (s1, n1) = rendered.images
    assert n0 == n1 == 4 and s1 > s0 + 4  # </Img><Img> text between the two images
    assert rendered.image_indices == [0, 1]
    assert all(rendered.labels[s0 + k] == IGNORE_INDEX for k in range(4))
    assert rendered.text.count("<ImageHere>") == 2


def test_conversation_system_beats_backbone_and_template_defaults(qwen):
    template = get_template("chatml")
    plain = conversation_from_record(record("hello", "cat"))
    assert "You are a helpful assistant." in render(template, plain, qwen).text
    assert "Backbone." in render(template, plain, qwen, system="Backbone.").text
    own = conversation_from_record(record("hello", "cat", system="Mine."))
    assert "Mine." in render(template, own, qwen, system="Backbone.").text


def test_control_token_missing_from_tokenizer_is_named(sp):
    with pytest.raises(TemplateError, match="'<\\|im_start\\|>' as a single token"):
        render(get_template("chatml"), conversation_from_record(record("a", "b")), sp)


def test_stop_ids_and_strings(qwen, sp):
    assert stop_ids(get_template("chatml"), qwen) == [qwen.token_to_id("<|endoftext|>"), qwen.token_to_id("<|im_end|>")]
    assert stop_ids(get_template("baichuan2"), sp) == [EOS]
    assert get_template("minigpt4-vicuna0").stop_strings == ("###",)

