"""Importing MiniGPT-4 and MiniGPT4Qwen projectors: weights_only reading, shape checks, clear refusals."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.adapters.adapter_files import AdapterError, load_adapter
from align.adapters.checkpoint_import import import_checkpoint
from align.backbones.registry import get_backbone
from conftest import run_align


def test_minigpt4_checkpoint_becomes_an_adapter(tmp_path):
    weight, bias = torch.randn(4096, 768), torch.randn(4096)
    torch.save({"model": {"llama_proj.weight": weight, "llama_proj.bias": bias, "Qformer.x": torch.zeros(1)}},
               tmp_path / "prerained_minigpt4_7b.pth")
    out = import_checkpoint("minigpt4", tmp_path / "prerained_minigpt4_7b.pth", get_backbone("vicuna-7b-v0"), tmp_path / "a")
    config, state = load_adapter(out)
    assert (config.backbone, config.template, config.in_features, config.out_features) == (
        "vicuna-7b-v0", "minigpt4-vicuna0", 768, 4096)
    assert torch.equal(state["weight"], weight) and torch.equal(state["bias"], bias)


def test_minigpt4qwen_deepspeed_layout(tmp_path):
    torch.save({"module": {"module.llm_proj.weight": torch.randn(4096, 768), "module.llm_proj.bias": torch.zeros(4096)}},
               tmp_path / "mp_rank_00_model_states.pt")
    out = import_checkpoint("minigpt4qwen", tmp_path / "mp_rank_00_model_states.pt", get_backbone("qwen-7b-chat"), tmp_path / "a")
    assert load_adapter(out)[0].template == "chatml"


@pytest.mark.slow
def test_refusals(tmp_path):
    torch.save({"model": {"llama_proj.weight": torch.randn(5120, 768), "llama_proj.bias": torch.zeros(5120)}},
               tmp_path / "13b.pth")
    with pytest.raises(AdapterError, match=r"\(5120, 768\) does not fit 'vicuna-7b-v0' \(hidden size 4096\)"):
        import_checkpoint("minigpt4", tmp_path / "13b.pth", get_backbone("vicuna-7b-v0"), tmp_path / "a")
    with pytest.raises(AdapterError, match="for vicuna-7b-v0, vicuna-13b-v0, not 'qwen-7b-chat'"):
        import_checkpoint("minigpt4", tmp_path / "13b.pth", get_backbone("qwen-7b-chat"), tmp_path / "a")
    import argparse  # any object that is not tensors and containers: weights_only refuses to unpickle it

    torch.save({"model": {"llama_proj.weight": torch.zeros(1)}, "x": argparse.Namespace(a=1)}, tmp_path / "evil.pth")
    with pytest.raises(AdapterError, match="weights-only"):
        import_checkpoint("minigpt4", tmp_path / "evil.pth", get_backbone("vicuna-7b-v0"), tmp_path / "a")
    result = subprocess.run([sys.executable, "-m", "align", "import", "minigpt4", str(tmp_path / "none.pth"),
                             "--backbone", "vicuna-7b-v0", "--out", str(tmp_path / "a")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().endswith("does not exist")


@pytest.mark.slow
def test_import_never_replaces_an_adapter_unasked(tmp_path):
    torch.save({"model": {"llama_proj.weight": torch.randn(4096, 768), "llama_proj.bias": torch.randn(4096)}},
               tmp_path / "ckpt.pth")
    out = import_checkpoint("minigpt4", tmp_path / "ckpt.pth", get_backbone("vicuna-7b-v0"), tmp_path / "a")
    before = (out / "adapter.safetensors").read_bytes()
    with pytest.raises(AdapterError, match="already exists; pass --overwrite"):
        import_checkpoint("minigpt4", tmp_path / "ckpt.pth", get_backbone("vicuna-7b-v0"), out)
    assert (out / "adapter.safetensors").read_bytes() == before
    import_checkpoint("minigpt4", tmp_path / "ckpt.pth", get_backbone("vicuna-7b-v0"), out, overwrite=True)
    missing_out = run_align("import", "minigpt4qwen", tmp_path / "ckpt.pth")
    assert missing_out.returncode == 2 and "--out" in missing_out.stderr and not (Path.cwd() / "adapter").exists()


DAMAGED = {  # what a damaged or hostile checkpoint holds → what is said (they were accepted, or a traceback)
    "integer weights": ({"llm_proj.weight": torch.ones(4096, 768, dtype=torch.int32)}, "torch.int32, not a floating"),
    "boolean weights": ({"llm_proj.weight": torch.ones(4096, 768, dtype=torch.bool)}, "torch.bool, not a floating"),
    "NaN weights": ({"llm_proj.weight": torch.full((4096, 768), float("nan"))}, "NaN or infinite"),
    "an infinite bias": ({"llm_proj.bias": torch.full((4096,), float("inf"))}, "NaN or infinite"),
    "a number for a weight": ({"llm_proj.weight": 5}, "of type int, not a tensor"),
    "a list for a weight": ({"llm_proj.weight": [1.0, 2.0]}, "of type list, not a tensor"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_damaged_checkpoint_is_refused_in_one_line_and_writes_nothing(tmp_path, case):
    changes, message = DAMAGED[case]
    state = {"llm_proj.weight": torch.randn(4096, 768), "llm_proj.bias": torch.zeros(4096), **changes}
    torch.save({"model": state}, tmp_path / "ckpt.pth")
    with pytest.raises(AdapterError, match=message):
        import_checkpoint("minigpt4qwen", tmp_path / "ckpt.pth", get_backbone("qwen-7b-chat"), tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_a_truncated_or_foreign_file_is_one_line(tmp_path):
    torch.save({"model": {"llm_proj.weight": torch.randn(64, 8), "llm_proj.bias": torch.zeros(64)}}, tmp_path / "c.pth")
    whole = (tmp_path / "c.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "noise.pth").write_bytes(bytes(range(256)) * 4)
    for name in ("cut.pth", "noise.pth"):
        done = subprocess.run([sys.executable, "-m", "align", "import", "minigpt4qwen", str(tmp_path / name),
                               "--backbone", "qwen-7b-chat", "--out", str(tmp_path / "a")], capture_output=True, text=True)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and "as a weights-only checkpoint" in lines[0], done.stderr
