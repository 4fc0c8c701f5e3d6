"""One multi-turn conversation about one image: history, image switching, and asking."""

from collections.abc import Callable

import torch

from align.tools.generation import GenerationOptions, TurnCache
from align.tools.images import ImageInput
from align.tools.pipeline import Pipeline, Turn


def open_chat(pipeline: Pipeline, image: ImageInput | None = None, features: torch.Tensor | None = None) -> "ChatSession":
    """A multi-turn conversation about an image (or about stored `features`)."""
    session = ChatSession(pipeline)
    if image is not None:
        session.set_image(image)
    elif features is not None:
        session.set_features(features)
    return session


class ChatSession:
    """The image (as features) and the exchanges so far; a new image starts a new conversation."""

    def __init__(self, pipeline: Pipeline, keep_cache: bool = True):
        self.pipeline = pipeline
        self.features: torch.Tensor | None = None
        self.turns: list[Turn] = []
        # Each turn's prompt starts with the last turn's prompt and reply: their keys and values are kept and reused
        # (`align bench chat` measures what this saves).
        self.cache = TurnCache() if keep_cache else None

    def set_image(self, image: ImageInput) -> None:
        """Encode a new image and forget the conversation about the old one."""
        self.set_features(self.pipeline.image_features([image]))

    def set_features(self, features: torch.Tensor) -> None:
        """Use already-computed [1, queries, width] features and start a new conversation."""
        self.features, self.turns = features, []
        if self.cache is not None:
            self.cache.clear()

    def clear(self) -> None:
        """Forget the exchanges, keep the image."""
        self.turns = []
        if self.cache is not None:
            self.cache.clear()

    def ask(self, question: str, options: GenerationOptions | None = None,
            on_text: Callable[[str], None] | None = None) -> str:
        """The reply to the next question, remembered for the turns after it."""
        options = options or GenerationOptions()
        with_image = self.features is not None
        prompt = self.pipeline.prompt([*self.turns, (question, None)], with_image, options.max_new_tokens)
        features = self.features if with_image else torch.zeros(0)
        reply = self.pipeline.generate_batch([prompt], features, options, on_text, self.cache)[0]
        self.turns.append((question, reply))
        return reply
