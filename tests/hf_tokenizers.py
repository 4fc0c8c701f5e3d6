"""Tiny HF fast tokenizers shaped like real families (byte-level BPE, SentencePiece-style Metaspace, Gemma's),
with each family's special tokens, saved with a chat template as a model directory would hold them."""

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
CORPUS = [
    "A cat sitting on a sofa.", "What is in this image? What color is the cat?", "It is orange, with white paws.",
    "You are a helpful assistant. system user assistant model", "Hello, how are you? I'm doing great.",
    "User: Assistant: [INST] [/INST] <think> </think>", "这张图片里有什么？一只猫坐在沙发上。",
]


def _train(tokenizer: Tokenizer, alphabet: list[str], byte_fallback: bool) -> Tokenizer:
    tokenizer.train_from_iterator(CORPUS * 5, trainers.BpeTrainer(vocab_size=500, initial_alphabet=alphabet))
    if not byte_fallback:
        return tokenizer
    # As in Llama / Mistral / Gemma: the byte pieces are ordinary vocabulary entries (not added tokens).
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return Tokenizer.from_str(json.dumps(spec))


def byte_level() -> Tokenizer:
    """GPT-2 style byte-level BPE (Llama-3, Qwen, Phi, DeepSeek)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return _train(tokenizer, pre_tokenizers.ByteLevel.alphabet(), False)


def metaspace() -> Tokenizer:
    """Llama / Mistral style: Metaspace pre-tokenizer that prepends `▁` at the start only, byte fallback."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    # The decoder of Llama-2 / Mistral's tokenizer.json: spaces back, bytes fused, the one prepended space dropped.
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    return _train(tokenizer, ["▁"], True)


def gemma() -> Tokenizer:
    """Gemma style: spaces become `▁` in the normalizer, no prefix added, byte fallback."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return _train(tokenizer, ["▁"], True)


# family: (tokenizer builder, special tokens, tokenizer_config entries, non-special added tokens)
FAMILIES = {
    "chatml": (byte_level, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
               {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, ["<think>", "</think>"]),
    "phi-4": (byte_level, ["<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>"],
              {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}, []),
    "llama-3": (byte_level, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, []),
    "deepseek": (byte_level, ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"],
                 {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"}, []),
    "internlm2": (byte_level, ["<s>", "</s>", "<|im_start|>", "<|im_end|>"], {"bos_token": "<s>", "eos_token": "</s>"}, []),
    "mistral": (metaspace, ["<unk>", "<s>", "</s>"], {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, []),
    "gemma": (gemma, ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
              {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}, []),
}
# template file → family
TEMPLATE_FAMILY = {
    "chatml-generic": "chatml", "qwen1.5-chat": "chatml", "qwen2.5-instruct": "chatml", "qwen3": "chatml",
    "llama-3-instruct": "llama-3", "mixtral-instruct": "mistral", "zephyr": "mistral", "gemma-it": "gemma",
    "phi-4": "phi-4", "deepseek-llm-chat": "deepseek", "internlm2-chat": "internlm2",
}


def save_family(directory: Path, family: str, chat_template: str, *, as_jinja_file: bool = False) -> Path:
    """tokenizer.json + tokenizer_config.json (the template inside it, or beside it in chat_template.jinja)."""
    build, specials, config, plain_added = FAMILIES[family]
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build()
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tokenizer.add_tokens([AddedToken(s, special=False, normalized=False) for s in plain_added])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = dict(config)
    if as_jinja_file:
        (directory / "chat_template.jinja").write_text(chat_template)
    else:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def save_template(directory: Path, name: str, **kwargs) -> Path:
    """A tokenizer directory for one of the real templates in data/chat_templates."""
    return save_family(directory, TEMPLATE_FAMILY[name], (TEMPLATES / f"{name}.jinja").read_text(), **kwargs)
