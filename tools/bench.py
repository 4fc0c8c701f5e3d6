"""`align bench`: measured speed, written as JSON under bench/results/ (never asserted in tests)."""

import json
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from align import __version__
from align.tools.encoder import DTYPES, BlipEncoder, Encoder, default_compute_dtype, load_encoder
from align.tools.extract import ImageFiles
from align.tools.image_processing import Preprocessing

RESULTS_DIR = Path("bench") / "results"


def device_name(device: torch.device) -> str:
    """A human name for the device measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def full_size_encoder() -> Encoder:
    """EVA ViT-g + Q-Former with random weights in BLIP-2's real shapes (nothing is downloaded)."""
    config = transformers.Blip2Config()
    return Encoder(BlipEncoder(config).eval().requires_grad_(False), config, Preprocessing(), "random", "full-size random")


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
    pixels = torch.randn(batch_size, 3, size, size, device=device, dtype=DTYPES[dtype])
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
) -> tuple[dict, Path]:
    """Measure decoding and encoding images/s separately on the current device; write and return the result."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = dtype or default_compute_dtype(device)
    encoder = load_encoder(encoder_path) if encoder_path else full_size_encoder()
    encoder.to(device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        decode_rate = time_decoding(_bench_images(Path(tmp), images), encoder.preprocessing, workers, batch_size)
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
        "versions": {"align": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "cuda": torch.version.cuda},
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in result["device"].split(" (")[0].lower())
    path = out_dir / f"features-{slug}-{dtype}-{result['measured_at'][:10]}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result, path
