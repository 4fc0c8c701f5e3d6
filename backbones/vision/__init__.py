"""The frozen vision side: image encoders behind a registry of kinds (the `kind` of an exported encoder's config),
each with the preprocessing it was trained with and `encode()`. BLIP-2 (EVA ViT-g + Q-Former) is the kind today;
another encoder is added beside it with `register_encoder_kind`, without touching the pipelines."""

from pathlib import Path

from align.backbones.vision import blip2  # noqa: F401  (registers the BLIP-2 kind)
from align.backbones.vision.blip2 import Encoder, default_compute_dtype, encode, save_encoder
from align.backbones.vision.registry import EncoderError, encoder_query_count, load_encoder


def export_encoder(source: Path | str, out: Path | str) -> Encoder:
    """Write the encoder of any layout as a compact align encoder directory (config + one safetensors file)."""
    if Path(out).expanduser().resolve() == Path(source).expanduser().resolve():
        raise EncoderError(f"--out {out} is the encoder being exported; write it to another folder")
    encoder = load_encoder(source)
    save_encoder(encoder, out)
    return encoder


__all__ = ["Encoder", "EncoderError", "default_compute_dtype", "encode", "encoder_query_count", "export_encoder",
           "load_encoder", "save_encoder"]
