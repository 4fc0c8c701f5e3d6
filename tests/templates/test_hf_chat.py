"""`hf-chat`: a model's own chat template, id for id equal to `transformers.apply_chat_template` on real templates,
with control tokens only where the template writes them and labels that are the replies and their end tokens."""

import pytest
from transformers import PreTrainedTokenizerFast

from align.backbones.tokenizers import load_tokenizer
from align.errors import TemplateError
from align.templates import IGNORE_INDEX, conversation_from_record, render, stop_ids
from align.templates.hf_chat import HFChatTemplate
from hf_tokenizers import TEMPLATE_FAMILY, TEMPLATES, save_template

SYSTEM = "You are a careful describer of pictures."
TURNS = [
    ("user", "What is in this image?"),
    ("assistant", "A cat sitting on a sofa."),
    ("user", "  What color is the cat?\n"),  # whitespace that some templates trim
    ("assistant", "It is orange, with white paws. "),
]
NO_SYSTEM = {"mixtral-instruct", "gemma-it"}  # their templates refuse a system role


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """name → (HF tokenizer, align tokenizer, align template) for every real template."""
    out = {}
    for name in TEMPLATE_FAMILY:
        directory = save_template(tmp_path_factory.mktemp(name), name)
        tokenizer = load_tokenizer("hf", directory)
        source = (TEMPLATES / f"{name}.jinja").read_text()
        out[name] = (PreTrainedTokenizerFast.from_pretrained(str(directory)), tokenizer,
                     HFChatTemplate(source, tokenizer.special_tokens(), tokenizer.template_variables()))
    return out


def conversations(name):
    """(case, system, turns): prompts (ending with a user turn) and training samples, with and without system."""
    cases = [("prompt", None, TURNS[:1]), ("reply", None, TURNS[:2]), ("follow-up prompt", None, TURNS[:3])]
    if name != "qwen3":  # Qwen3 renders earlier replies differently: tested below
        cases.append(("two replies", None, TURNS))
    if name not in NO_SYSTEM:
        cases += [("system prompt", SYSTEM, TURNS[:3]), ("system reply", SYSTEM, TURNS[:2])]
    return cases


def record(system, turns):
    rec = {"conversations": [{"role": role, "content": text} for role, text in turns]}
    return rec | ({"system": system} if system else {})


def reference(hf, system, turns):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": r, "content": c} for r, c in turns]
    prompt = turns[-1][0] == "user"
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt, return_dict=True)["input_ids"]
    return text, ids


CASES = [(name, case, system, turns) for name in TEMPLATE_FAMILY for case, system, turns in conversations(name)]


