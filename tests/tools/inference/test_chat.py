"""Chat and generation: the Python pipeline, the REPL, `align chat` and `align caption` on a tiny LLaMA."""

import io
import json

import pytest
import torch

from align.adapters.adapter_files import AdapterError, load_adapter, save_adapter
from align.errors import AlignError
from align.tools.inference.caption import caption_manifest
from align.tools.rejects import rejects_path
from align.tools.inference.chat_repl import open_session, run_repl
from align.tools.inference.chat_session import open_chat
from align.tools.generation import GenerationOptions, Reply, Stops
from align.tools.pipeline import Pipeline
from conftest import run_align

GREEDY = GenerationOptions(max_new_tokens=6)


@pytest.fixture
def home(train_workspace, monkeypatch):
    monkeypatch.setenv("ALIGN_HOME", str(train_workspace["home"]))
    return train_workspace


@pytest.fixture
def pipeline(home, adapter, tiny_blip2):
    return Pipeline.load(adapter, encoder=tiny_blip2[1], device="cpu")


def image(workspace, i):
    return workspace["manifest"].parent / f"{i}.png"


def manual_greedy(pipeline, prompt, features, steps, penalty=1.0):
    """Greedy decoding by hand through VisionLLM.forward: what generate() must reproduce. The repetition `penalty`
    applies to the ids of the text seen so far (image slots are no tokens)."""
    ids, mask = list(prompt.input_ids), [False] * len(prompt.input_ids)
    for start, length in prompt.images:
        mask[start:start + length] = [True] * length
    out = []
    for _ in range(steps):
        logits = pipeline.model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                                torch.tensor([mask]), features).logits[0, -1].clone()
        seen = torch.tensor(sorted({i for i, image_slot in zip(ids, mask) if not image_slot}))
        logits[seen] = torch.where(logits[seen] < 0, logits[seen] * penalty, logits[seen] / penalty)
        token = int(logits[:pipeline.tokenizer.vocab_size].argmax())  # ids past the tokenizer never come
        if token in pipeline.stops.ids:
            break
        out.append(token)
        ids, mask = ids + [token], mask + [False]
    return pipeline.tokenizer.decode(out).strip()


def test_generation_reads_the_image_through_the_projector(pipeline, home):
    features = pipeline.image_features([image(home, 0)])
    prompt = pipeline.prompt([("What is in this picture?", None)], with_image=True)
    reply = pipeline.generate(image(home, 0), "What is in this picture?", GREEDY)
    assert reply == manual_greedy(pipeline, prompt, features, 6)
    assert len(prompt.images) == 1 and prompt.images[0][1] == 4
    other = manual_greedy(pipeline, prompt, pipeline.image_features([image(home, 1)]) * 40, 6)
    assert other != reply  # the image slots steer the answer


def test_the_repetition_penalty_counts_text_not_image_slots(pipeline, home):
    # Image slots hold the pad id; a penalty (or reward) on it changed replies, and for backbones whose pad is a stop
    # id the reply ran on. The slots' id is made the stop id here, rewarded strongly: only text may count.
    features = pipeline.image_features([image(home, 0)])
    prompt = pipeline.prompt([("Describe this image.", None)], with_image=True)
    stop = pipeline.stops.ids[0]
    for start, length in prompt.images:
        prompt.input_ids[start:start + length] = [stop] * length
    for penalty in (1.5, 0.02):
        options = GenerationOptions(max_new_tokens=6, repetition_penalty=penalty)
        assert pipeline.generate_batch([prompt], features, options) == \
            [manual_greedy(pipeline, prompt, features, 6, penalty=penalty)]


def test_a_pil_image_and_its_path_give_the_same_answer(pipeline, home):
    from PIL import Image

    with Image.open(image(home, 4)) as picture:
        assert pipeline.generate(picture, "Describe this image.", GREEDY) == \
            pipeline.generate(image(home, 4), "Describe this image.", GREEDY)


