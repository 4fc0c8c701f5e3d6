"""The backbone registry: presets shipped with align plus the user's entries in `$ALIGN_HOME/backbones/`.

A user entry named like a preset is that preset added with a local model path; it replaces the preset's row.
"""

import os
import re
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml
from pydantic import ValidationError

from align.backbones import model_dir
from align.backbones.chat_templates import model_chat_template, template_for, template_sha256
from align.backbones.packaged import build_packaged
from align.backbones.self_check import Check, self_check
from align.backbones.spec import NAME_PATTERN, BackboneSpec
from align.backbones.tokenizers import detect_tokenizer_kind, load_tokenizer, tokenizer_kind
from align.errors import BackboneError, DuplicateNameError, UnknownNameError
from align.files import write_atomic
from align.templates import HF_CHAT, check_template_name, get_template
from align.templates.text_tokenizer import TextTokenizer

PRESET_DIR = Path(__file__).parent / "presets"


def align_home() -> Path:
    """Where align keeps user state: `$ALIGN_HOME`, default `~/.align`."""
    return Path(os.environ.get("ALIGN_HOME", "~/.align")).expanduser()


def user_registry_dir() -> Path:
    """The directory of user backbone entries (one YAML file each)."""
    return align_home() / "backbones"


MAX_ENTRY_BYTES = 1 << 16  # a backbone entry is a few hundred bytes


def _load_spec(path: Path) -> BackboneSpec:
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read forever
            raise BackboneError(f"backbone file {path} is not a regular file")
        if info.st_size > MAX_ENTRY_BYTES:
            raise BackboneError(f"backbone file {path} is {info.st_size} bytes; an entry is under {MAX_ENTRY_BYTES}")
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        spec = BackboneSpec.model_validate(data)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise BackboneError(f"cannot read backbone file {path}: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in exc.errors())
        raise BackboneError(f"invalid backbone file {path}: {problems}") from None
    if spec.name != path.stem:
        raise BackboneError(f"{path} holds backbone '{spec.name}'; the file must be named {spec.name}.yaml")
    return spec


def _load_dir(directory: Path, skip_bad: bool = False) -> dict[str, BackboneSpec]:
    """Every entry of a folder; with `skip_bad`, an entry that cannot be read is skipped with a one-line warning
    (once per process) instead of stopping every command."""
    specs: dict[str, BackboneSpec] = {}
    for path in sorted(directory.glob("*.yaml")) if directory.is_dir() else []:
        try:
            spec = _load_spec(path)
        except BackboneError as exc:
            if not skip_bad:
                raise
            _warn_once(f"warning: skipping a backbone entry: {exc}")
            continue
        if spec.name in specs:
            raise DuplicateNameError(f"backbone '{spec.name}' is defined twice in {directory}")
        specs[spec.name] = spec
    return specs


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        print(message, file=sys.stderr, flush=True)


@cache
def presets() -> dict[str, BackboneSpec]:
    """The presets shipped in the package, by name."""
    return _load_dir(PRESET_DIR)


def user_entries() -> dict[str, BackboneSpec]:
    """The user's added backbones, by name (an entry that cannot be read is skipped, with a warning naming it)."""
    return _load_dir(user_registry_dir(), skip_bad=True)


@dataclass(frozen=True)
class Entry:
    """One row of `align backbones list`: the spec and whether it has been added with a local model."""

    spec: BackboneSpec
    is_preset: bool
    is_added: bool


def list_backbones() -> list[Entry]:
    """Every known backbone: presets (added or not) and the user's own, sorted by name."""
    added = user_entries()
    rows = {name: Entry(spec, True, False) for name, spec in presets().items()}
    rows.update({name: Entry(spec, name in presets(), True) for name, spec in added.items()})
    return [rows[name] for name in sorted(rows)]


def get_backbone(name: str) -> BackboneSpec:
    """The backbone named exactly `name`: the user's entry if added, else the preset."""
    added = user_entries()
    if name in added:
        return added[name]
    if name in presets():
        return presets()[name]
    entry = user_registry_dir() / f"{name}.yaml"
    if re.fullmatch(NAME_PATTERN, name) and (entry.exists() or entry.is_symlink()):
        _load_spec(entry)  # skipped as unreadable: asked for by name, say why
    raise UnknownNameError(
        "backbone", name, set(added) | set(presets()),
        hint=" Add a new one with `align add-backbone NAME --model PATH --template T`.",
    )


def backbone_tokenizer(spec: BackboneSpec, model: Path | None = None) -> TextTokenizer:
    """Load a backbone's tokenizer from `model`, else from its added model path."""
    path = model or (Path(spec.model_path) if spec.model_path else None)
    if path is None:
        raise BackboneError(
            f"backbone '{spec.name}' has no local model: run `align add-backbone {spec.name} --model PATH` "
            "or pass --model PATH"
        )
    return load_tokenizer(spec.tokenizer, model_dir.check_model_dir(Path(path)), spec.pad)


def backbone_stop_rules(spec: BackboneSpec) -> dict[str, list[str]]:
    """What ends a reply: the template's stop controls and strings (hf-chat: read from the added model's own)."""
    if spec.template == HF_CHAT:
        if spec.model_path is None:
            return {"stop_controls": ["from the model's chat template, once added"], "stop_strings": []}
        template = template_for(spec, backbone_tokenizer(spec))
    else:
        template = get_template(spec.template)
    return {"stop_controls": list(template.stop_controls), "stop_strings": list(template.stop_strings)}


@dataclass(frozen=True)
class AddResult:
    """What `add_backbone` accepted (or refused) and the checks that decided it."""

    spec: BackboneSpec
    checks: list[Check]
    path: Path | None  # the written entry; None when a check failed

    @property
    def ok(self) -> bool:
        """True when every self-check passed."""
        return all(check.ok for check in self.checks)


def _local_preset_model(spec: BackboneSpec) -> Path:
    """A preset's model from the local HF cache; align never downloads weights."""
    if spec.model:
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(spec.model, local_files_only=True))
        except Exception:  # not in the local cache: ask for a path below
            pass
    where = f"a local copy of {spec.model}" if spec.model else "the model directory"
    raise BackboneError(f"'{spec.name}' needs --model PATH ({where}); align never downloads weights")