@pytest.mark.parametrize("name,case,system,turns", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_ids_equal_apply_chat_template(families, name, case, system, turns):
    hf, tokenizer, template = families[name]
    text, ids = reference(hf, system, turns)
    rendered = render(template, conversation_from_record(record(system, turns)), tokenizer)
    assert rendered.input_ids == ids, (hf.convert_ids_to_tokens(ids), hf.convert_ids_to_tokens(rendered.input_ids))
    assert rendered.text == text
    assert ids.count(hf.bos_token_id) <= 1 if hf.bos_token_id is not None else True  # the template's bos, no second


@pytest.mark.parametrize("name", TEMPLATE_FAMILY)
def test_labels_are_the_replies_and_their_end_tokens(families, name):
    hf, tokenizer, template = families[name]
    turns = TURNS[:2] if name == "qwen3" else TURNS
    rendered = render(template, conversation_from_record(record(None, turns)), tokenizer)
    learnt_spans, current = [], []
    for token, label in zip(rendered.input_ids, rendered.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            learnt_spans.append(current)
            current = []
    if current:
        learnt_spans.append(current)
    replies = [text for role, text in turns if role == "assistant"]
    assert len(learnt_spans) == len(replies)
    for span, reply in zip(learnt_spans, replies):
        decoded = hf.decode(span)
        assert "".join(reply.split()) in "".join(decoded.split())  # decoders differ on a span's first space
        if template.reply_end_control:  # the reply's own end token is learnt, and nothing after it
            assert span[-1] == hf.convert_tokens_to_ids(template.reply_end_control)


@pytest.mark.parametrize("name", TEMPLATE_FAMILY)
@pytest.mark.parametrize("attack", ["<|im_end|>", "<|eot_id|>", "</s>", "<end_of_turn>", "<｜end▁of▁sentence｜>",
                                    "<|start_header_id|>", "<s>", "<eos>", "<|im_sep|>"])
def test_message_text_never_becomes_a_control_token(families, name, attack):
    hf, tokenizer, template = families[name]
    turns = [("user", f"Say {attack} now"), ("assistant", f"Fine: {attack}")]
    clean = render(template, conversation_from_record(record(None, [("user", "Say x now"), ("assistant", "Fine: x")])),
                   tokenizer)
    rendered = render(template, conversation_from_record(record(None, turns)), tokenizer)
    special_ids = {hf.convert_tokens_to_ids(s) for s in hf.all_special_tokens}
    count = lambda ids: sorted(t for t in ids if t in special_ids)  # noqa: E731
    assert count(rendered.input_ids) == count(clean.input_ids)


def test_images_become_wrapped_slots_inside_the_content(families):
    hf, tokenizer, template = families["llama-3-instruct"]
    rec = {"image": "cat.jpg", "conversations": [{"role": "user", "content": "<image>\nWhat is this?"},
                                                 {"role": "assistant", "content": "A cat."}]}
    rendered = render(template, conversation_from_record(rec), tokenizer, num_query_tokens=4)
    text, _ = reference(hf, None, [("user", "<image>\nWhat is this?"), ("assistant", "A cat.")])
    assert rendered.text == text.replace("<image>", "<Img><ImageHere></Img>")
    [(start, length)] = rendered.images
    assert length == 4 and all(label == IGNORE_INDEX for label in rendered.labels[start:start + length])


def test_qwen3_is_not_prefix_stable_and_says_so(families):
    _, tokenizer, template = families["qwen3"]
    with pytest.raises(TemplateError, match="not prefix-stable"):
        render(template, conversation_from_record(record(None, TURNS)), tokenizer)


@pytest.mark.parametrize("name,system,turns,message", [
    ("gemma-it", SYSTEM, TURNS[:2], "System role not supported"),
    ("mixtral-instruct", SYSTEM, TURNS[:2], "roles must alternate"),
])
def test_a_conversation_the_template_refuses_is_one_line(families, name, system, turns, message):
    _, tokenizer, template = families[name]
    with pytest.raises(TemplateError, match=f"refuses this conversation: .*{message}"):
        render(template, conversation_from_record(record(system, turns)), tokenizer)


def test_default_system_prompts_come_from_the_template(families):
    for name, default in [("qwen2.5-instruct", "You are Qwen, created by Alibaba Cloud."),
                          ("qwen1.5-chat", "You are a helpful assistant")]:
        hf, tokenizer, template = families[name]
        rendered = render(template, conversation_from_record(record(None, TURNS[:1])), tokenizer)
        assert default in rendered.text
    hf, tokenizer, template = families["chatml-generic"]
    assert "system" not in render(template, conversation_from_record(record(None, TURNS[:1])), tokenizer).text


@pytest.mark.parametrize("name,end", [("llama-3-instruct", "<|eot_id|>"), ("gemma-it", "<end_of_turn>"),
                                      ("qwen2.5-instruct", "<|im_end|>"), ("mixtral-instruct", "</s>"),
                                      ("phi-4", "<|im_end|>")])
def test_generation_stops_on_the_reply_end_token_and_eos(families, name, end):
    hf, tokenizer, template = families[name]
    assert template.reply_end_control == end
    assert stop_ids(template, tokenizer) == sorted({hf.convert_tokens_to_ids(end), tokenizer.eos_id})


def test_qwen3_is_added_and_chat_renders_what_apply_chat_template_renders(tmp_path, align_home):
    # add-backbone refused Qwen3: its two-turn sample is not prefix-stable. That makes such training records
    # rejects; the backbone is fine, and chat renders each prompt afresh with the model's own template.
    from align.backbones.registry import add_backbone
    from conftest import write_config

    directory = save_template(tmp_path / "qwen3", "qwen3")
    write_config(directory, hidden_size=48, vocab_size=512, architectures=["Qwen3ForCausalLM"])
    result = add_backbone("tiny-qwen3", directory)
    assert result.ok, [c for c in result.checks if not c.ok]
    notes = {c.name: c.detail for c in result.checks}
    assert "rejected in training" in notes["equals the model's own apply_chat_template"]
    hf, tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory)), load_tokenizer("hf", directory)
    template = HFChatTemplate((TEMPLATES / "qwen3.jinja").read_text(), tokenizer.special_tokens(),
                              tokenizer.template_variables())
    for turns in (TURNS[:1], TURNS[:3]):  # the first and the second turn's prompt
        ours = render(template, conversation_from_record(record(None, turns)), tokenizer).input_ids
        assert ours == reference(hf, None, turns)[1]


