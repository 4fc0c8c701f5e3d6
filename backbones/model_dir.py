"""What a local HF model directory tells about the LLM: sizes, dtype, chat template, remote code."""

from pathlib import Path

import transformers

from align.errors import BackboneError
from align.files import read_json_object

_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# Bytes of bf16 weights that leave room on a 24 GB GPU for activations of a frozen forward/backward pass.
_BF16_BUDGET_BYTES = 18e9


def read_json(path: Path) -> dict:
    """A JSON object from a file, or a one-line error naming the file."""
    return read_json_object(path, BackboneError)


def check_model_dir(path: Path) -> Path:
    """The directory itself, or an error that says what is wrong with it."""
    if not path.exists():
        raise BackboneError(f"model directory {path} does not exist; pass --model with a local model directory")
    if not path.is_dir():
        raise BackboneError(f"{path} is not a directory; pass --model with the model's directory")
    return path


def model_config(path: Path) -> dict:
    """The model's config.json as written."""
    file = path / "config.json"
    if not file.is_file():
        raise BackboneError(f"{path} has no config.json; the LLM's architecture and sizes come from it")
    return read_json(file)


def llm_config(path: Path) -> dict:
    """The model's config.json, with the text config of a multimodal wrapper flattened in."""
    config = model_config(path)
    return {**config, **config.get("text_config", {})}


# Far above any released LLM (hidden sizes reach tens of thousands, vocabularies a few hundred thousand): a config
# beyond them is damaged or hostile, and would make absurd registry entries and allocations.
MAX_HIDDEN_SIZE, MAX_VOCAB_SIZE = 1 << 17, 1 << 22


def sizes(config: dict, where: Path) -> tuple[int, int]:
    """(hidden size, vocab size) from a config.json: whole numbers in a range real models have."""
    hidden = config.get("hidden_size", config.get("n_embd", config.get("d_model")))
    vocab = config.get("vocab_size")
    for name, value, most in (("hidden_size", hidden, MAX_HIDDEN_SIZE), ("vocab_size", vocab, MAX_VOCAB_SIZE)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise BackboneError(f"{where}/config.json lacks an integer {name} (found {str(value)[:40]!r})")
        if not 0 < value <= most:
            raise BackboneError(f"{where}/config.json: {name} {value} is not between 1 and {most}")
    return hidden, vocab


def needs_remote_code(config: dict) -> bool:
    """True when neither transformers nor align's native layouts have a class for the model's architecture."""
    from align.backbones.native import native_architectures  # model classes: imported only when asked

    architectures = config.get("architectures") or []
    if architectures:
        return not all(hasattr(transformers, arch) or arch in native_architectures() for arch in architectures)
    return "auto_map" in config


def suggested_dtype(config: dict) -> str:
    """The checkpoint's own dtype in align's spelling (bf16 when it says nothing)."""
    return _DTYPES.get(str(config.get("torch_dtype", config.get("dtype", "bfloat16"))), "bf16")


def suggested_quantization(config: dict, hidden: int, vocab: int) -> str:
    """none, 8bit or 4bit: what lets the frozen LLM fit one 24 GB GPU, from a parameter estimate."""
    layers = config.get("num_hidden_layers", config.get("n_layer", 32))
    intermediate = config.get("intermediate_size", 4 * hidden)
    params = layers * (4 * hidden * hidden + 3 * hidden * intermediate) + 2 * vocab * hidden
    if 2 * params <= _BF16_BUDGET_BYTES:
        return "none"
    return "8bit" if params <= _BF16_BUDGET_BYTES else "4bit"


def chat_template(path: Path) -> str | None:
    """The HF chat template shipped with the tokenizer, if any."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = path / "tokenizer_config.json"
    if not config.is_file():
        return None
    template = read_json(config).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None
