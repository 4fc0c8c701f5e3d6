"""`align bench`: measured speed, written as JSON under bench/results/ (never asserted in tests)."""

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from align.backbones.dtypes import TORCH_DTYPES
from align.backbones.llm import quantization_config
from align.backbones.vision import Encoder, default_compute_dtype, load_encoder
from align.backbones.vision.blip2 import BlipEncoder
from align.backbones.vision.preprocessing import Preprocessing
from align.tools.features.extract import ImageFiles
from align.errors import AlignError
from align.tools.results import RESULTS_DIR, device_name, write_result
from align.tools.runtime import local_device
from align.words import counted

def full_size_encoder(config: transformers.Blip2Config | None = None) -> Encoder:
    """EVA ViT-g + Q-Former with random weights in BLIP-2's real shapes (nothing is downloaded), or `config`'s."""
    config = config or transformers.Blip2Config()
    pre = Preprocessing(image_size=config.vision_config.image_size)
    return Encoder(BlipEncoder(config).eval().requires_grad_(False), config, pre, "random", "full-size random")


def _bench_images(directory: Path, count: int, size: tuple[int, int] = (640, 480)) -> list[str]:
    """JPEGs of a typical web-image size with real texture, so decoding costs what it does on a data set."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize(size, Image.Resampling.BILINEAR)
        path = directory / f"{i}.jpg"
        image.save(path, quality=90)
        paths.append(str(path))
    return paths


def time_decoding(paths: list[str], pre: Preprocessing, workers: int, batch_size: int) -> float:
    """Images/s of reading, decoding and preprocessing through the extraction data loader."""
    loader = torch.utils.data.DataLoader(
        ImageFiles(paths, pre, 0, 10**9, False), batch_size=batch_size, num_workers=workers, collate_fn=list
    )
    started = time.perf_counter()
    seen = sum(len(batch) for batch in loader)
    return seen / (time.perf_counter() - started)


@torch.inference_mode()
def time_encoding(encoder: Encoder, device: torch.device, dtype: str, batch_size: int, iterations: int) -> float:
    """Images/s of the encoder forward pass alone, after one warm-up batch."""
    size = encoder.preprocessing.image_size
    pixels = torch.randn(batch_size, 3, size, size, device=device, dtype=TORCH_DTYPES[dtype])
    encoder.module(pixels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(iterations):
        encoder.module(pixels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch_size * iterations / (time.perf_counter() - started)


def bench_features(
    encoder_path: Path | None = None,
    *,
    images: int = 64,
    batch_size: int = 32,
    iterations: int = 5,
    workers: int = 4,
    dtype: str | None = None,
    out_dir: Path = RESULTS_DIR,
    say: Callable[[str], None] = lambda text: None,
) -> tuple[dict, Path]:
    """Measure decoding and encoding images/s separately on the current device; write and return the result,
    saying what it does as it goes (`say`)."""
    device = local_device()
    dtype = dtype or default_compute_dtype(device)
    say(f"loading the encoder {encoder_path}" if encoder_path else
        "building a full-size EVA ViT-g + Q-Former with random weights (about 1 B parameters; a minute on a CPU)")
    encoder = load_encoder(encoder_path) if encoder_path else full_size_encoder()
    encoder.to(device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        say(f"decoding {images} synthetic 640x480 JPEGs with {workers} worker processes")
        decode_rate = time_decoding(_bench_images(Path(tmp), images), encoder.preprocessing, workers, batch_size)
    say(f"encoding {counted(iterations, 'batch')} of {batch_size} on {device_name(device)} ({dtype}), after one warm-up batch")
    encode_rate = time_encoding(encoder, device, dtype, batch_size, iterations)
    result = {
        "bench": "features",
        "encoder": encoder.source,
        "encoder_parameters": sum(p.numel() for p in encoder.module.parameters()),
        "device": device_name(device),
        "dtype": dtype,
        "batch_size": batch_size,
        "decode_images": images,
        "decode_workers": workers,
        "decode_images_per_second": round(decode_rate, 2),
        "encode_iterations": iterations,
        "encode_images_per_second": round(encode_rate, 2),
    }
    slug = "".join(c if c.isalnum() else "-" for c in result["device"].split(" (")[0].lower())
    return write_result(result, out_dir, f"features-{slug}-{dtype}")


# Qwen-7B-Chat's published shapes (config.json of the release); weights are random.
QWEN_7B = {"hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32, "intermediate_size": 22016,
           "vocab_size": 151936, "seq_length": 8192, "max_position_embeddings": 8192, "kv_channels": 128,
           "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "rotary_pct": 1.0, "no_bias": True,
           "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "bos_token_id": 151643, "eos_token_id": 151643}


def qwen1_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of an official Qwen-1 checkpoint with these sizes, by name."""
    hidden, mlp, vocab = config["hidden_size"], config["intermediate_size"] // 2, config["vocab_size"]
    shapes = {"transformer.wte.weight": (vocab, hidden), "transformer.ln_f.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        shapes |= {p + "ln_1.weight": (hidden,), p + "ln_2.weight": (hidden,), p + "attn.c_attn.weight": (3 * hidden, hidden),
                   p + "attn.c_attn.bias": (3 * hidden,), p + "attn.c_proj.weight": (hidden, hidden),
                   p + "mlp.w1.weight": (mlp, hidden), p + "mlp.w2.weight": (mlp, hidden), p + "mlp.c_proj.weight": (hidden, mlp)}
    return shapes


