"""Backbones (layer 2): everything frozen. LLM specs (presets + user registry), native tokenizers, each backbone's
chat template (`chat_templates`), LLM loading with native layouts for official checkpoints (`llm`, `native/`), and
the vision encoders (`vision/`).

`from align.backbones import load_llm` is the public way to get a backbone's frozen LLM (imported on first use, so
that reading specs and tokenizers does not load torch).
"""


def __getattr__(name: str):
    if name == "load_llm":
        from align.backbones.llm import load_llm

        return load_llm
    raise AttributeError(f"module 'align.backbones' has no attribute {name!r}")
