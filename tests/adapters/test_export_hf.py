"""`align export hf`: a directory plain transformers loads as Blip2ForConditionalGeneration, whose processor, chat
template and greedy generate give exactly what `align chat` gives — for a hand-written template (the demo's ChatML,
with MiniGPT-4's <Img></Img> wrapper) and a model's own chat template (hf-chat)."""

import json

import pytest
import torch
from PIL import Image

from align.adapters.adapter_files import AdapterConfig, save_adapter
from align.adapters.projector import build_projector
from align.backbones.registry import get_backbone
from align.constants import DEFAULT_QUESTION
from align.tools.feature_store import FeatureStore
from align.tools.generation import GenerationOptions
from align.tools.pipeline import Pipeline
from conftest import run_align

pytestmark = pytest.mark.slow


def transformers_answer(export, image, question: str, turns: list[tuple[str, str]] = (),
                        **options) -> tuple[str, list[int]]:
    """What a user of plain transformers gets from the export (the README's snippet): the reply and its new ids."""
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(export)
    model = Blip2ForConditionalGeneration.from_pretrained(export)
    messages = []
    for k, (asked, said) in enumerate([*turns, (question, None)]):
        content = [{"type": "image"}, {"type": "text", "text": asked}] if k == 0 else asked
        messages.append({"role": "user", "content": content})
        if said is not None:
            messages.append({"role": "assistant", "content": said})
    prompt = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=Image.open(image), text=prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**inputs, generation_config=model.generation_config, **options)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return processor.decode(new, skip_special_tokens=True).strip(), new


def test_the_demo_export_answers_as_align_chat_does(demo, tmp_path):
    ws, _, home = demo
    out = tmp_path / "hf"
    result = run_align("export", "hf", "--adapter", ws / "runs/chat/adapter", "--encoder", ws / "encoder", "--model",
                       ws / "llm", "--out", out, home=home)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["chat_template.jinja", "config.json", "generation_config.json",
                                                     "model.safetensors", "processor_config.json", "tokenizer.json",
                                                     "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Blip2ForConditionalGeneration"] and config["num_query_tokens"] == 8
    from transformers import AutoTokenizer

    written = AutoTokenizer.from_pretrained(out).apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}], add_generation_prompt=True,
        tokenize=False)
    assert written == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<Img>"
                       + "<image>" * 8 + "</Img> Hi<|im_end|>\n<|im_start|>assistant\n")  # where align puts its slots
    pipeline = Pipeline.load(ws / "runs/chat/adapter", model=ws / "llm", encoder=ws / "encoder", device="cpu")
    for image in sorted((ws / "images" / "held_out").glob("*.png"))[::7]:
        [ours] = pipeline.replies([pipeline.prompt([(DEFAULT_QUESTION, None)], True)], pipeline.image_features([image]),
                                  GenerationOptions())
        theirs, ids = transformers_answer(out, image, DEFAULT_QUESTION)
        assert (theirs, len(ids)) == (ours.text, ours.tokens) and ours.text.startswith("It is a ")
    image = sorted((ws / "images" / "held_out").glob("*.png"))[3]
    first = pipeline.generate(image, DEFAULT_QUESTION)
    session_answer = run_align("chat", "--adapter", ws / "runs/chat/adapter", "--model", ws / "llm", "--encoder",
                               ws / "encoder", "--image", image, "--question", DEFAULT_QUESTION, "--question",
                               "What colour is it?", home=home).stdout.splitlines()
    assert transformers_answer(out, image, "What colour is it?", [(DEFAULT_QUESTION, first)])[0] == session_answer[1]


@pytest.mark.parametrize("backbone, template", [("tiny-qwen2", "hf-chat"), ("tiny-llama", "vicuna-v1.1")])
def test_a_registered_backbone_exports_with_its_template(train_workspace, tiny_blip2, tmp_path, monkeypatch,
                                                         backbone, template):
    """A model's own chat template (Qwen2, byte-level BPE) and Vicuna's (LLaMA's SentencePiece, bos in the text)."""
    monkeypatch.setenv("ALIGN_HOME", str(train_workspace["home"]))
    spec = get_backbone(backbone)
    store = FeatureStore.open(train_workspace["features"])
    torch.manual_seed(3)
    projector = build_projector("linear", 24, spec.hidden_size)
    config = AdapterConfig.for_backbone(spec, projector="linear", in_features=24, template=template, num_query_tokens=4,
                                        encoder_fingerprint=store.meta["encoder_fingerprint"], stage="chat", step=1)
    adapter = save_adapter(tmp_path / "adapter", config, projector.state_dict())
    out = tmp_path / "hf"
    result = run_align("export", "hf", "--adapter", adapter, "--encoder", tiny_blip2[1], "--out", out,
                       home=train_workspace["home"])
    assert result.returncode == 0, result.stderr[-2000:]
    pipeline = Pipeline.load(adapter, encoder=tiny_blip2[1], device="cpu")
    options = GenerationOptions(max_new_tokens=12)
    for i in (0, 5):
        image = train_workspace["manifest"].parent / f"{i}.png"
        [ours] = pipeline.replies([pipeline.prompt([(DEFAULT_QUESTION, None)], True, 12)], pipeline.image_features([image]),
                                  options)
        _, ids = transformers_answer(out, image, DEFAULT_QUESTION, max_new_tokens=12)
        # The same ids: read with align's own tokenizer (a random LLM says broken bytes, which decoders show apart).
        theirs = pipeline.tokenizer.decode([i for i in ids if i not in pipeline.stops.ids]).strip()
        assert (theirs, len(ids)) == (ours.text, ours.tokens) and ours.tokens > 3


def test_what_blip_2_cannot_hold_is_refused_in_one_line(train_workspace, tiny_blip2, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_HOME", str(train_workspace["home"]))
    spec = get_backbone("tiny-llama")
    store = FeatureStore.open(train_workspace["features"])
    config = AdapterConfig.for_backbone(spec, projector="mlp2x_gelu", in_features=24, template="vicuna-v1.1",
                                        num_query_tokens=4, encoder_fingerprint=store.meta["encoder_fingerprint"],
                                        stage="chat")
    adapter = save_adapter(tmp_path / "mlp", config, build_projector("mlp2x_gelu", 24, spec.hidden_size).state_dict())
    result = run_align("export", "hf", "--adapter", adapter, "--encoder", tiny_blip2[1], "--out", tmp_path / "x",
                       home=train_workspace["home"])
    assert result.returncode == 2 and "one linear layer" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists()