def _spec_for_new(name: str, path: Path, template: str | None, tokenizer: str | None) -> BackboneSpec:
    config = model_dir.llm_config(path)
    hidden, vocab = model_dir.sizes(config, path)
    model_dir.check_with_transformers(path, config)
    if template is None:
        model_chat_template(path)  # a model without one must name a hand-written template
        template = HF_CHAT
    return BackboneSpec(
        name=name,
        description=f"{config.get('model_type', 'LLM')} from {path}",
        tokenizer=tokenizer or detect_tokenizer_kind(path),
        template=template,
        hidden_size=hidden,
        vocab_size=vocab,
        remote_code=model_dir.needs_remote_code(config),
        dtype=model_dir.suggested_dtype(config),
        quantization=model_dir.suggested_quantization(config, hidden, vocab),
    )


def _spec_for_preset(preset: BackboneSpec, path: Path, template: str | None, tokenizer: str | None) -> BackboneSpec:
    changes: dict = {"preset": preset.name}
    if (path / "config.json").is_file():
        # The model's own config is the truth (e.g. a vocabulary with an added pad row).
        changes["hidden_size"], changes["vocab_size"] = model_dir.sizes(model_dir.llm_config(path), path)
    if template:
        changes["template"] = template
    if tokenizer:
        changes["tokenizer"] = tokenizer
    return preset.model_copy(update=changes)


def add_backbone(
    name: str,
    model: Path | None = None,
    template: str | None = None,
    tokenizer: str | None = None,
    force: bool = False,
    say: Callable[[str], None] = lambda line: None,
) -> AddResult:
    """Register a preset with its local model (a packaged preset's built from its package), or a new LLM; write the
    entry only if every self-check passes. `say` gets a line per long step."""
    if not re.fullmatch(NAME_PATTERN, name):
        raise BackboneError(f"'{name}' is not a valid backbone name: use lower-case letters, digits, '.', '_', '-'")
    if name in user_entries() and not force:
        raise BackboneError(f"backbone '{name}' is already added; pass --force to replace it")
    if template:
        check_template_name(template)
    if tokenizer:
        tokenizer_kind(tokenizer)
    preset = presets().get(name)
    if preset is None and model is None:
        get_backbone(name)  # an unknown name lists the known ones
    if preset is not None and preset.package is not None and (model is None or model.is_file()):
        # Weights published as a GGUF on the package index: built once into a model directory under ALIGN_HOME.
        model = build_packaged(name, preset.package, model, align_home() / "models", say)
    path = model_dir.check_model_dir(model.expanduser().resolve() if model else _local_preset_model(preset))
    if preset is not None:
        spec = _spec_for_preset(preset, path, template, tokenizer)
    else:
        spec = _spec_for_new(name, path, template, tokenizer)
    spec = spec.added(model_path=str(path))
    if spec.template == HF_CHAT:  # record which template the checks ran on, so a later change is noticed
        spec = spec.model_copy(update={"chat_template_sha256": template_sha256(model_chat_template(path))})
    checks = self_check(spec, backbone_tokenizer(spec))
    if not all(check.ok for check in checks):
        return AddResult(spec, checks, None)
    return AddResult(spec, checks, _write_entry(spec))


def _write_entry(spec: BackboneSpec) -> Path:
    directory = user_registry_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{spec.name}.yaml"
    write_atomic(target, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False, allow_unicode=True))
    return target
