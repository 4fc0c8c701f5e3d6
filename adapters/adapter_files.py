"""Adapter directories: `adapter_config.json` (what the projector fits) + `adapter.safetensors` (its weights)."""

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file

from align import __version__
from align.adapters.projector import build_projector
from align.backbones.chat_templates import template_for
from align.backbones.spec import BackboneSpec
from align.constants import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from align.errors import AlignError
from align.files import recover_dir, staged, write_atomic
from align.templates import Template, resolve_controls



ADAPTER_FORMAT_VERSION = 1


class AdapterError(AlignError):
    """An adapter that is missing, damaged, or made for another backbone or encoder."""


class AdapterConfig(BaseModel):
    """What a trained projector is bound to; loading it anywhere else is refused."""

    model_config = ConfigDict(extra="forbid")

    projector: str
    in_features: int
    out_features: int
    backbone: str
    hidden_size: int
    vocab_size: int
    template: str
    num_query_tokens: int
    encoder_fingerprint: str | None
    stage: str | None = None
    step: int = 0
    # A warm start carried over from another LLM's adapter (`align transfer`): that adapter, its backbone, the fit.
    transferred_from: dict | None = None
    align_version: str = __version__
    format_version: int = ADAPTER_FORMAT_VERSION

    @classmethod
    def for_backbone(cls, spec: BackboneSpec, *, projector: str, in_features: int, template: str,
                     num_query_tokens: int, encoder_fingerprint: str | None, stage: str | None, step: int = 0
                     ) -> "AdapterConfig":
        """The config that binds a projector from `in_features` to this backbone's hidden size."""
        return cls(projector=projector, in_features=in_features, out_features=spec.hidden_size, backbone=spec.name,
                   hidden_size=spec.hidden_size, vocab_size=spec.vocab_size, template=template,
                   num_query_tokens=num_query_tokens, encoder_fingerprint=encoder_fingerprint, stage=stage, step=step)

    def check_fits(self, *, backbone: str, hidden_size: int, vocab_size: int, template: str | None = None,
                   num_query_tokens: int | None = None, encoder_fingerprint: str | None = None, where: str = "") -> None:
        """Refuse a backbone / store this adapter was not made for, naming both sides."""
        self.check_llm(backbone=backbone, hidden_size=hidden_size, vocab_size=vocab_size, template=template,
                       where=where)
        self.check_encoder(num_query_tokens=num_query_tokens, encoder_fingerprint=encoder_fingerprint, where=where)

    def check_llm(self, *, backbone: str, hidden_size: int, vocab_size: int, template: str | None = None,
                  where: str = "") -> None:
        """Refuse an LLM this adapter was not made for (the side `align transfer` changes)."""
        wanted = {"backbone": backbone, "hidden_size": hidden_size, "vocab_size": vocab_size}
        if template is not None:
            wanted["template"] = template
        self._refuse_clashes(wanted, f"was made for backbone '{self.backbone}', not '{backbone}'", where)

    def check_encoder(self, *, num_query_tokens: int | None = None, in_features: int | None = None,
                      encoder_fingerprint: str | None = None, where: str = "") -> None:
        """Refuse features of an encoder this adapter was not made for (the side `align transfer` keeps)."""
        wanted: dict = {}
        if num_query_tokens is not None:
            wanted["num_query_tokens"] = num_query_tokens
        if in_features is not None:
            wanted["in_features"] = in_features
        if encoder_fingerprint is not None and self.encoder_fingerprint is not None:
            wanted["encoder_fingerprint"] = encoder_fingerprint
        self._refuse_clashes(wanted, "reads another encoder's features", where)

    def _refuse_clashes(self, wanted: dict, what: str, where: str) -> None:
        clashes = [f"{k} {getattr(self, k)!r} ≠ {v!r}" for k, v in wanted.items() if getattr(self, k) != v]
        if clashes:
            raise AdapterError(f"adapter {where} {what}: " + "; ".join(clashes))

    def as_json(self) -> str:
        """The config file's text (`transferred_from` only when set, so adapters of earlier versions read alike)."""
        record = self.model_dump()
        if record["transferred_from"] is None:
            del record["transferred_from"]
        return json.dumps(record, indent=2, sort_keys=True) + "\n"


def save_adapter(directory: Path, config: AdapterConfig, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write both files atomically (a half-written adapter is never left behind under the final name)."""
    directory = Path(directory)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    with staged(directory) as staging:
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "align-adapter"})
        write_atomic(staging / ADAPTER_CONFIG, config.as_json())
    return directory


def load_adapter(directory: Path) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Read an adapter directory (safetensors only: nothing is unpickled)."""
    directory = Path(directory)
    recover_dir(directory)  # an adapter whose replacement a kill interrupted is whole again
    if not (directory / ADAPTER_CONFIG).is_file() or not (directory / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{directory} is not an adapter: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        config = AdapterConfig.model_validate_json((directory / ADAPTER_CONFIG).read_text())
    except Exception as exc:
        raise AdapterError(f"invalid {directory / ADAPTER_CONFIG}: {exc}") from None
    if config.format_version > ADAPTER_FORMAT_VERSION:
        raise AdapterError(f"{directory} is adapter format {config.format_version}; this align reads up to "
                           f"{ADAPTER_FORMAT_VERSION}: upgrade align")
    try:
        state = load_file(str(directory / ADAPTER_WEIGHTS))
    except Exception as exc:  # safetensors' own error: a truncated or overwritten file
        raise AdapterError(f"cannot read {directory / ADAPTER_WEIGHTS} (damaged or truncated?): "
                           f"{str(exc).splitlines()[0][:200]}") from None
    _check_shapes(config, state, directory)
    return config, state


def _check_shapes(config: AdapterConfig, state: dict[str, torch.Tensor], where: Path) -> None:
    """The weights are exactly the config's projector, checked on the meta device so that sizes in a config are
    never allocated before they are known to match the file."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_projector(config.projector, config.in_features,
                                                                 config.out_features).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        raise AdapterError(f"{where}: the weights {found} are not a {config.projector} projector "
                           f"{config.in_features} → {config.out_features} ({expected})")
    check_weights(state, where)


def check_weights(state: dict, where: Path | str) -> None:
    """Every weight a finite floating-point tensor: a damaged or diverged file would turn every answer into noise."""
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise AdapterError(f"{where}: weight {name} is of type {type(tensor).__name__}, not a tensor")
        if not tensor.is_floating_point():
            raise AdapterError(f"{where}: weight {name} is {tensor.dtype}, not a floating-point tensor")
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{where}: weight {name} holds NaN or infinite values; this adapter cannot be used")


def inference_template(adapter: AdapterConfig, spec, tokenizer, model: Path | None, where: str) -> Template:
    """The template the adapter was trained with; a caption-only stage chats in the backbone's own (as MiniGPT-4
    does). An adapter whose template the backbone's tokenizer cannot write is refused, naming both."""
    template = template_for(spec, tokenizer, name=adapter.template, model=model)
    if not template.chat:
        template = template_for(spec, tokenizer, model=model)
    try:
        resolve_controls(template, tokenizer)
    except AlignError as exc:
        raise AdapterError(f"adapter {where} was trained with template '{adapter.template}', which backbone "
                           f"'{spec.name}' (template '{spec.template}') cannot write: {exc}") from None
    return template
