"""The frozen BLIP-2 image encoder (EVA ViT-g + ln_vision + query tokens + Q-Former) and its three on-disk layouts.

Layouts read:
- align's own export: `encoder_config.json` + `encoder.safetensors` (fast; written by `align encoder export`);
- a Hugging Face BLIP-2 checkpoint directory (`config.json` with model_type blip-2, safetensors shards): only the
  `vision_model.*`, `query_tokens` and `qformer.*` tensors are read, never the language model's;
- LAVIS checkpoints as MiniGPT-4 and MiniGPT4Qwen use them: a directory with `eva_vit_g.pth` and a
  `blip2_pretrained*.pth` ({"model": state_dict}), mapped onto the same modules (see `lavis_to_hf`).
Weights are read with safetensors or `torch.load(weights_only=True)`; no pickle from a checkpoint ever runs.
"""

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import Blip2Config, Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

from align import __version__
from align.backbones.vision.registry import EncoderError, EncoderKind, register_encoder_kind
from align.constants import ENCODER_CONFIG, ENCODER_WEIGHTS
from align.files import read_json_object, staged, write_atomic
from align.backbones.dtypes import TORCH_DTYPES
from align.backbones.vision.preprocessing import Preprocessing

BLIP2 = "blip2"
FORMAT, FORMAT_VERSION = "align-blip2-encoder", 1
ENCODER_PREFIXES = ("vision_model.", "qformer.", "query_tokens")
LAVIS_VISION_FILE = "eva_vit_g.pth"
BLIP2_QUERIES = 32  # the released BLIP-2's query count (transformers' Blip2Config default too)


class BlipEncoder(nn.Module):
    """Image → 32 Q-Former query outputs: vision transformer (with LAVIS's ln_vision as post_layernorm), then Q-Former."""

    def __init__(self, config: Blip2Config):
        super().__init__()
        self.vision_model = Blip2VisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel(config.qformer_config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] pixels → [B, queries, width] features."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=mask)
        return out.last_hidden_state


