"""Official Qwen-1 and Baichuan checkpoints load natively, with no remote code: logits and greedy decoding equal
reference forwards written from the published architectures; conversion, quantization, training and chat work."""

import json
import logging
import shutil
from dataclasses import dataclass
from functools import partial

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from align.adapters.adapter_files import AdapterConfig, save_adapter
from align.adapters.projector import build_projector
from align.adapters.vision_llm import VisionLLM
from align.backbones import load_llm
from align.backbones.convert import convert_backbone
from align.constants import CONVERSION_NOTE
from align.backbones.llm import RemoteCodeError, remote_code_opt_in
from align.backbones.native.baichuan_alibi import BaichuanAlibiForCausalLM
from align.backbones.registry import add_backbone
from align.errors import BackboneError
from align.tools.feature_store import FeatureStore
from align.tools.generation import GenerationOptions
from align.tools.pipeline import Pipeline
from conftest import run_align, write_config
from native_checkpoints import (
    baichuan_config,
    baichuan_reference,
    baichuan_state,
    qwen1_config,
    qwen1_reference,
    qwen1_state,
    reference_greedy,
    write_checkpoint,
)

BAICHUAN2_VOCAB = 125696  # the vocabulary that marks Baichuan2 (NormHead)


@dataclass(frozen=True)
class Case:
    """One tiny official checkpoint: how it is written and its reference forward."""

    state: dict
    config: dict
    fmt: str
    shards: int
    reference: object  # (state, embeds) -> logits
    table: str  # the input embedding tensor's official name
    native: str  # the class it loads into


def _cases() -> dict[str, Case]:
    torch.manual_seed(0)
    qwen = partial(Case, reference=None, table="transformer.wte.weight", native="Qwen1ForCausalLM")
    cases = {
        "qwen1-bin": qwen(qwen1_state(300), qwen1_config(300), "bin", 1),
        "qwen1-old-naming-sharded-bin": qwen(qwen1_state(300), qwen1_config(300, naming="old"), "bin", 2),
        "qwen1-sharded-safetensors": qwen(qwen1_state(300), qwen1_config(300), "safetensors", 3),
        # wide enough (64) for whole 4-bit quantization blocks per row, as real models are
        "qwen1-8-heads": qwen(qwen1_state(300, heads=8), qwen1_config(300, heads=8), "safetensors", 1),
    }
    cases = {name: Case(**{**case.__dict__, "reference": partial(
                 qwen1_reference, heads=case.config.get("num_attention_heads") or case.config["n_head"],
                 eps=case.config["layer_norm_epsilon"])})
             for name, case in cases.items()}
    for name, vocab, heads, alibi, fmt, shards in [
        ("baichuan-7b", 300, 4, False, "bin", 1),
        ("baichuan2-7b", BAICHUAN2_VOCAB, 4, False, "safetensors", 2),
        ("baichuan-13b-4-heads", 300, 4, True, "bin", 2),
        ("baichuan2-13b-5-heads", BAICHUAN2_VOCAB, 5, True, "safetensors", 1),
    ]:
        cases[name] = Case(baichuan_state(vocab, heads), baichuan_config(vocab, heads, alibi), fmt, shards,
                           partial(baichuan_reference, heads=heads, alibi=alibi, norm_head=vocab == BAICHUAN2_VOCAB),
                           "model.embed_tokens.weight", "BaichuanAlibiForCausalLM" if alibi else "BaichuanRopeForCausalLM")
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    return {name: write_checkpoint(root / name, c.state, c.config, c.fmt, c.shards) for name, c in CASES.items()}


def _ids(case: Case, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (length,), generator=generator)


@pytest.mark.parametrize("name", CASES)
def test_logits_equal_the_published_architecture(checkpoints, name):
    case = CASES[name]
    llm = load_llm(checkpoints[name])
    assert type(llm).__name__ == case.native and not any(p.requires_grad for p in llm.parameters())
    ids = _ids(case, 9, seed=1)
    expected = case.reference(case.state, case.state[case.table][ids])
    assert (llm(input_ids=ids[None]).logits[0] - expected).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["qwen1-bin", "baichuan2-7b", "baichuan2-13b-5-heads"])
