"""A tiny random BLIP-2 from transformers' own classes, saved in the HF layout and in the LAVIS layout,
and a folder of test images including every kind of bad input."""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

IMAGE_SIZE, QUERIES, WIDTH = 28, 4, 24


def tiny_config() -> Blip2Config:
    return Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=14),
        qformer_config=dict(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                            encoder_hidden_size=32, cross_attention_frequency=1, vocab_size=100, max_position_embeddings=64),
        text_config=OPTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32, vocab_size=50,
                              max_position_embeddings=64, word_embed_proj_dim=16).to_dict(),
        num_query_tokens=QUERIES,
    )


def build_tiny_blip2(seed: int = 0) -> Blip2ForConditionalGeneration:
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(tiny_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        for layer in model.vision_model.encoder.layers:  # EVA has no key bias (LAVIS stores q_bias and v_bias only)
            width = layer.self_attn.qkv.bias.shape[0] // 3
            layer.self_attn.qkv.bias[width:2 * width] = 0
    return model


def save_hf(model, directory: Path) -> Path:
    model.save_pretrained(directory, max_shard_size="20KB")  # several shards, most of them the language model's
    return directory


def save_lavis(model, directory: Path) -> Path:
    """LAVIS names, written by hand here (the inverse of what align maps), plus tensors LAVIS has and align drops."""
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    vision = {
        "cls_token": sd["vision_model.embeddings.class_embedding"],
        "pos_embed": sd["vision_model.embeddings.position_embedding"],
        "patch_embed.proj.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "patch_embed.proj.bias": sd["vision_model.embeddings.patch_embedding.bias"],
        "norm.weight": torch.ones(32), "head.weight": torch.zeros(10, 32),
    }
    layers = model.config.vision_config.num_hidden_layers
    for i in range(layers + 1):  # one block more than the model uses, as eva_vit_g.pth has 40 for MiniGPT-4's 39
        src = f"vision_model.encoder.layers.{min(i, layers - 1)}."
        qkv_bias = sd[src + "self_attn.qkv.bias"]
        w = qkv_bias.shape[0] // 3
        block = {
            "norm1.weight": sd[src + "layer_norm1.weight"], "norm1.bias": sd[src + "layer_norm1.bias"],
            "norm2.weight": sd[src + "layer_norm2.weight"], "norm2.bias": sd[src + "layer_norm2.bias"],
            "attn.qkv.weight": sd[src + "self_attn.qkv.weight"],
            "attn.q_bias": qkv_bias[:w], "attn.v_bias": qkv_bias[2 * w:],
            "attn.proj.weight": sd[src + "self_attn.projection.weight"], "attn.proj.bias": sd[src + "self_attn.projection.bias"],
            "mlp.fc1.weight": sd[src + "mlp.fc1.weight"], "mlp.fc1.bias": sd[src + "mlp.fc1.bias"],
            "mlp.fc2.weight": sd[src + "mlp.fc2.weight"], "mlp.fc2.bias": sd[src + "mlp.fc2.bias"],
        }
        vision.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    torch.save(vision, directory / "eva_vit_g.pth")

    blip2 = {
        "ln_vision.weight": sd["vision_model.post_layernorm.weight"],
        "ln_vision.bias": sd["vision_model.post_layernorm.bias"],
        "query_tokens": sd["query_tokens"],
        "Qformer.bert.embeddings.LayerNorm.weight": sd["qformer.layernorm.weight"],
        "Qformer.bert.embeddings.LayerNorm.bias": sd["qformer.layernorm.bias"],
        "Qformer.bert.embeddings.word_embeddings.weight": torch.zeros(100, WIDTH),
        "Qformer.cls.predictions.bias": torch.zeros(100),
        "t5_proj.weight": torch.zeros(16, WIDTH),
    }
    for name, tensor in sd.items():
        if name.startswith("qformer.encoder.layer."):
            rest = name.removeprefix("qformer.encoder.layer.")
            rest = rest.replace("attention.attention.", "attention.self.")
            blip2["Qformer.bert.encoder.layer." + rest] = tensor
    for i in range(model.config.qformer_config.num_hidden_layers):  # the text FFN LAVIS keeps and queries never use
        blip2[f"Qformer.bert.encoder.layer.{i}.intermediate.dense.weight"] = torch.zeros(48, WIDTH)
        blip2[f"Qformer.bert.encoder.layer.{i}.output.dense.weight"] = torch.zeros(WIDTH, 48)
        blip2[f"Qformer.bert.encoder.layer.{i}.output.LayerNorm.weight"] = torch.zeros(WIDTH)
    torch.save({"model": blip2}, directory / "blip2_pretrained_flant5xxl.pth")
    model.config.save_pretrained(directory)  # shapes of this tiny model; real LAVIS folders use BLIP-2's defaults
    return directory


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def good_image(path: Path, colour=(200, 50, 50), size=(40, 32), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-20, 20, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return path


def write_manifest(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records) + "\n")
    return path


def image_folder(directory: Path, n_good: int = 6) -> tuple[Path, dict[str, str]]:
    """Good images, a byte-identical duplicate, and one file per bad-input kind; returns (manifest, bad → reason)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    records = []
    for i in range(n_good):
        good_image(directory / f"good{i}.png", COLOURS[names[i % 4]], seed=i)
        records.append({"image": f"good{i}.png", "caption": f"a {names[i % 4]} picture"})
    (directory / "copy.png").write_bytes((directory / "good0.png").read_bytes())
    records.append({"image": "copy.png", "caption": "the same bytes again"})

    bad: dict[str, str] = {}
    (directory / "empty.png").write_bytes(b"")
    bad["empty.png"] = "empty file"
    jpeg = directory / "full.jpg"
    good_image(jpeg, size=(64, 64))
    Image.open(jpeg).save(jpeg, quality=90)
    (directory / "truncated.jpg").write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
    bad["truncated.jpg"] = "corrupt or truncated"
    png = bytearray((directory / "good0.png").read_bytes())
    png[len(png) // 2:len(png) // 2 + 40] = bytes(40)  # damaged pixel data behind a valid header
    (directory / "corrupt.png").write_bytes(bytes(png))
    bad["corrupt.png"] = "corrupt or truncated"
    (directory / "notes.txt").write_text("not an image at all")
    bad["notes.txt"] = "not an image file"
    Image.new("CMYK", (20, 20), (0, 50, 100, 0)).save(directory / "cmyk.jpg")
    bad["cmyk.jpg"] = "colour mode CMYK"
    Image.new("P", (20, 20), 3).save(directory / "palette.png")
    bad["palette.png"] = "colour mode P"
    Image.new("L", (20, 20), 128).save(directory / "gray.png")
    bad["gray.png"] = "colour mode L"
    Image.new("RGBA", (20, 20), (10, 20, 30, 100)).save(directory / "alpha.png")
    bad["alpha.png"] = "colour mode RGBA"
    good_image(directory / "huge.png", size=(400, 300))
    bad["huge.png"] = "too large"
    bad["missing.png"] = "missing file"
    records += [{"image": name, "caption": "bad"} for name in bad]
    records += ['{"image": "good1.png", "caption": ', "[1, 2, 3]", {"caption": "a record without an image"}]
    return write_manifest(directory / "manifest.jsonl", records), bad
