"""Carrying a projector to another LLM: the converter's fit, its composition with each projector kind, and
`align transfer` between two registered tiny LLMs of different architectures and vocabularies."""

import json

import pytest
import torch

from align.adapters.adapter_files import AdapterError, load_adapter
from align.adapters.projector import build_projector
from align.adapters.transfer import compose, fit_converter
from conftest import run_align


def test_the_converter_recovers_a_linear_map_and_reports_its_held_out_fit():
    torch.manual_seed(0)
    source = torch.randn(600, 16)
    mapping, shift = torch.randn(16, 24), torch.randn(24)
    target = source @ mapping + shift + 0.01 * torch.randn(600, 24)
    converter = fit_converter(source, target)
    assert torch.allclose(converter.weight, mapping, atol=0.01) and torch.allclose(converter.bias, shift, atol=0.01)
    assert converter.held_out == 60 and converter.held_out_r2 > 0.999 and converter.held_out_cosine > 0.999
    unrelated = fit_converter(source, torch.randn(600, 24))
    assert unrelated.held_out_r2 < 0.1  # no map: the report says so
    with pytest.raises(AdapterError, match="too few to fit"):
        fit_converter(source[:2], target[:2])


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu"])
def test_the_composed_projector_is_the_projector_followed_by_the_converter(kind):
    torch.manual_seed(1)
    converter = fit_converter(torch.randn(300, 20), torch.randn(300, 20))
    projector = build_projector(kind, 12, 20)
    composed = build_projector(kind, 12, 20)
    composed.load_state_dict(compose(kind, projector.state_dict(), converter))
    features = torch.randn(5, 12)
    with torch.no_grad():
        assert torch.allclose(composed(features), projector(features) @ converter.weight + converter.bias, atol=1e-5)


def test_an_mlp_is_carried_only_between_llms_of_one_hidden_size():
    converter = fit_converter(torch.randn(300, 20), torch.randn(300, 30))
    with pytest.raises(AdapterError, match="keeps its hidden width \\(20\\).*target's hidden size is 30"):
        compose("mlp2x_gelu", build_projector("mlp2x_gelu", 12, 20).state_dict(), converter)


@pytest.mark.slow
def test_align_transfer_writes_a_warm_start_adapter_for_the_other_llm(train_workspace, adapter, tmp_path):
    home = train_workspace["home"]
    out = tmp_path / "warm"
    result = run_align("transfer", "--adapter", adapter, "--to", "tiny-qwen2", "--out", out,
                       "--corpus", train_workspace["manifest"], "--json", home=home)
    assert result.returncode == 0, result.stderr[-2000:]
    origin = json.loads(result.stdout)
    config, state = load_adapter(out)
    source, _ = load_adapter(adapter)
    assert (config.backbone, config.template, config.stage) == ("tiny-qwen2", "hf-chat", "transferred")  # its own
    assert (config.encoder_fingerprint, config.num_query_tokens, config.in_features) == (
        source.encoder_fingerprint, source.num_query_tokens, source.in_features)
    assert config.transferred_from == origin and origin["backbone"] == "tiny-llama"
    assert origin["fit"]["pairs"] > 100 and -1 <= origin["fit"]["held_out_cosine"] <= 1
    again = run_align("transfer", "--adapter", out, "--to", "tiny-qwen2", "--out", tmp_path / "x", home=home)
    assert again.returncode == 2 and "already for 'tiny-qwen2'" in again.stderr


def test_vicuna_and_qwen_share_tens_of_thousands_of_words_each_read_as_one_token(llama_tokenizer, qwen_tokenizer):
    """The pairs MiniGPT-4's projector is carried to Qwen-7B-Chat on (recipes/minigpt4qwen-7b-from-vicuna.yaml), with
    the real vocabularies: words as they stand after a space, one token on each side."""
    from align.adapters.transfer import paired_rows, shared_words

    corpus, vocabulary = shared_words(llama_tokenizer, qwen_tokenizer, ["A cat sitting on a sofa.", "这只猫是什么颜色？"])
    assert corpus == ["A", "a", "cat", "on", "sitting", "sofa", "这只猫是什么颜色"]
    assert len(vocabulary) > 20_000
    # Tables whose row i holds i: a word read as one token pairs exactly the rows of that token.
    llama_rows, qwen_rows = torch.arange(32000.0)[:, None], torch.arange(151851.0)[:, None]
    for word, llama_piece, qwen_piece in (("cat", "▁cat", " cat"), ("colour", "▁colour", " colour")):
        llama_id, qwen_ids = llama_tokenizer.token_to_id(llama_piece), qwen_tokenizer.encode(qwen_piece)
        assert len(qwen_ids) == 1
        left, right = paired_rows([word], llama_tokenizer, llama_rows, qwen_tokenizer, qwen_rows)
        assert (left.item(), right.item()) == (llama_id, qwen_ids[0])