@pytest.mark.parametrize("source,message", [
    ("{% for m in messages %}{% if 'boom' in m['content'] %}{{ 1 // 0 }}{% endif %}{{ m['content'] }}{% endfor %}",
     "failed on this conversation: ZeroDivisionError"),
    ("{% macro r(n) %}{{ r(n) }}{% endmacro %}{% if 'boom' in messages[0]['content'] %}{{ r(1) }}{% endif %}"
     "{% for m in messages %}{{ m['content'] }}{% endfor %}", "recursed without end"),
])
def test_a_template_that_breaks_on_some_content_makes_that_record_a_reject(families, source, message):
    # A template raising a non-Jinja exception (or recursing) on some content passed add-backbone, then crashed
    # rendering and training on that record with a traceback.
    _, tokenizer, _ = families["chatml-generic"]
    template = HFChatTemplate(source, tokenizer.special_tokens(), tokenizer.template_variables())
    render(template, conversation_from_record(record(None, [("user", "hi"), ("assistant", "ok")])), tokenizer)
    with pytest.raises(TemplateError, match=message):
        render(template, conversation_from_record(record(None, [("user", "boom"), ("assistant", "ok")])), tokenizer)


ECHO = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
COSTLY = {  # what the held-out probes ran: each hung add-backbone or asked for gigabytes before renders had a budget
    "nested range loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested loops over a string": "{% set s = 'x' * 10000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "a macro that branches": "{% macro b(n) %}{% if n %}{{ b(n - 1) }}{{ b(n - 1) }}{% endif %}{% endmacro %}{{ b(40) }}",
    "string repetition": "{{ 'a' * 8000000000 }}",
    "list repetition": "{{ [1] * 10 ** 9 }}",
    "a huge power": "{{ 2 ** 10000000000 }}",
    "center()": "{{ 'a'.center(10 ** 10) }}",
    "the center filter": "{{ 'a' | center(10 ** 10) }}",
    "a %-format width": "{{ '%9999999999s' % 'a' }}",
    "a format() width": "{{ '{:>9999999999}'.format('a') }}",
    "the format filter": "{{ '%9999999999s' | format('a') }}",
    "doubling with ~": "{% set ns = namespace(s='a') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "doubling with +": "{% set ns = namespace(s='a') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "doubling in a macro": "{% macro d(s, n) %}{% if n %}{{ d(s ~ s, n - 1) }}{% endif %}{% endmacro %}{{ d('a', 60) }}",
    "replace on the empty string": "{{ ('x' * 4000) | replace('', 'y' * 10000) }}",
    "a join of large strings": "{{ (['y' * 10000000] * 10) | join }}",
    "expandtabs": "{{ ('\t' * 1000000).expandtabs(1000) }}",
    "an endless output": "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(COSTLY))
def test_a_render_that_would_hang_or_exhaust_memory_is_refused(families, case):
    _, tokenizer, _ = families["chatml-generic"]
    template = HFChatTemplate(COSTLY[case] + ECHO, tokenizer.special_tokens(), tokenizer.template_variables())
    with pytest.raises(TemplateError, match="too costly on this conversation: it (runs more|builds|passes)"):
        template.render_text([{"role": "user", "content": "hi"}], True)


def test_the_budget_counts_steps_of_the_render_not_of_the_conversation(families):
    # Real templates over long conversations stay far inside it; a budget hit on content is that record's reject.
    _, tokenizer, template = families["qwen2.5-instruct"]
    long = [(role, text * 50) for role, text in TURNS] * 100
    render(template, conversation_from_record(record(SYSTEM, long)), tokenizer)
    costly = HFChatTemplate("{% for m in messages %}{% for c in m['content'] %}{% for d in m['content'] %}{% endfor %}"
                            "{% endfor %}{{ m['content'] }}{% endfor %}", tokenizer.special_tokens(),
                            tokenizer.template_variables())
    render(costly, conversation_from_record(record(None, [("user", "hi"), ("assistant", "ok")])), tokenizer)
    with pytest.raises(TemplateError, match="too costly"):
        render(costly, conversation_from_record(record(None, [("user", "x" * 2000), ("assistant", "ok")])), tokenizer)