@dataclass
class Encoder:
    """A loaded encoder: the module, its config and preprocessing, and the digest of its weights."""

    module: BlipEncoder
    config: Blip2Config
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    weights_digest: str = ""
    source: str = ""

    @property
    def row_shape(self) -> tuple[int, int]:
        """(queries, width) of one image's features."""
        return self.config.num_query_tokens, self.config.qformer_config.hidden_size

    def fingerprint(self, dtype: str) -> str:
        """Hash of weights + preprocessing + compute dtype: features from equal fingerprints are interchangeable."""
        payload = json.dumps(
            {"weights": self.weights_digest, "preprocessing": self.preprocessing.as_dict(), "dtype": dtype},
            sort_keys=True,
        )
        return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()

    def made(self, fingerprint: str) -> bool:
        """True when features with this fingerprint came from these weights and preprocessing, in any dtype."""
        return any(self.fingerprint(dtype) == fingerprint for dtype in TORCH_DTYPES)

    def to(self, device: torch.device, dtype: str) -> "Encoder":
        """Move to a device in a compute dtype, frozen and in eval mode."""
        self.module.to(device=device, dtype=TORCH_DTYPES[dtype]).eval().requires_grad_(False)
        return self


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """A digest of tensor names, shapes and fp32 values (so every layout of the same weights agrees)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def default_compute_dtype(device: torch.device) -> str:
    """fp16 on GPU (as LAVIS runs EVA ViT-g), fp32 on CPU."""
    return "fp16" if device.type == "cuda" else "fp32"


def build_encoder(config: Blip2Config, state_dict: dict[str, torch.Tensor], source: str, pre: Preprocessing) -> Encoder:
    """An Encoder from a config and its full set of weights (every tensor must fit)."""
    module = BlipEncoder(config)
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        sample = ", ".join((missing or unexpected)[:3])
        what = "missing" if missing else "unexpected"
        raise EncoderError(f"{source}: {len(missing)} missing and {len(unexpected)} unexpected tensors ({what}: {sample})")
    module.eval().requires_grad_(False)
    return Encoder(module, config, pre, weights_digest(module.state_dict()), source)


# -- Hugging Face layout ---------------------------------------------------------------------------------------------


def _encoder_key(name: str) -> str | None:
    name = name.removeprefix("model.")  # newer transformers nest everything under model.
    return name if name.startswith(ENCODER_PREFIXES) else None


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                key = _encoder_key(name)
                if key is not None:
                    tensors[key] = handle.get_tensor(name)
    return tensors


def _hf_weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, EncoderError).get("weight_map") or {}
        # Only the shards that hold encoder tensors are opened.
        return sorted({path / file for name, file in weight_map.items() if _encoder_key(name)})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise EncoderError(f"{path} has no safetensors weights (pickled .bin checkpoints are not read)")
    return files


def load_hf(path: Path) -> Encoder:
    """The encoder part of a Hugging Face BLIP-2 checkpoint directory."""
    config = Blip2Config.from_pretrained(str(path))
    tensors = _read_safetensors(_hf_weight_files(path))
    return build_encoder(config, tensors, str(path), Preprocessing(image_size=config.vision_config.image_size))


# -- LAVIS layout ----------------------------------------------------------------------------------------------------

_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.weight$", r"encoder.layers.\1.self_attn.qkv.weight"),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
]


def lavis_to_hf(vision: dict[str, torch.Tensor], blip2: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """Map LAVIS tensor names onto the HF modules used here.

    EVA ViT (`eva_vit_g.pth`, bare keys, or `visual_encoder.*` in the BLIP-2 file, which wins as in MiniGPT-4):
      cls_token → vision_model.embeddings.class_embedding; pos_embed → ….position_embedding;
      patch_embed.proj → ….patch_embedding; blocks.i.norm1/norm2 → encoder.layers.i.layer_norm1/2;
      blocks.i.attn.qkv.weight → ….self_attn.qkv.weight; blocks.i.attn.q_bias, v_bias → ….self_attn.qkv.bias
      = [q_bias, 0, v_bias] (EVA has no key bias); blocks.i.attn.proj → ….self_attn.projection;
      blocks.i.mlp.fc1/fc2 → ….mlp.fc1/fc2; blocks beyond the model's depth are dropped (MiniGPT-4 uses 39 of 40).
    ln_vision → vision_model.post_layernorm. query_tokens → query_tokens.
    Qformer.bert.embeddings.LayerNorm → qformer.layernorm; Qformer.bert.encoder.layer.i.{attention,crossattention}
      .self → qformer.encoder.layer.i.{…}.attention; …output, intermediate_query, output_query keep their names.
    Dropped: the Q-Former's text path (word/position embeddings, intermediate, output), Qformer.cls, the LLM head.
    """
    eva = dict(vision)
    eva.update({k.removeprefix("visual_encoder."): v for k, v in blip2.items() if k.startswith("visual_encoder.")})
    out: dict[str, torch.Tensor] = {}
    for name, tensor in eva.items():
        block = re.match(r"^blocks\.(\d+)\.", name)
        if block and int(block.group(1)) >= layers:
            continue
        if name.endswith("attn.q_bias"):
            v_bias = eva[name.replace("q_bias", "v_bias")]
            out[f"vision_model.encoder.layers.{block.group(1)}.self_attn.qkv.bias"] = torch.cat(
                [tensor, torch.zeros_like(v_bias), v_bias]
            )
            continue
        for pattern, replacement in _VISION_RENAMES:
            if re.match(pattern, name):
                out["vision_model." + re.sub(pattern, replacement, name)] = tensor
                break
    for name, tensor in blip2.items():
        if name.startswith("ln_vision."):
            out["vision_model.post_layernorm." + name.removeprefix("ln_vision.")] = tensor
        elif name == "query_tokens":
            out["query_tokens"] = tensor
        elif name.startswith("Qformer.bert.embeddings.LayerNorm."):
            out["qformer.layernorm." + name.rsplit(".", 1)[1]] = tensor
        elif layer := re.match(r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(.+)$", name):
            rest = layer.group(2)
            if rest.startswith(("intermediate.", "output.")):
                continue  # the text FFN: queries never use it
            rest = re.sub(r"^(attention|crossattention)\.self\.", r"\1.attention.", rest)
            out[f"qformer.encoder.layer.{layer.group(1)}.{rest}"] = tensor
    return out


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EncoderError(f"cannot read {path} as a weights-only checkpoint: {exc}") from None
    data = data.get("model", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise EncoderError(f"{path} does not hold a state dict")
    return data


def load_lavis(path: Path) -> Encoder:
    """LAVIS `eva_vit_g.pth` + `blip2_pretrained*.pth` from one directory (shapes from its config.json, else BLIP-2's)."""
    qformer_files = sorted(path.glob("blip2_pretrained*.pth"))
    if not (path / LAVIS_VISION_FILE).is_file() or not qformer_files:
        raise EncoderError(f"{path} needs {LAVIS_VISION_FILE} and a blip2_pretrained*.pth for the LAVIS layout")
    config = Blip2Config.from_pretrained(str(path)) if (path / "config.json").is_file() else Blip2Config()
    vision = _torch_load(path / LAVIS_VISION_FILE)
    tensors = lavis_to_hf(vision, _torch_load(qformer_files[0]), config.vision_config.num_hidden_layers)
    return build_encoder(config, tensors, str(path), Preprocessing(image_size=config.vision_config.image_size))


# -- align's own layout ----------------------------------------------------------------------------------------------


def load_export(path: Path, meta: dict) -> Encoder:
    """An encoder directory written by `save_encoder` (its encoder_config.json already read as `meta`)."""
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise EncoderError(f"{path / ENCODER_CONFIG} is not an {FORMAT} v{FORMAT_VERSION} file")
    config = Blip2Config(
        vision_config=meta["vision_config"], qformer_config=meta["qformer_config"], num_query_tokens=meta["num_query_tokens"]
    )
    with safe_open(str(path / ENCODER_WEIGHTS), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    pre = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["preprocessing"].items()})
    encoder = build_encoder(config, tensors, meta.get("source", str(path)), pre)
    if encoder.weights_digest != meta["weights_digest"]:
        raise EncoderError(f"{path / ENCODER_WEIGHTS} does not match the digest in {ENCODER_CONFIG}: re-export it")
    return encoder


