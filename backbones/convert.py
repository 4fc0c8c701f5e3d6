"""`align convert-backbone`: an official Qwen-1 / Baichuan checkpoint written once as a native safetensors directory."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from align import __version__
from align.backbones import model_dir
from align.backbones.dtypes import dtype_name
from align.backbones.llm import load_llm
from align.backbones.native import layout_for
from align.backbones.registry import get_backbone
from align.backbones.tokenizers import tokenizer_kind
from align.constants import CONVERSION_NOTE
from align.errors import BackboneError
from align.files import write_atomic

# Tokenizer files travel with the weights; the model's own code (*.py) never does.
TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass(frozen=True)
class Conversion:
    """What `convert_backbone` wrote."""

    out: Path
    layout: str
    architecture: str
    dtype: str
    files: list[str]


def convert_backbone(name: str, source: Path, out: Path, dtype: str | None = None) -> Conversion:
    """Write the native form of `source` (an official checkpoint of backbone `name`) to the new directory `out`."""
    spec = get_backbone(name)
    source = model_dir.check_model_dir(source.expanduser().resolve())
    config = model_dir.model_config(source)
    layout = layout_for(config)
    if layout is None:
        raise BackboneError(f"{source} ({', '.join(config.get('architectures') or ['?'])}) already loads natively; "
                            "use it as it is")
    out = out.expanduser().resolve()
    if out.exists():
        raise BackboneError(f"{out} already exists; give a new directory to convert into")
    # Without a dtype, the checkpoint's own: config.json's, else that of its tensors (transformers' "auto").
    llm = load_llm(source, dtype=dtype or "auto", norm_head=spec.norm_head)
    dtype = dtype_name(llm.dtype)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    # save_original_format=False: write the native names, not the official layout the weights were read from.
    llm.save_pretrained(partial, save_original_format=False, max_shard_size="5GB")
    native = layout.native_config(config)
    native.dtype = llm.dtype
    native.save_pretrained(partial)  # replaces the loading class's config: a converted directory needs no align class
    wanted = (tokenizer_kind(spec.tokenizer).filename, *TOKENIZER_EXTRAS)
    for file in wanted:
        if (source / file).is_file():
            shutil.copy2(source / file, partial / file)
    note = {"source": str(source), "backbone": spec.name, "layout": layout.name, "dtype": dtype,
            "normalised_output_rows": layout.norm_head(config) if spec.norm_head is None else spec.norm_head, "align_version": __version__}
    write_atomic(partial / CONVERSION_NOTE, json.dumps(note, indent=2) + "\n")
    partial.rename(out)
    return Conversion(out, layout.name, native.architectures[0], dtype, sorted(p.name for p in out.iterdir()))