def test_greedy_generation_from_left_padded_embeddings(checkpoints, name):
    case = CASES[name]
    llm = load_llm(checkpoints[name])
    table = case.state[case.table]
    prompts = [_ids(case, n, seed=n) for n in (6, 2, 4)]
    width = max(map(len, prompts))
    embeds = torch.zeros(len(prompts), width, table.shape[1])
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, ids in enumerate(prompts):
        embeds[row, width - len(ids):], mask[row, width - len(ids):] = table[ids], 1
    out = llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, do_sample=False,
                       pad_token_id=0, eos_token_id=None)
    for row, ids in enumerate(prompts):
        assert out[row, -5:].tolist() == reference_greedy(partial(case.reference, case.state), table, table[ids], 5)


@pytest.mark.parametrize("name", ["qwen1-old-naming-sharded-bin", "baichuan2-7b", "baichuan2-13b-5-heads"])
def test_converted_directory_is_native_and_equal(checkpoints, tmp_path, align_home, name):
    case = CASES[name]
    backbone = "qwen-7b-chat" if name.startswith("qwen") else "baichuan2-13b-chat"
    (checkpoints[name] / "modeling_official.py").write_text("raise SystemExit('remote code ran')\n")
    result = convert_backbone(backbone, checkpoints[name], tmp_path / "native", dtype="fp32")
    assert "modeling_official.py" not in result.files and CONVERSION_NOTE in result.files
    config = json.loads((result.out / "config.json").read_text())
    assert config["architectures"] == [result.architecture] and "auto_map" not in config
    note = json.loads((result.out / CONVERSION_NOTE).read_text())
    assert note["source"] == str(checkpoints[name].resolve()) and note["normalised_output_rows"] == (case.config["vocab_size"] == BAICHUAN2_VOCAB)
    ids = _ids(case, 7, seed=2)
    expected = case.reference(case.state, case.state[case.table][ids])
    native = load_llm(result.out)
    assert type(native).__name__ == result.architecture
    assert (native(input_ids=ids[None]).logits[0] - expected).abs().max() < 1e-4
    if result.architecture != BaichuanAlibiForCausalLM.__name__:  # transformers alone reads it too
        plain = AutoModelForCausalLM.from_pretrained(result.out)
        assert (plain(input_ids=ids[None]).logits[0] - expected).abs().max() < 1e-4
    with pytest.raises(BackboneError, match="already exists"):
        convert_backbone(backbone, checkpoints[name], result.out)


def test_the_backbone_name_decides_baichuan2s_norm_head_not_the_vocabulary_size(tmp_path, align_home):
    # A Baichuan2 checkpoint with another vocabulary (a resized or test one) skipped NormHead: logits off by 9.
    torch.manual_seed(0)
    state, config = baichuan_state(300), baichuan_config(300)
    official = write_checkpoint(tmp_path / "official", state, config, "safetensors")
    ids = torch.randint(3, 300, (7,), generator=torch.Generator().manual_seed(2))
    normed = baichuan_reference(state, state["model.embed_tokens.weight"][ids], norm_head=True)
    plain = baichuan_reference(state, state["model.embed_tokens.weight"][ids], norm_head=False)
    assert (normed - plain).abs().max() > 1
    result = convert_backbone("baichuan2-7b-chat", official, tmp_path / "native")
    assert json.loads((result.out / CONVERSION_NOTE).read_text())["normalised_output_rows"] is True
    assert (load_llm(result.out)(input_ids=ids[None]).logits[0] - normed).abs().max() < 1e-4
    assert (load_llm(official)(input_ids=ids[None]).logits[0] - plain).abs().max() < 1e-4  # by path: Baichuan-1
    # Baichuan2's config.json carries its z-loss weight: by path alone that says Baichuan2 too.
    z_loss = write_checkpoint(tmp_path / "z-loss", state, config | {"z_loss_weight": 0}, "safetensors")
    assert (load_llm(z_loss)(input_ids=ids[None]).logits[0] - normed).abs().max() < 1e-4


