"""Adapters: every projector kind saves and reloads exactly; a mismatch is refused naming both sides."""

import json
import os
import shutil

import pytest
import torch

from align.adapters.adapter_files import AdapterConfig, AdapterError, load_adapter, save_adapter
from align.adapters.projector import build_projector, projector_names
from align.constants import ADAPTER_CONFIG


def config(kind: str) -> AdapterConfig:
    return AdapterConfig(projector=kind, in_features=24, out_features=32, backbone="tiny-llama", hidden_size=32,
                         vocab_size=640, template="vicuna-v1.1", num_query_tokens=4, encoder_fingerprint="abc",
                         stage="chat", step=7)


@pytest.mark.parametrize("kind", projector_names())
def test_every_projector_kind_round_trips(kind, tmp_path):
    torch.manual_seed(0)
    projector = build_projector(kind, 24, 32)
    save_adapter(tmp_path / "adapter", config(kind), projector.state_dict())
    saved = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert list(saved) == sorted(saved) and saved["align_version"]
    loaded_config, state = load_adapter(tmp_path / "adapter")
    again = build_projector(loaded_config.projector, loaded_config.in_features, loaded_config.out_features)
    again.load_state_dict(state)
    features = torch.randn(2, 4, 24)
    assert torch.equal(projector(features), again(features))
    save_adapter(tmp_path / "adapter", config(kind), projector.state_dict())  # overwriting an adapter is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_mismatch_is_refused_naming_both(tmp_path):
    with pytest.raises(AdapterError, match="hidden_size 32 ≠ 4096.*template 'vicuna-v1.1' ≠ 'chatml'"):
        config("linear").check_fits(backbone="qwen-7b-chat", hidden_size=4096, vocab_size=151936, template="chatml")
    with pytest.raises(AdapterError, match="encoder_fingerprint 'abc' ≠ 'zzz'"):
        config("linear").check_fits(backbone="tiny-llama", hidden_size=32, vocab_size=640, template="vicuna-v1.1",
                                    encoder_fingerprint="zzz")
    with pytest.raises(AdapterError, match="is not an adapter"):
        load_adapter(tmp_path)


def test_sizes_in_a_config_are_checked_against_the_weights_before_anything_is_allocated(tmp_path):
    projector = build_projector("linear", 24, 32)
    config = AdapterConfig(projector="linear", in_features=24, out_features=32, backbone="b", hidden_size=32,
                           vocab_size=100, template="chatml", num_query_tokens=4, encoder_fingerprint=None)
    out = save_adapter(tmp_path / "a", config, projector.state_dict())
    hostile = json.loads((out / ADAPTER_CONFIG).read_text()) | {"in_features": 10**9, "out_features": 10**9}
    (out / ADAPTER_CONFIG).write_text(json.dumps(hostile))
    with pytest.raises(AdapterError, match="are not a linear projector 1000000000 → 1000000000"):
        load_adapter(out)


def test_a_kill_at_any_instruction_of_replacing_an_adapter_is_recovered(tmp_path):
    from align.files import replace_dir

    projector = build_projector("linear", 24, 32)
    target = save_adapter(tmp_path / "adapter", config("linear"), projector.state_dict())
    old = tmp_path / ".adapter.align-replaced"
    # Killed after the old version moved aside, before the new one arrived: the old one comes back.
    os.replace(target, old)
    assert load_adapter(target)[0].step == config("linear").step and not old.exists()
    # Killed after the new one arrived, before the old one was removed: the next write (or read) tidies up.
    shutil.copytree(target, old)
    save_adapter(target, config("linear"), projector.state_dict())
    assert not old.exists()
    staging = tmp_path / "new"
    shutil.copytree(target, staging)
    shutil.copytree(target, old)
    replace_dir(staging, target)
    assert target.is_dir() and not old.exists() and not staging.exists()


def test_writing_and_reading_an_adapter_touch_only_what_align_made(tmp_path):
    # `.NAME.old` and `.NAME.*` folders of the user's beside an adapter were deleted by the next save or load.
    projector = build_projector("linear", 24, 32)
    target = save_adapter(tmp_path / "adapter", config("linear"), projector.state_dict())
    mine = [tmp_path / ".adapter.old", tmp_path / ".adapter.backup"]
    for folder in mine:
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
    killed = tmp_path / ".adapter.align-staging-x1y2"  # a writer killed mid-write left this: align's own
    killed.mkdir()
    save_adapter(target, config("linear"), projector.state_dict())
    load_adapter(target)
    assert all((folder / "notes.txt").read_text() == "mine" for folder in mine) and not killed.exists()


@pytest.mark.parametrize("damage", ["nan", "int", "truncated"])
def test_an_adapter_with_non_finite_integer_or_truncated_weights_is_refused(tmp_path, damage):
    from safetensors.torch import load_file, save_file

    target = save_adapter(tmp_path / "adapter", config("linear"), build_projector("linear", 24, 32).state_dict())
    weights = load_file(target / "adapter.safetensors")
    if damage == "truncated":  # a copy cut short: safetensors' own error was a traceback
        (target / "adapter.safetensors").write_bytes((target / "adapter.safetensors").read_bytes()[:100])
    else:
        weights["weight"] = weights["weight"] * float("nan") if damage == "nan" else weights["weight"].to(torch.int32)
        save_file(weights, str(target / "adapter.safetensors"))
    message = {"nan": "NaN or infinite", "int": "not a floating-point", "truncated": "damaged or truncated"}[damage]
    with pytest.raises(AdapterError, match=message):
        load_adapter(target)