def test_left_padded_batch_equals_one_by_one(pipeline, home):
    questions = ["Describe this image.", "What colour is the picture in front of you, please?", "Hi"]
    features = pipeline.image_features([image(home, i) for i in range(3)])
    prompts = [pipeline.prompt([(q, None)], with_image=True) for q in questions]
    assert len({len(p.input_ids) for p in prompts}) == 3
    batched = pipeline.generate_batch(prompts, features, GREEDY)
    alone = [pipeline.generate_batch([p], features[i:i + 1], GREEDY)[0] for i, p in enumerate(prompts)]
    assert batched == alone


def test_streamed_pieces_join_to_the_reply(pipeline, home):
    pieces = []
    reply = pipeline.generate(image(home, 2), "Describe this image.", GenerationOptions(max_new_tokens=10),
                              on_text=pieces.append)
    assert "".join(pieces) == reply and len(pieces) > 1
    with pytest.raises(AlignError, match="streaming needs no beam search"):
        pipeline.generate(image(home, 2), "Hi", GenerationOptions(num_beams=2), on_text=pieces.append)


def test_a_batch_streams_each_row_its_own_reply_and_a_cancelled_row_ends_alone(pipeline, home):
    import threading

    questions = ["Describe this image.", "What is in this picture?", "Hi"]
    prompts = [pipeline.prompt([(q, None)], True) for q in questions]
    features = pipeline.image_features([image(home, i) for i in range(3)])
    options = GenerationOptions(max_new_tokens=12)
    alone = [pipeline.replies([p], features[i:i + 1], options)[0] for i, p in enumerate(prompts)]
    pieces, cancel = [[], [], []], [None, threading.Event(), None]

    def watching(i):
        def on_text(text):
            pieces[i].append(text)
            if i == 1 and len(pieces[1]) == 2:
                cancel[1].set()  # that client leaves after two pieces
        return on_text

    batched = pipeline.replies(prompts, features, options, on_text=[watching(i) for i in range(3)], cancel=cancel)
    assert [r.text for r in (batched[0], batched[2])] == [alone[0].text, alone[2].text]
    assert [(r.tokens, r.finish) for r in (batched[0], batched[2])] == [(a.tokens, a.finish) for a in (alone[0], alone[2])]
    assert ["".join(p) for p in (pieces[0], pieces[2])] == [batched[0].text, batched[2].text]
    assert batched[1].finish == "cancelled" and batched[1].tokens < alone[1].tokens
    assert alone[1].text.startswith(batched[1].text) and "".join(pieces[1]).startswith(batched[1].text[:1])


def test_sampling_and_beam_options_run_and_bad_options_are_refused(pipeline, home):
    sampled = pipeline.generate(image(home, 0), "Hi", GenerationOptions(max_new_tokens=5, temperature=0.8, top_p=0.9,
                                                                      repetition_penalty=1.3))
    beams = pipeline.generate(image(home, 0), "Hi", GenerationOptions(max_new_tokens=5, num_beams=3))
    assert isinstance(sampled, str) and isinstance(beams, str)
    with pytest.raises(AlignError, match="top-p must be in"):
        GenerationOptions(top_p=0)
    with pytest.raises(AlignError, match="temperature must be 0"):
        GenerationOptions(temperature=-1)


def test_stop_strings_end_replies_and_are_never_shown():
    stops = Stops(ids=(2,), strings=("###",))
    assert stops.cut("a red square###Human: hi") == "a red square"
    assert stops.held_back("a red square#") == 1 and stops.held_back("a red square##") == 2
    assert stops.held_back("a red square") == 0


def test_chat_session_keeps_history_and_a_new_image_starts_over(pipeline, home):
    session = open_chat(pipeline, image(home, 0))
    first = session.ask("Describe this image.", GREEDY)
    session.ask("And the colour?", GREEDY)
    assert [q for q, _ in session.turns] == ["Describe this image.", "And the colour?"]
    prompt = pipeline.prompt([*session.turns, ("More?", None)], with_image=True)
    assert first in prompt.text and prompt.text.count("<ImageHere>") == 1
    session.clear()
    assert session.turns == [] and session.features is not None
    session.ask("Describe this image.", GREEDY)
    session.set_image(image(home, 1))
    assert session.turns == []