def test_conversion_keeps_the_dtype_of_the_source_tensors_when_the_config_names_none(tmp_path, align_home):
    torch.manual_seed(0)
    official = write_checkpoint(tmp_path / "official", qwen1_state(300), qwen1_config(300), "safetensors")
    assert "torch_dtype" not in qwen1_config(300) and "dtype" not in qwen1_config(300)
    result = convert_backbone("qwen-7b-chat", official, tmp_path / "native")
    assert result.dtype == "fp32" and load_llm(result.out).get_input_embeddings().weight.dtype == torch.float32
    from safetensors import safe_open

    with safe_open(next(result.out.glob("*.safetensors")), "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F32"}


@pytest.mark.slow
def test_convert_backbone_cli_converts_once_and_add_backbone_takes_the_result(tmp_path, align_home, qwen_model_dir):
    torch.manual_seed(0)
    official = write_checkpoint(tmp_path / "Qwen-official", qwen1_state(480), qwen1_config(480))
    shutil.copy(qwen_model_dir / "qwen.tiktoken", official / "qwen.tiktoken")
    out = tmp_path / "Qwen-native"
    first = run_align("convert-backbone", "qwen-7b-chat", "--model", official, "--out", out, "--json",
                      home=align_home, timeout=300)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["architecture"] == "Qwen2ForCausalLM" and (out / "qwen.tiktoken").is_file()
    for model in (official, out):
        assert add_backbone("qwen-7b-chat", model, force=True).ok
    again = run_align("convert-backbone", "qwen-7b-chat", "--model", out, "--out", tmp_path / "twice",
                      home=align_home, timeout=300)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "already loads natively" in again.stderr
    assert "Traceback" not in again.stderr and not (tmp_path / "twice").exists()


@pytest.mark.parametrize("name,quantization", [("baichuan2-13b-5-heads", "8bit"), ("qwen1-8-heads", "4bit")])
def test_quantized_loading_keeps_the_output_rows(checkpoints, name, quantization, caplog):
    import bitsandbytes as bnb

    case = CASES[name]
    llm = load_llm(checkpoints[name], quantization=quantization)
    linear = bnb.nn.Linear8bitLt if quantization == "8bit" else bnb.nn.Linear4bit
    plain = {name for name, m in llm.named_modules() if type(m) is torch.nn.Linear}
    assert plain == {"lm_head"} and any(isinstance(m, linear) for m in llm.modules())  # every other projection
    head = llm.get_output_embeddings().weight
    if case.config["vocab_size"] == BAICHUAN2_VOCAB:
        assert torch.allclose(head.float().norm(dim=-1), torch.ones(head.shape[0]), atol=1e-3)
    ids = _ids(case, 6, seed=3)
    expected = case.reference(case.state, case.state[case.table][ids])
    with caplog.at_level(logging.WARNING):
        logits = llm(input_ids=ids[None]).logits[0].float()
        llm(input_ids=ids[None])
    assert torch.nn.functional.cosine_similarity(logits.flatten(), expected.flatten(), dim=0) > 0.95
    assert sum("inputs will be cast" in r.getMessage() for r in caplog.records) <= 1  # not once per matmul


