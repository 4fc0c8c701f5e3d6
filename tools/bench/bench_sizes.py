"""The model sizes `align bench train` runs at, and the workspace each derives from an `align demo` workspace.

A derived workspace keeps the demo's images, manifests, tokenizer and recipe, and swaps in a random-weight LLM of
the size's shape (registered as the `demo-tiny` backbone in a private ALIGN_HOME, so the user's registry is never
touched) and, for real sizes, BLIP-2's full EVA ViT-g + Q-Former with its own feature store. Nothing is downloaded.
It is built once under `WORKSPACE/bench-SIZE/` (whole or not at all) and reused while the size's definition holds.
"""

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import transformers
import yaml

from align.backbones.registry import add_backbone
from align.backbones.vision.blip2 import save_encoder, weights_digest
from align.errors import AlignError
from align.files import recover_dir, replace_dir
from align.tools.bench.bench import full_size_encoder
from align.tools.feature_store import FeatureStore
from align.tools.features.extract import extract_features
from align.tools.runtime import local_device
from align.tools.training.memory_plan import PRESET_SHAPES, LLMShape

DONE = "bench-size.json"  # written last: a derived workspace without it is rebuilt


@dataclass(frozen=True)
class BenchSize:
    """One size: the LLM's shape and architecture (None: the demo's own LLM), the BLIP-2 encoder's config fields
    ({}: EVA ViT-g + Q-Former in BLIP-2's real shapes; None: the demo's tiny encoder and its store), and the
    precision the recipe trains in."""

    name: str
    llm: LLMShape | None = None
    architecture: str = "qwen2"
    encoder: dict | None = None
    precision: str = "fp32"

    def describe(self) -> dict:
        """What the derived workspace was built from (a changed definition rebuilds it)."""
        return asdict(self)


SIZES = {
    "demo": BenchSize("demo"),
    # Big enough on a CPU that a step's arithmetic outweighs per-step costs, as it does at real sizes.
    "small": BenchSize("small", LLMShape(layers=8, hidden=512, intermediate=1408, heads=8, kv_heads=8, vocab=0)),
    "7b": BenchSize("7b", PRESET_SHAPES["qwen-7b-chat"], "qwen2", {}, "bf16"),
    "llama-7b": BenchSize("llama-7b", PRESET_SHAPES["llama-2-7b-chat"], "llama", {}, "bf16"),
}


def get_size(name: str) -> BenchSize:
    """The size named exactly `name`."""
    if name not in SIZES:
        raise AlignError(f"--size must be one of {', '.join(SIZES)}, not {name!r}")
    return SIZES[name]


def random_llm(shape: LLMShape, architecture: str, dtype: torch.dtype, device: torch.device):
    """A causal LM of `shape` with random weights, built directly on `device` in `dtype`."""
    common = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                  num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                  num_key_value_heads=shape.kv_heads, tie_word_embeddings=shape.tied, max_position_embeddings=4096)
    if architecture == "llama":
        config, model_class = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    else:  # Qwen-1 and Qwen2 share the computation: biased q/k/v, SwiGLU, RMSNorm, rotary positions
        config, model_class = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    with torch.device(device):
        return model_class._from_config(config, dtype=dtype).eval()


def derive_workspace(workspace: Path, size: BenchSize, say: Callable[[str], None] = lambda _: None) -> Path:
    """The workspace of `size` derived from the demo workspace (itself for `demo`), built now unless already whole
    (saying what it builds: at real sizes that takes minutes)."""
    if size.llm is None and size.encoder is None:
        return workspace
    target = workspace / f"bench-{size.name}"
    recover_dir(target)
    if (target / DONE).is_file() and json.loads((target / DONE).read_text()) == size.describe():
        return target
    staging = workspace / f"bench-{size.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for shared in ("images", "data"):
        (staging / shared).symlink_to((workspace / shared).resolve(), target_is_directory=True)
    device = local_device()
    recipe = yaml.safe_load((workspace / "recipe.yaml").read_text())
    if size.llm is not None:
        say(f"building {target}: a random {size.name} LLM")
    _write_llm(workspace / "llm", staging / "llm", size, device)
    if size.encoder is not None:
        say(f"building {target}: a random BLIP-2 encoder and its features of the demo's images")
        encoder = full_size_encoder(transformers.Blip2Config(**size.encoder))
        # Extraction checks the weights against the digest the encoder folder states.
        save_encoder(replace(encoder, weights_digest=weights_digest(encoder.module.state_dict())), staging / "encoder")
        del encoder
        manifests = [staging / d["manifest"] for stage in recipe["stages"] for d in stage["data"]]
        extract_features(manifests, staging / "encoder", staging / "features", device=str(device), progress=False)
        # Each sample keeps its whole text beside the encoder's number of image slots (32 at BLIP-2's real size).
        slots = [FeatureStore.read_meta(base / "features")["row_shape"][1] for base in (workspace, staging)]
        for stage in recipe["stages"]:
            stage["max_length"] += slots[1] - slots[0]
    else:
        for shared in ("encoder", "features"):
            (staging / shared).symlink_to((workspace / shared).resolve(), target_is_directory=True)
    recipe["runtime"]["precision"] = size.precision
    (staging / "recipe.yaml").write_text(f"# align bench train --size {size.name}\n" + yaml.safe_dump(recipe, sort_keys=False))
    (staging / DONE).write_text(json.dumps(size.describe()))
    replace_dir(staging, target)
    return target


def _write_llm(demo_llm: Path, out: Path, size: BenchSize, device: torch.device) -> None:
    """The size's random LLM saved as a model directory beside the demo's tokenizer files."""
    if size.llm is None:
        out.symlink_to(demo_llm.resolve(), target_is_directory=True)
        return
    shape = size.llm
    if shape.vocab == 0:  # the demo tokenizer's vocabulary
        shape = replace(shape, vocab=json.loads((demo_llm / "config.json").read_text())["vocab_size"])
    dtype = torch.bfloat16 if size.precision == "bf16" else torch.float32
    needed, free = shape.parameters * dtype.itemsize, shutil.disk_usage(out.parent).free
    if free < needed:  # checked before minutes of building: a 7B LLM is 15 GB
        raise AlignError(f"the {size.name} LLM needs {needed / 2**30:.1f} GiB in {out.parent}; {free / 2**30:.1f} GiB free")
    torch.manual_seed(0)
    llm = random_llm(shape, size.architecture, dtype, device)
    llm.save_pretrained(out)
    del llm
    for file in demo_llm.iterdir():
        if file.name.startswith("tokenizer") or file.name == "special_tokens_map.json":
            shutil.copy(file, out / file.name)


@contextmanager
def registered(workspace: Path) -> Iterator[None]:
    """While open, the `demo-tiny` backbone is the workspace's LLM (a private ALIGN_HOME inside the workspace)."""
    if not (workspace / DONE).is_file():  # the demo workspace: its LLM is the preset's model
        yield
        return
    home = workspace / "home"
    before = os.environ.get("ALIGN_HOME")
    os.environ["ALIGN_HOME"] = str(home)
    try:
        if not (home / "backbones" / "demo-tiny.yaml").is_file():
            result = add_backbone("demo-tiny", model=workspace / "llm", force=True)
            if result.path is None:
                failed = "; ".join(c.detail for c in result.checks if not c.ok)
                raise AlignError(f"the bench's LLM in {workspace / 'llm'} fails align's checks: {failed}")
        yield
    finally:
        if before is None:
            os.environ.pop("ALIGN_HOME", None)
        else:
            os.environ["ALIGN_HOME"] = before
