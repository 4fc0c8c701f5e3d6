"""BLIP-2's image preprocessing: the evaluation and training views its encoder was trained with (PIL + numpy,
no torchvision)."""

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

# CLIP's normalisation, as BLIP-2's image processors use it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocessing:
    """Everything that decides the pixels the encoder sees; part of the encoder fingerprint."""

    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    interpolation: str = "bicubic"
    # BLIP-2's training processor: RandomResizedCrop(scale=(0.5, 1.0)) then a horizontal flip half the time.
    train_crop_scale: tuple[float, float] = (0.5, 1.0)

    def as_dict(self) -> dict:
        """JSON-ready fields."""
        return asdict(self)


def _normalise(image: Image.Image, pre: Preprocessing) -> np.ndarray:
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(pre.mean, dtype=np.float32)) / np.asarray(pre.std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def eval_view(image: Image.Image, pre: Preprocessing) -> np.ndarray:
    """BLIP-2's evaluation processor: resize to a square with bicubic, to tensor, CLIP-normalise; [3, H, W]."""
    size = pre.image_size
    return _normalise(image.resize((size, size), Image.Resampling.BICUBIC), pre)


def _crop_box(width: int, height: int, scale: tuple[float, float], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box: ten tries at a random area and aspect ratio, then a centre crop."""
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif ratio > 4 / 3:
        w, h = int(round(height * (4 / 3))), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def train_view(image: Image.Image, pre: Preprocessing, rng: np.random.Generator) -> np.ndarray:
    """BLIP-2's training processor: random resized crop (bicubic), random horizontal flip, CLIP-normalise."""
    box = _crop_box(image.width, image.height, pre.train_crop_scale, rng)
    size = pre.image_size
    view = image.crop(box).resize((size, size), Image.Resampling.BICUBIC)  # crop, then resize: as torchvision
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _normalise(view, pre)


def views(image: Image.Image, pre: Preprocessing, n_train_views: int, seed: int) -> np.ndarray:
    """The plain view then `n_train_views` training views, seeded so every run and rank makes the same; [V, 3, H, W]."""
    rng = np.random.default_rng(seed)
    return np.stack([eval_view(image, pre)] + [train_view(image, pre, rng) for _ in range(n_train_views)])
