"""The template base class and the template registry (keyed by exact lower-case names)."""

from collections.abc import Mapping
from typing import ClassVar

from align.errors import TemplateError, UnknownNameError
from align.named import Registry
from align.templates.conversation import Conversation, ImageItem, Message
from align.templates.segments import Image, Segment, Text

# The template kind that renders with a model's own chat template (one instance per model: see `hf_chat`).
HF_CHAT = "hf-chat"
# The MiniGPT-4 / MiniGPT4Qwen wrapper around an image's slots.
IMAGE_OPEN, IMAGE_CLOSE = "<Img>", "</Img>"

STANDARD_RECORD = {
    "image": "sample.jpg",
    "conversations": [
        {"from": "human", "value": "<image> What is in this image?"},
        {"from": "gpt", "value": "A cat sitting on a sofa."},
        {"from": "human", "value": "What color is the cat?"},
        {"from": "gpt", "value": "It is orange, with white paws."},
    ],
}


class Template:
    """One model family's chat format; used identically for training and chat.

    Subclasses set the class attributes and implement `segments`. Control tokens are written only here:
    `controls` maps a name used in `Control` segments to a token string (looked up as a single id) or a fixed id;
    `bos` and `eos` always mean the tokenizer's own.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    default_system: ClassVar[str | None] = None
    supports_system: ClassVar[bool] = True
    controls: ClassVar[Mapping[str, str | int]] = {}
    # Controls looked up when present, used only to stop generation (e.g. Qwen's <|endoftext|>).
    optional_controls: ClassVar[Mapping[str, str]] = {}
    stop_controls: ClassVar[tuple[str, ...]] = ("eos",)
    stop_strings: ClassVar[tuple[str, ...]] = ()
    # How a reply ends in the labels: the control at the end of each supervised span, and text after the reply.
    reply_end_control: ClassVar[str | None] = "eos"
    reply_end_text: ClassVar[str] = ""
    image_open: ClassVar[str] = IMAGE_OPEN
    # False for a format with no user text (stage-1 captions): chat then uses the backbone's chat template.
    chat: ClassVar[bool] = True
    image_close: ClassVar[str] = IMAGE_CLOSE

    def segments(self, conversation: Conversation, system: str | None) -> list[Segment]:
        """The conversation as segments; ending with a user turn gives the generation prompt."""
        raise NotImplementedError

    def sample_record(self) -> dict:
        """A record this template can render, used by the backbone self-check."""
        return STANDARD_RECORD

    def content(self, message: Message, index: int, strip: bool = False, *, rstrip: bool = False) -> list[Segment]:
        """A message's text and images as segments, images wrapped in `image_open`/`image_close`; `strip` trims both
        ends of the text, `rstrip` only its end."""
        items = list(message.content)
        if strip and items and isinstance(items[0], str):
            items[0] = items[0].lstrip()
        if (strip or rstrip) and items and isinstance(items[-1], str):
            items[-1] = items[-1].rstrip()
        out: list[Segment] = []
        for item in items:
            if isinstance(item, ImageItem):
                if self.image_open:
                    out.append(Text(self.image_open, message=index))
                out.append(Image(item.index, message=index))
                if self.image_close:
                    out.append(Text(self.image_close, message=index))
            elif item:
                out.append(Text(item, supervised=message.supervised, message=index))
        return out

    def check_system(self, system: str | None) -> None:
        """Refuse a system text for a template whose format has no system role."""
        if system and not self.supports_system:
            raise TemplateError(f"template '{self.name}' has no system role; remove the system text")


_TEMPLATES: Registry[Template] = Registry("template")


def register_template(template: Template) -> Template:
    """Add a template under its exact name; a duplicate name is an error."""
    if template.name != template.name.lower():
        raise ValueError(f"template names are lower-case: {template.name!r}")
    return _TEMPLATES.register(template.name, template)


def get_template(name: str) -> Template:
    """The template registered under exactly `name`."""
    return _TEMPLATES.get(name)


def check_template_name(name: str) -> None:
    """Refuse a name that is neither a registered template nor `hf-chat` (the model's own, resolved per backbone)."""
    if name != HF_CHAT and name not in _TEMPLATES:
        raise UnknownNameError("template", name, [*_TEMPLATES, HF_CHAT])


def template_names() -> list[str]:
    """Every registered template name, sorted."""
    return _TEMPLATES.names()