def write_random_qwen1(directory: Path, config: dict = QWEN_7B, shards: int = 8) -> None:
    """A Qwen-1 checkpoint of real shapes with random bf16 weights, sharded as the release is."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    shapes = qwen1_tensor_shapes(config)
    names = list(shapes)
    per_shard = -(-len(names) // shards)
    weight_map, total = {}, 0
    for index in range(shards):
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: torch.empty(shapes[name], dtype=torch.bfloat16).normal_(0, 0.02)
                for name in names[index * per_shard:(index + 1) * per_shard]}
        save_file(part, str(directory / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in part.values())
        weight_map |= dict.fromkeys(part, file)
        del part
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_file))


_MEASURE_LOAD = """
import json, sys, threading, time
import torch
from align.backbones import load_llm
peak = {"anon": 0}
def watch():
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak["anon"] = max(peak["anon"], int(line.split()[1]) * 1024)
        time.sleep(0.02)
threading.Thread(target=watch, daemon=True).start()
started = time.perf_counter()
llm = load_llm(sys.argv[1], dtype=sys.argv[2], quantization=sys.argv[3])
seconds = time.perf_counter() - started
# One forward pass reads every weight, so memory-mapped weights are resident in the figures below.
with torch.inference_mode():
    llm(input_ids=torch.arange(8)[None])
forward = time.perf_counter() - started - seconds
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"load_seconds": round(seconds, 2), "first_forward_seconds": round(forward, 2),
                  "peak_rss_bytes": hwm, "peak_anonymous_bytes": peak["anon"],
                  "model_bytes": llm.get_memory_footprint(), "class": type(llm).__name__}))
"""


def bench_llm_loading(directory: Path | None = None, *, dtype: str = "bf16", quantization: str = "none",
                      out_dir: Path = RESULTS_DIR, say: Callable[[str], None] = lambda text: None) -> tuple[dict, Path]:
    """Peak memory of `load_llm` plus one forward pass on a Qwen-7B-shaped official checkpoint (written with random
    weights into `directory`, or a temporary one), in a fresh process; written as JSON and returned.

    Peak resident memory counts memory-mapped weight pages; anonymous memory is what the process allocated itself."""
    import shutil
    import subprocess
    import sys

    # Settings are checked before anything is written: the checkpoint alone is 15 GB.
    if dtype not in TORCH_DTYPES:
        raise AlignError(f"--dtype must be one of {', '.join(TORCH_DTYPES)}, not {dtype!r}")
    quantization_config(quantization, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = directory or Path(tmp) / "Qwen-7B-shaped"
        if not (checkpoint / "config.json").is_file():
            if checkpoint.exists() and any(checkpoint.iterdir()):
                raise AlignError(f"{checkpoint} holds files but no checkpoint; give a new or an earlier bench's folder")
            needed = 2 * sum(math.prod(shape) for shape in qwen1_tensor_shapes(QWEN_7B).values())
            free = shutil.disk_usage(next(p for p in (checkpoint, *checkpoint.parents) if p.exists())).free
            if free < needed:
                raise AlignError(f"writing the checkpoint needs {needed / 2**30:.1f} GiB; {free / 2**30:.1f} GiB free")
            say(f"writing a random Qwen-7B-shaped checkpoint ({needed / 2**30:.1f} GiB, 8 shards) to {checkpoint}")
            write_random_qwen1(checkpoint)
        size = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
        say(f"loading it in a fresh process ({dtype}, quantization {quantization}) and running one forward pass")
        child = subprocess.run([sys.executable, "-c", _MEASURE_LOAD, str(checkpoint), dtype, quantization],
                               capture_output=True, text=True)
        if child.returncode != 0:
            last = (child.stderr.strip().splitlines() or ["no output"])[-1]
            raise AlignError(f"loading {checkpoint} failed: {last}")
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    result = {
        "bench": "load-llm",
        "checkpoint": "Qwen-7B-shaped official layout (random weights), 8 safetensors shards",
        "checkpoint_bytes": size,
        "dtype": dtype,
        "quantization": quantization,
        **measured,
        "peak_rss_over_checkpoint": round(measured["peak_rss_bytes"] / size, 3),
        "peak_anonymous_over_checkpoint": round(measured["peak_anonymous_bytes"] / size, 3),
        "machine_memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "device": device_name(torch.device("cpu")),
    }
    return write_result(result, out_dir, f"load-llm-qwen-7b-{dtype}-{quantization}")