def detect_release(path: Path):
    """LAVIS (`eva_vit_g.pth`) or Hugging Face BLIP-2 (`config.json` of model_type blip-2) in `path`, or None."""
    if (path / LAVIS_VISION_FILE).is_file():
        return load_lavis
    if (path / "config.json").is_file():
        model_type = read_json_object(path / "config.json", EncoderError).get("model_type")
        if model_type != "blip-2":
            raise EncoderError(f"{path}/config.json is a '{model_type}' model, not blip-2")
        return load_hf
    return None


def save_encoder(encoder: Encoder, out: Path | str) -> Path:
    """Write an encoder in align's own layout, which `load_encoder` reads back exactly. Both files are written aside
    and put in place together, so a kill never leaves new weights beside an old config."""
    out = Path(out)
    with staged(out) as staging:
        _write_encoder(encoder, staging)
    return out


def _write_encoder(encoder: Encoder, out: Path) -> None:
    state = {name: tensor.contiguous() for name, tensor in encoder.module.state_dict().items()}
    save_file(state, str(out / ENCODER_WEIGHTS), metadata={"format": FORMAT})
    meta = {
        "kind": BLIP2,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "align_version": __version__,
        "source": encoder.source,
        "vision_config": _plain(encoder.config.vision_config),
        "qformer_config": _plain(encoder.config.qformer_config),
        "num_query_tokens": encoder.config.num_query_tokens,
        "preprocessing": encoder.preprocessing.as_dict(),
        "weights_digest": encoder.weights_digest,
    }
    write_atomic(out / ENCODER_CONFIG, json.dumps(meta, indent=2, sort_keys=True))


def _plain(config: Blip2VisionConfig | Blip2QFormerConfig) -> dict:
    """The shape-deciding fields of a sub-config (no transformers bookkeeping)."""
    keep = {
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
        "hidden_act", "layer_norm_eps", "qkv_bias", "cross_attention_frequency", "encoder_hidden_size",
        "max_position_embeddings", "vocab_size",
    }
    return {k: v for k, v in config.to_dict().items() if k in keep}


@torch.inference_mode()
def encode(encoder: Encoder, pixels: np.ndarray, device: torch.device, batch_size: int) -> np.ndarray:
    """[N, V, 3, H, W] pixels → [N, V, queries, width] fp16 features."""
    n, v = pixels.shape[:2]
    flat = torch.from_numpy(pixels.reshape(n * v, *pixels.shape[2:]))
    dtype = next(encoder.module.parameters()).dtype
    outputs = [
        encoder.module(flat[i:i + batch_size].to(device=device, dtype=dtype)).float().cpu()
        for i in range(0, n * v, batch_size)
    ]
    return torch.cat(outputs).reshape(n, v, *outputs[0].shape[1:]).to(torch.float16).numpy()


def query_count(path: Path, meta: dict | None) -> int:
    """The Q-Former's query count: align's export or an HF config.json says it; LAVIS releases are BLIP-2's 32."""
    if meta is not None:
        return int(meta["num_query_tokens"])
    if (path / "config.json").is_file():
        return int(read_json_object(path / "config.json", EncoderError).get("num_query_tokens", BLIP2_QUERIES))
    return BLIP2_QUERIES


register_encoder_kind(EncoderKind(BLIP2, load_export, detect_release,
                                  f"config.json (HF BLIP-2) or {LAVIS_VISION_FILE} (LAVIS)", query_count))
