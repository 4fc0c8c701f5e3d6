"""Shared fixtures: tiny tokenizers and model directories built in the test session; nothing is downloaded."""

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from align.cpu_threads import share_cores

share_cores()  # before torch is imported: the suite and every align it starts use a share of the cores

SHARED_TOKENIZERS = Path(__file__).resolve().parents[1] / ".." / "shared" / "tokenizers"
LLAMA_MODEL = SHARED_TOKENIZERS / "llama" / "tokenizer.model"
QWEN_TIKTOKEN = SHARED_TOKENIZERS / "qwen" / "qwen.tiktoken"
BAICHUAN2_MODEL = SHARED_TOKENIZERS / "baichuan2" / "tokenizer.model"

CORPUS = [
    "A cat sitting on a sofa.",
    "What is in this image? What color is the cat?",
    "It is orange, with white paws.",
    "USER: ASSISTANT: Human: Assistant: ### [INST] [/INST] <<SYS>> <</SYS>> <Img></Img>",
    "A chat between a curious user and an artificial intelligence assistant.",
    "You are a helpful assistant. Describe this image in detail.",
    "这张图片里有什么？一只猫坐在沙发上。这只猫是什么颜色？橙色的。",
    "The quick brown fox jumps over the lazy dog. A red square and a blue circle.",
]
# Baichuan's control ids: user 195, assistant 196 (bos 1, eos 2, unk/pad 0).
BAICHUAN_RESERVED = [f"<reserved_{i}>" for i in range(3, 200)]


def run_align(*args, home: Path | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run `python -m align ARGS` in a fresh process, as a user would (with `home` as $ALIGN_HOME)."""
    from align.tools.runtime import child_environment

    env = child_environment() | ({"ALIGN_HOME": str(home)} if home else {})
    return subprocess.run([sys.executable, "-m", "align", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)


def write_config(directory: Path, hidden_size: int = 64, vocab_size: int = 1000, **extra) -> None:
    """A config.json like a real model directory's."""
    config = {"hidden_size": hidden_size, "vocab_size": vocab_size, "num_hidden_layers": 2, **extra}
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="session")
def sp_model_dir(tmp_path_factory) -> Path:
    """A SentencePiece model with byte fallback and Baichuan's reserved control ids (195, 196)."""
    import sentencepiece

    directory = tmp_path_factory.mktemp("sp")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=model,
        model_type="bpe",
        vocab_size=600,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        control_symbols=BAICHUAN_RESERVED,
        hard_vocab_limit=False,
        normalization_rule_name="identity",  # as LLaMA and Baichuan: no NFKC folding of "？" or newlines
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    write_config(directory, vocab_size=700, architectures=["LlamaForCausalLM"])
    return directory


def _tiktoken_line(token: bytes, rank: int) -> str:
    return f"{base64.b64encode(token).decode()} {rank}"


@pytest.fixture(scope="session")
def qwen_model_dir(tmp_path_factory) -> Path:
    """A synthetic `qwen.tiktoken`: every byte plus a few merges, so control ids follow rank 263."""
    directory = tmp_path_factory.mktemp("qwen")
    tokens = [bytes([b]) for b in range(256)] + [b"he", b"ll", b"llo", b"hello", b" c", b"at", b" cat", b"\n\n"]
    lines = [_tiktoken_line(token, rank) for rank, token in enumerate(tokens)]
    (directory / "qwen.tiktoken").write_text("\n".join(lines) + "\n")
    write_config(directory, vocab_size=480, architectures=["QWenLMHeadModel"])
    return directory


CHATML_JINJA = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def hf_chatml_dir(tmp_path_factory) -> Path:
    """A tiny HF fast tokenizer (byte-level BPE) with ChatML control tokens and a ChatML chat_template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = tmp_path_factory.mktemp("hf")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS * 5, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML_JINJA})
    )
    write_config(directory, hidden_size=48, vocab_size=512, architectures=["Qwen2ForCausalLM"], torch_dtype="bfloat16")
    return directory


@pytest.fixture
def align_home(tmp_path, monkeypatch) -> Path:
    """A fresh, empty $ALIGN_HOME for one test."""
    home = tmp_path / "align-home"
    monkeypatch.setenv("ALIGN_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def llama_tokenizer():
    """The real LLaMA SentencePiece tokenizer from ../shared (skipped when absent)."""
    if not LLAMA_MODEL.is_file():
        pytest.skip(f"{LLAMA_MODEL} not present")
    from align.backbones.tokenizers import load_tokenizer

    return load_tokenizer("sentencepiece", LLAMA_MODEL, pad=0)


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen(-1) tiktoken tokenizer from ../shared (skipped when absent)."""
    if not QWEN_TIKTOKEN.is_file():
        pytest.skip(f"{QWEN_TIKTOKEN} not present")
    from align.backbones.tokenizers import load_tokenizer

    return load_tokenizer("qwen-tiktoken", QWEN_TIKTOKEN)