def test_4bit_layers_too_narrow_for_the_cpu_packing_run_on_the_plain_kernel(checkpoints):
    # Rows 32 wide hold half a 64-weight quantization block: bitsandbytes' AVX512-BF16 CPU packing crashed on them
    # ("shape '[32, 0]' is invalid"); align keeps such layers on the plain 4-bit kernel.
    import bitsandbytes as bnb

    case = CASES["qwen1-bin"]
    llm = load_llm(checkpoints["qwen1-bin"], quantization="4bit")
    layers = [m for m in llm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in layers)
    ids = _ids(case, 6, seed=3)
    logits = llm(input_ids=ids[None]).logits[0].float()
    expected = case.reference(case.state, case.state[case.table][ids])
    assert torch.isfinite(logits).all()
    assert torch.nn.functional.cosine_similarity(logits.flatten(), expected.flatten(), dim=0) > 0.8


def test_torch_dtypes_are_taken_as_transformers_takes_them(checkpoints):
    llm = load_llm(checkpoints["qwen1-bin"], dtype=torch.bfloat16)
    assert llm.get_input_embeddings().weight.dtype == torch.bfloat16
    with pytest.raises(BackboneError, match="dtype must be one of fp32, fp16, bf16"):
        load_llm(checkpoints["qwen1-bin"], dtype=torch.int8)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen1-bin", "baichuan2-13b-5-heads"])
def test_a_training_step_reaches_only_the_projector(checkpoints, name):
    llm = load_llm(checkpoints[name])
    hidden = llm.config.hidden_size
    torch.manual_seed(0)
    model = VisionLLM(llm, build_projector("linear", 24, hidden))
    ids = torch.randint(3, 300, (2, 12))
    image_mask = torch.zeros(2, 12, dtype=torch.bool)
    image_mask[:, 1:5] = True
    labels = ids.clone()
    labels[:, :6] = -100
    features = torch.randn(2, 4, 24)
    attention = torch.ones(2, 12, dtype=torch.long)
    eval_loss = model(ids, attention, image_mask, features, labels).loss
    llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    llm.train()
    loss = model(ids, attention, image_mask, features, labels).loss
    loss.backward()
    assert torch.allclose(loss, eval_loss, atol=1e-5)  # no dropout: checkpointing's train mode changes nothing
    model.check_frozen()
    assert all(p.grad is None for p in llm.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())


def test_an_unknown_architecture_needs_the_opt_in_named_where_it_is_given(tmp_path):
    write_config(tmp_path, architectures=["MysteryForCausalLM"], auto_map={"AutoModelForCausalLM": "modeling.Mystery"})
    with pytest.raises(RemoteCodeError, match="trust_remote_code=True"):
        load_llm(tmp_path)
    with pytest.raises(RemoteCodeError, match="--trust-remote-code"), remote_code_opt_in("--trust-remote-code"):
        load_llm(tmp_path)