def test_keeping_the_kv_cache_across_turns_changes_no_reply(pipeline, home):
    from align.tools.inference.chat_session import ChatSession

    questions = ["Describe this image.", "And the colour?", "And the shape?", "Describe this image."]
    replies = {}
    for keep in (False, True):
        session = ChatSession(pipeline, keep_cache=keep)
        session.set_image(image(home, 0))
        replies[keep] = [session.ask(q, GREEDY) for q in questions]
        session.clear()  # the cache goes with the conversation
        replies[keep].append(session.ask("What is it?", GREEDY))
        session.set_image(image(home, 1))
        replies[keep] += [session.ask(q, GREEDY) for q in questions[:2]]
    assert replies[True] == replies[False]
    assert session.cache is not None and session.cache.kv is not None  # kept by default


def test_the_kv_cache_is_not_reused_when_the_prompt_differs_before_the_image(pipeline, home):
    # A kept turn's keys and values are reused up to the first id that differs; generate() embeds the rest from ids,
    # where image slots hold placeholder ids: the image was lost when it lay past that point.
    from dataclasses import replace

    from align.tools.generation import TurnCache

    features = pipeline.image_features([image(home, 3)]) * 40
    first = pipeline.prompt([("Describe this image.", None)], with_image=True)
    slot = first.images[0][0]
    changed = replace(first, input_ids=first.input_ids[:slot - 2] + [first.input_ids[1]] + first.input_ids[slot - 1:])
    options = GenerationOptions(max_new_tokens=8)
    cache = TurnCache()
    pipeline.generate_batch([first], features, options, cache=cache)
    with_cache = pipeline.generate_batch([changed], features, options, cache=cache)
    assert with_cache == pipeline.generate_batch([changed], features, options)
    assert cache.ids[:len(changed.input_ids)] == changed.input_ids  # the prompt's own ids are kept for the next turn


def test_old_exchanges_are_dropped_when_the_prompt_would_not_fit(pipeline):
    turns = [("Describe this image. " * 10, "A cat sitting on a sofa. " * 10)] * 6 + [("What now?", None)]
    prompt = pipeline.prompt(turns, with_image=True, room=64)
    assert len(prompt.input_ids) + 64 <= pipeline.max_positions
    assert prompt.text.count("<ImageHere>") == 1 and "What now?" in prompt.text
    # One question longer than the context alone ran past it; it is refused.
    with pytest.raises(AlignError, match="past the model's context of"):
        pipeline.prompt([("Describe this image. " * 200, None)], with_image=True, room=64)


def test_a_question_that_fits_gets_the_rest_of_the_context_for_its_reply(pipeline, home, monkeypatch):
    # With max_new_tokens past what the context leaves, every question was refused (align caption rejected every
    # record of the demo's held-out set); the reply is cut at the context instead.
    from dataclasses import replace

    from align.tools import pipeline as pipeline_module

    options = replace(GREEDY, max_new_tokens=pipeline.max_positions * 2)
    prompt = pipeline.prompt([("Hi", None)], with_image=True, room=options.max_new_tokens)
    asked = []
    monkeypatch.setattr(pipeline_module, "generate_replies", lambda *args: asked.append(args[5]) or [Reply("", 0, "stop")])
    pipeline.generate_batch([prompt], pipeline.image_features([image(home, 0)]), options)
    assert asked[0].max_new_tokens == pipeline.max_positions - len(prompt.input_ids)
    with pytest.raises(AlignError, match="leaving no room for a reply"):
        pipeline.prompt([("Describe this image. " * 200, None)], with_image=True, room=1)


def test_stored_features_equal_the_encoder_run(pipeline, home):
    path = image(home, 3)
    stored = pipeline.stored_features(home["features"], str(path))
    assert torch.equal(stored, pipeline.image_features([path]))
    assert pipeline.generate(path, "Hi", GREEDY) == open_chat(pipeline, features=stored).ask("Hi", GREEDY)


def test_stored_features_of_an_image_changed_since_extraction_are_refused(pipeline, tiny_blip2, tmp_path):
    # `--features STORE` answered a changed image's path with its old features.
    from align.tools.features.extract import extract_features
    from blip2_tiny import good_image, write_manifest

    picture = good_image(tmp_path / "pic.png", (200, 50, 50))
    extract_features([write_manifest(tmp_path / "m.jsonl", [{"image": "pic.png", "caption": "x"}])], tiny_blip2[1],
                     tmp_path / "store", workers=0, progress=False)
    assert torch.equal(pipeline.stored_features(tmp_path / "store", str(picture)), pipeline.image_features([picture]))
    good_image(picture, (20, 20, 220))
    with pytest.raises(AlignError, match="changed since it was extracted: image .*pic.png"):
        pipeline.stored_features(tmp_path / "store", str(picture))