@pytest.fixture(scope="session")
def baichuan2_tokenizer():
    """The real Baichuan2 SentencePiece tokenizer from ../shared (skipped when absent)."""
    if not BAICHUAN2_MODEL.is_file():
        pytest.skip(f"{BAICHUAN2_MODEL} not present")
    from align.backbones.tokenizers import load_tokenizer

    return load_tokenizer("sentencepiece", BAICHUAN2_MODEL, pad=0)


@pytest.fixture(scope="session")
def tiny_blip2(tmp_path_factory):
    """(model, HF directory, LAVIS directory) of one tiny random BLIP-2."""
    from blip2_tiny import build_tiny_blip2, save_hf, save_lavis

    root = tmp_path_factory.mktemp("blip2")
    model = build_tiny_blip2()
    return model, save_hf(model, root / "hf"), save_lavis(model, root / "lavis")


@pytest.fixture(scope="session")
def train_workspace(tmp_path_factory, sp_model_dir, hf_chatml_dir, tiny_blip2):
    """Tiny LLaMA and Qwen2 LLMs registered as backbones, a feature store of coloured images, and their manifest."""
    import os

    from blip2_tiny import COLOURS, good_image, write_manifest
    from tiny_llm import save_tiny_llama, save_tiny_qwen2

    root = tmp_path_factory.mktemp("train")
    home = root / "home"
    previous = os.environ.get("ALIGN_HOME")
    os.environ["ALIGN_HOME"] = str(home)
    try:
        from align.backbones.registry import add_backbone
        from align.tools.features.extract import extract_features

        assert add_backbone("tiny-llama", save_tiny_llama(root / "llama", sp_model_dir / "tokenizer.model"),
                            template="vicuna-v1.1").ok
        assert add_backbone("tiny-qwen2", save_tiny_qwen2(root / "qwen2", hf_chatml_dir)).ok
        images = root / "data"
        images.mkdir()
        records = []
        for i in range(16):
            colour = list(COLOURS)[i % 4]
            good_image(images / f"{i}.png", COLOURS[colour], seed=i)
            records.append({"image": f"{i}.png", "caption": f"a {colour} picture"})
        manifest = write_manifest(images / "captions.jsonl", records)
        extract_features([manifest], tiny_blip2[1], root / "features", workers=0, progress=False, n_views=1)
    finally:
        if previous is None:
            os.environ.pop("ALIGN_HOME", None)
        else:
            os.environ["ALIGN_HOME"] = previous
    return {"root": root, "home": home, "manifest": manifest, "features": root / "features",
            "llama": root / "llama", "qwen2": root / "qwen2"}


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """One `align demo` run (the demo's tests and serving's share it): its workspace, JSON report and ALIGN_HOME."""
    root = tmp_path_factory.mktemp("demo")
    out, home = root / "ws", root / "home"
    result = run_align("demo", "--out", out, "--json", "--results", root / "results", home=home, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads(result.stdout), home  # stdout is the one JSON object and nothing else


def tiny_recipe(workspace: dict, folder: Path) -> tuple[Path, list[str]]:
    """recipes/tiny.yaml copied into `folder`, and the --set overrides that point it at a train_workspace."""
    import shutil

    recipe = folder / "tiny.yaml"
    shutil.copy(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml", recipe)
    return recipe, [f"features={workspace['features']}", f"stages.caption.data.0.manifest={workspace['manifest']}",
                    f"stages.chat.data.0.manifest={workspace['manifest']}"]


@pytest.fixture(scope="module")
def adapter(train_workspace, tmp_path_factory):
    """A random linear projector bound to tiny-llama and to the workspace's encoder."""
    from align.adapters.adapter_files import AdapterConfig, save_adapter
    from align.adapters.projector import build_projector
    from align.tools.feature_store import FeatureStore

    import torch

    store = FeatureStore.open(train_workspace["features"])
    torch.manual_seed(1)
    projector = build_projector("linear", 24, 32)
    config = AdapterConfig(projector="linear", in_features=24, out_features=32, backbone="tiny-llama", hidden_size=32,
                           vocab_size=640, template="vicuna-v1.1", num_query_tokens=4,
                           encoder_fingerprint=store.meta["encoder_fingerprint"], stage="chat", step=1)
    return save_adapter(tmp_path_factory.mktemp("adapter") / "adapter", config, projector.state_dict())
