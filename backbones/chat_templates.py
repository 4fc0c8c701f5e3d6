"""Which template a backbone renders with: a hand-written one by name, or (`hf-chat`) the model's own chat template,
checked against the copy `align add-backbone` verified."""

import hashlib
from functools import lru_cache
from pathlib import Path

from align.backbones import model_dir
from align.backbones.spec import BackboneSpec
from align.errors import BackboneError
from align.templates import HF_CHAT, Template, get_template
from align.templates.hf_chat import HFChatTemplate, SpecialToken
from align.templates.text_tokenizer import TextTokenizer


def template_sha256(source: str) -> str:
    """The fingerprint a backbone record keeps of the chat template it was checked against."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def model_chat_template(path: Path) -> str:
    """The chat template in a model directory (`chat_template.jinja`, or `chat_template` in tokenizer_config.json)."""
    source = model_dir.chat_template(path)
    if source is None:
        raise BackboneError(f"{path} has no chat template (chat_template.jinja or tokenizer_config.json's "
                            "chat_template); pick a hand-written one with --template")
    return source


@lru_cache(maxsize=16)
def _compiled(source: str, specials: tuple[SpecialToken, ...], variables: tuple, sha256: str) -> HFChatTemplate:
    return HFChatTemplate(source, list(specials), dict(variables), sha256)


def hf_chat_template(source: str, tokenizer: TextTokenizer) -> HFChatTemplate:
    """The model's own template over its tokenizer's special tokens (compiled once per template and tokenizer)."""
    variables = tuple(sorted((k, v if not isinstance(v, list) else tuple(v))
                             for k, v in tokenizer.template_variables().items()))
    return _compiled(source, tuple(tokenizer.special_tokens()), variables, template_sha256(source))


def template_for(spec: BackboneSpec, tokenizer: TextTokenizer, *, name: str | None = None,
                 model: Path | None = None) -> Template:
    """The template `name` (default: the backbone's) for this backbone; `hf-chat` reads the model's own, which must
    still be the one `add-backbone` checked."""
    name = name or spec.template
    if name != HF_CHAT:
        return get_template(name)
    path = model or (Path(spec.model_path) if spec.model_path else None)
    if path is None:
        raise BackboneError(f"backbone '{spec.name}' renders with its model's chat template but has no local model; "
                            f"run `align add-backbone {spec.name} --model PATH`")
    source = model_chat_template(Path(path))
    if spec.chat_template_sha256 and template_sha256(source) != spec.chat_template_sha256:
        raise BackboneError(
            f"the chat template in {path} changed since backbone '{spec.name}' was checked (sha256 "
            f"{spec.chat_template_sha256[:12]} → {template_sha256(source)[:12]}); run `align add-backbone {spec.name} "
            f"--model {path} --force` to check the new one"
        )
    return hf_chat_template(source, tokenizer)