def test_a_wrong_encoder_or_store_is_refused_before_the_llm_loads(home, adapter, tiny_blip2, tmp_path, monkeypatch):
    from blip2_tiny import build_tiny_blip2, save_hf
    from align.tools import pipeline as pipeline_module
    from align.tools.features.extract import extract_features

    def never(*args, **kwargs):
        raise AssertionError("the LLM was loaded before the encoder and store were checked")

    monkeypatch.setattr(pipeline_module, "load_frozen_llm", never)
    other = save_hf(build_tiny_blip2(seed=5), tmp_path / "other-encoder")
    with pytest.raises(AdapterError, match="was trained on features of encoder"):
        Pipeline.load(adapter, encoder=other)
    store = extract_features([home["manifest"]], other, tmp_path / "other-store", workers=0, progress=False)
    with pytest.raises(AdapterError, match="holds features of encoder"):
        Pipeline.load(adapter, store=store.store)
    with pytest.raises(AdapterError, match="holds features of encoder"):
        open_session(adapter, features=tmp_path / "other-store", key="0.png")


def test_clear_errors(home, adapter, tiny_blip2, tmp_path):
    with pytest.raises(AdapterError, match="is not an adapter"):
        Pipeline.load(tmp_path / "nowhere", encoder=tiny_blip2[1])
    from blip2_tiny import build_tiny_blip2, save_hf

    other = save_hf(build_tiny_blip2(seed=5), tmp_path / "other-encoder")
    with pytest.raises(AdapterError, match="was trained on features of encoder"):
        Pipeline.load(adapter, encoder=other)
    pipeline = Pipeline.load(adapter, encoder=tiny_blip2[1])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(AlignError, match="cannot read image .*broken.png"):
        pipeline.generate(tmp_path / "broken.png", "Hi")
    with pytest.raises(AlignError, match="cannot read image .*absent.png"):
        pipeline.generate(tmp_path / "absent.png", "Hi")
    with pytest.raises(AlignError, match="needs --encoder"):
        open_session(adapter, image=image(home, 0))


def test_repl_commands(pipeline, home, tmp_path):
    lines = iter([":help", "Describe this image.", ":history", ":image " + str(tmp_path / "absent.png"),
                  ":clear", ":history", ":image " + str(image(home, 1)), ":frobnicate", "Hi", ":quit", "never read"])
    out = io.StringIO()
    session = open_chat(pipeline, image(home, 0))
    run_repl(session, GREEDY, read=lambda prompt: next(lines), out=out)
    text = out.getvalue()
    assert ":image PATH" in text and "you> Describe this image.\nbot> " in text
    assert "error: cannot read image" in text and "unknown command :frobnicate" in text
    assert "(conversation cleared; same image)" in text and "(new conversation about" in text
    assert [q for q, _ in session.turns] == ["Hi"]
    assert next(lines) == "never read"


@pytest.mark.slow
def test_chat_command_answers_questions_on_stdout(home, adapter, tiny_blip2, pipeline):
    result = run_align("chat", "--adapter", adapter, "--image", image(home, 0), "--encoder", tiny_blip2[1],
                    "--question", "Describe this image.", "--question", "And the colour?", "--max-new-tokens", 6,
                    home=home["home"], timeout=300)
    assert result.returncode == 0, result.stderr
    session = open_chat(pipeline, image(home, 0))
    expected = [session.ask("Describe this image.", GREEDY), session.ask("And the colour?", GREEDY)]
    assert result.stdout.splitlines() == expected
    missing = run_align("chat", "--adapter", adapter.parent / "missing", "--question", "Hi", home=home["home"], timeout=300)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr
    bad = run_align("chat", "--adapter", adapter, "--image", image(home, 0), "--encoder", tiny_blip2[1],
                 "--question", "Hi", "--top-p", 2, home=home["home"], timeout=300)
    assert bad.returncode == 2 and "top-p must be in" in bad.stderr