@pytest.fixture(scope="module")
def chat_backbones(tmp_path_factory, checkpoints, qwen_model_dir, sp_model_dir, train_workspace):
    """qwen-7b-chat on a tiny Qwen-1-layout model, baichuan-13b-chat on a tiny ALiBi one and baichuan2-7b-chat on a
    tiny RoPE one, each with an adapter."""
    root = tmp_path_factory.mktemp("chat")
    home = root / "home"
    store = FeatureStore.open(train_workspace["features"])
    torch.manual_seed(0)
    layouts = {
        "qwen-7b-chat": (qwen1_state(480), qwen1_config(480), qwen_model_dir / "qwen.tiktoken", "chatml"),
        "baichuan-13b-chat": (baichuan_state(640, heads=5), baichuan_config(640, heads=5, alibi=True),
                              sp_model_dir / "tokenizer.model", "baichuan"),
        "baichuan2-7b-chat": (baichuan_state(BAICHUAN2_VOCAB), baichuan_config(BAICHUAN2_VOCAB),
                              sp_model_dir / "tokenizer.model", "baichuan2"),
    }
    adapters = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ALIGN_HOME", str(home))
        for backbone, (state, config, tokenizer, template) in layouts.items():
            model = write_checkpoint(root / backbone, state, config)
            shutil.copy(tokenizer, model / tokenizer.name)
            result = add_backbone(backbone, model)
            assert result.ok, [c for c in result.checks if not c.ok]
            hidden = result.spec.hidden_size
            adapter = AdapterConfig(projector="linear", in_features=24, out_features=hidden, backbone=backbone,
                                    hidden_size=hidden, vocab_size=result.spec.vocab_size, template=template,
                                    num_query_tokens=4, encoder_fingerprint=store.meta["encoder_fingerprint"],
                                    stage="chat", step=1)
            projector = build_projector("linear", 24, hidden)
            adapters[backbone] = save_adapter(root / f"{backbone}-adapter", adapter, projector.state_dict())
    return home, adapters


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["qwen-7b-chat", "baichuan-13b-chat"])
def test_align_chat_answers_with_an_official_layout(chat_backbones, tiny_blip2, train_workspace, monkeypatch, backbone):
    home, adapters = chat_backbones
    picture = train_workspace["manifest"].parent / "0.png"
    result = run_align("chat", "--adapter", adapters[backbone], "--image", picture, "--encoder", tiny_blip2[1],
                       "--question", "Describe this image.", "--max-new-tokens", 5, "--dtype", "fp32",
                       home=home, timeout=300)
    assert result.returncode == 0, result.stderr
    monkeypatch.setenv("ALIGN_HOME", str(home))
    pipeline = Pipeline.load(adapters[backbone], encoder=tiny_blip2[1], device="cpu")
    answer = pipeline.generate(picture, "Describe this image.", GenerationOptions(max_new_tokens=5))
    assert answer and result.stdout.strip() == answer


@pytest.mark.slow
def test_export_hf_refuses_an_architecture_plain_transformers_does_not_have(chat_backbones, tiny_blip2, tmp_path):
    home, adapters = chat_backbones
    result = run_align("export", "hf", "--adapter", adapters["baichuan-13b-chat"], "--encoder", tiny_blip2[1], "--out",
                       tmp_path / "hf", home=home)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "BaichuanAlibiForCausalLM, an architecture transformers does not have" in result.stderr
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
@pytest.mark.parametrize("backbone, as_model", [("qwen-7b-chat", "qwen2"), ("baichuan2-7b-chat", "llama")])
def test_export_hf_writes_a_native_layout_as_the_transformers_model_it_extends(chat_backbones, tiny_blip2,
                                                                               train_workspace, tmp_path, monkeypatch,
                                                                               backbone, as_model):
    """Qwen-1 as Qwen2 with its tiktoken ranks converted; Baichuan2-7B (its output rows normalised once) as LLaMA
    with its SentencePiece model read by LLaMA's tokenizer."""
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    home, adapters = chat_backbones
    out = tmp_path / "hf"
    result = run_align("export", "hf", "--adapter", adapters[backbone], "--encoder", tiny_blip2[1], "--out", out,
                       home=home)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["text_config"]["model_type"] == as_model
    monkeypatch.setenv("ALIGN_HOME", str(home))
    pipeline = Pipeline.load(adapters[backbone], encoder=tiny_blip2[1], device="cpu")
    processor, model = AutoProcessor.from_pretrained(out), Blip2ForConditionalGeneration.from_pretrained(out)
    for i in (0, 3):
        picture = train_workspace["manifest"].parent / f"{i}.png"
        [ours] = pipeline.replies([pipeline.prompt([("Describe this image.", None)], True, 8)],
                                  pipeline.image_features([picture]), GenerationOptions(max_new_tokens=8))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
        prompt = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=Image.open(picture), text=prompt, add_special_tokens=False, return_tensors="pt")
        ids = model.generate(**inputs, generation_config=model.generation_config, max_new_tokens=8)[0, inputs["input_ids"].shape[1]:]
        theirs = pipeline.tokenizer.decode([t for t in ids.tolist() if t not in pipeline.stops.ids]).strip()
        assert (theirs, len(ids)) == (ours.text, ours.tokens)
