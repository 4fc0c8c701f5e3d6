"""The `align demo` world: pictures of one coloured shape each, and the language that describes them."""

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from align.constants import DEFAULT_QUESTION

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 205, 40)}
SHAPES = ("circle", "square", "triangle")
DESCRIBE = DEFAULT_QUESTION
CAPTIONS = ("a {colour} {shape}.", "a {colour} {shape} on a light background.", "this is a {colour} {shape}.")
QUESTIONS = (
    (DESCRIBE, "It is a {colour} {shape}."),
    ("What is in this picture?", "A {colour} {shape}."),
    ("What colour is the shape?", "It is {colour}."),
    ("What shape is it?", "It is a {shape}."),
)


@dataclass(frozen=True)
class Content:
    """What one picture shows."""

    colour: str
    shape: str

    @property
    def words(self) -> str:
        """The content as the words a correct answer names."""
        return f"{self.colour} {self.shape}"


def every_content() -> list[Content]:
    """All colour and shape pairs, in a fixed order."""
    return [Content(c, s) for c in COLOURS for s in SHAPES]


def draw(content: Content, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One picture: the shape near the centre, its size, place, hue and the background jittered, plus pixel noise."""
    background = tuple(int(v) for v in rng.integers(200, 256, 3))
    image = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(image)
    r = rng.uniform(0.30, 0.36) * size
    cx, cy = size / 2 + rng.uniform(-0.04, 0.04) * size, size / 2 + rng.uniform(-0.04, 0.04) * size
    fill = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in COLOURS[content.colour])
    if content.shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif content.shape == "square":
        pen.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    noisy = np.asarray(image).astype(np.int16) + rng.integers(-12, 13, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def caption(content: Content, rng: random.Random) -> str:
    """One of the ways a caption names the content."""
    return rng.choice(CAPTIONS).format(colour=content.colour, shape=content.shape)


def conversation(content: Content, rng: random.Random, turns: int = 2) -> list[tuple[str, str]]:
    """(question, answer) pairs about one picture."""
    return [(q, a.format(colour=content.colour, shape=content.shape)) for q, a in rng.sample(QUESTIONS, turns)]


def named(answer: str, vocabulary) -> set[str]:
    """The words of `vocabulary` (colours or shapes) the answer names."""
    return set(answer.lower().replace(".", " ").replace(",", " ").split()) & set(vocabulary)


def names_correctly(answer: str, content: Content) -> bool:
    """The answer names the picture's colour and shape, and no other colour or shape."""
    return named(answer, COLOURS) == {content.colour} and named(answer, SHAPES) == {content.shape}