def test_caption_manifest_skips_bad_records_and_resumes(pipeline, home, tmp_path):
    data = home["manifest"].parent
    (tmp_path / "broken.png").write_bytes(b"not a png")
    records = [{"image": str(data / "0.png"), "caption": "a red picture"},
               {"image": str(data / "1.png"), "conversations": [
                   {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "green"}]},
               {"image": str(tmp_path / "broken.png"), "caption": "x"},
               {"caption": "no image"},
               {"image": str(data / "2.png"), "caption": "a blue picture"},
               {"image": str(data / "3.png"), "conversations": [  # a question longer than the model's context
                   {"from": "human", "value": "<image>\n" + "Describe this image. " * 200}]}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in records) + "\n{not json\n")
    out = tmp_path / "preds.jsonl"
    summary = caption_manifest(pipeline, manifest, out, options=GREEDY, batch_size=2, progress=False)
    assert (summary.captioned, summary.rejected) == (3, 4)
    predictions = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["line"] for p in predictions] == [1, 2, 5]
    assert predictions[1]["question"] == "What colour is it?" and predictions[1]["reference"] == "green"
    assert predictions[0]["prediction"] == pipeline.generate(data / "0.png", "Describe this image.", GREEDY)
    reasons = [json.loads(line)["reason"] for line in rejects_path(out).read_text().splitlines()]
    assert any("cannot read image" in r for r in reasons) and any("exactly one image" in r for r in reasons)
    assert any("malformed manifest line" in r for r in reasons) and any("past the model's context" in r for r in reasons)

    out.write_text(out.read_text().splitlines()[0] + "\n" + '{"line": 2, "ima')  # a write cut by a kill
    again = caption_manifest(pipeline, manifest, out, options=GREEDY, batch_size=2, progress=False)
    assert (again.already_done, again.captioned) == (1, 2)
    assert [json.loads(line)["line"] for line in out.read_text().splitlines()] == [1, 2, 5]


def test_a_predictions_file_continues_only_with_its_own_job_and_one_writer(pipeline, home, tmp_path):
    # Continued by line number alone, another prompt, adapter or manifest was silently skipped; two jobs on one
    # --out both wrote every record.
    from filelock import FileLock

    data = home["manifest"].parent
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"image": str(data / f"{i}.png"), "caption": "x"}) for i in range(3)))
    out = tmp_path / "preds.jsonl"
    caption_manifest(pipeline, manifest, out, options=GREEDY, progress=False)
    again = caption_manifest(pipeline, manifest, out, options=GREEDY, progress=False)
    assert (again.already_done, again.captioned) == (3, 0)  # the same job continues
    with pytest.raises(AlignError, match="holds predictions of another job \\(options, prompt differ\\)"):
        caption_manifest(pipeline, manifest, out, prompt="What colour is it?", options=GenerationOptions(max_new_tokens=9),
                         progress=False)
    with FileLock(tmp_path / ".preds.jsonl.lock"):  # another align caption at work on it
        with pytest.raises(AlignError, match="is being written by another align caption"):
            caption_manifest(pipeline, manifest, out, options=GREEDY, progress=False)


@pytest.mark.parametrize("template,expected", [("caption", "vicuna-v1.1"), ("minigpt4-vicuna0", "minigpt4-vicuna0"),
                                               ("chatml", None)])
def test_inference_uses_the_adapters_template_and_refuses_one_that_does_not_fit(home, adapter, tiny_blip2, tmp_path,
                                                                               template, expected):
    config, state = load_adapter(adapter)
    other = save_adapter(tmp_path / template, config.model_copy(update={"template": template}), state)
    if expected is None:  # the LLaMA tokenizer has no <|im_start|>: named with both sides
        with pytest.raises(AdapterError, match="trained with template 'chatml', which backbone 'tiny-llama' "
                                               r"\(template 'vicuna-v1.1'\) cannot write"):
            Pipeline.load(other, encoder=tiny_blip2[1], device="cpu")
        return
    assert Pipeline.load(other, encoder=tiny_blip2[1], device="cpu").template.name == expected
