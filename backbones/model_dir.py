"""What a local HF model directory tells about the LLM: sizes, dtype, chat template, remote code."""

from pathlib import Path

import transformers

from align.errors import BackboneError
from align.files import read_json_object

_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# Bytes of bf16 weights that leave room on a 24 GB GPU for activations of a frozen forward/backward pass.
_BF16_BUDGET_BYTES = 18e9


# config.json and tokenizer_config.json of real models are kilobytes (a chat template included); far past that a
# file is damaged or hostile.
MAX_CONFIG_BYTES = 16 * 2**20


def read_json(path: Path) -> dict:
    """A JSON object from a model's config file, or a one-line error naming the file."""
    return read_json_object(path, BackboneError, MAX_CONFIG_BYTES)


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
    """The model's config.json, with the text config of a multimodal wrapper flattened in; the fields align reads
    checked (kinds and ranges), so a damaged or hostile config is one line, never an absurd registry entry."""
    config = model_config(path)
    text = config.get("text_config", {})
    if not isinstance(text, dict):
        raise BackboneError(f"{path}/config.json: text_config must be an object, not {type(text).__name__}")
    config = {**config, **text}
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise BackboneError(f"{path}/config.json: architectures must be a list of class names, not "
                            f"{str(architectures)[:60]!r}")
    if not isinstance(config.get("model_type", ""), str):
        raise BackboneError(f"{path}/config.json: model_type must be a name, not {str(config['model_type'])[:60]!r}")
    for name, most in _COUNTS.items():
        value = config.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= most):
            raise BackboneError(f"{path}/config.json: {name} must be a whole number between 1 and {most:,}, not "
                                f"{str(value)[:40]}")
    return config


# The counts align reads or that size a model: whole numbers, bounded far above any released LLM.
_COUNTS = {"num_hidden_layers": 4096, "n_layer": 4096, "intermediate_size": 1 << 20, "num_attention_heads": 1 << 14,
           "num_key_value_heads": 1 << 14, "max_position_embeddings": 1 << 25}


def check_with_transformers(path: Path, config: dict) -> None:
    """transformers' own validation of the config (its field types and cross-field rules), for models it has a
    class for; a failure is one line."""
    from align.backbones.native import native_architectures

    native = any(arch in native_architectures() for arch in config.get("architectures") or [])
    if native or needs_remote_code(config) or not config.get("model_type"):
        return  # align's native layouts and remote-code models have no transformers config class to ask
    try:
        transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:  # its validation errors are several classes; each is a config problem
        first = " ".join(str(exc).split())[:300]
        raise BackboneError(f"{path}/config.json is not a valid {config['model_type']} config: {first}") from None


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
