"""The one conversation type that flows from data records to templates, and its validation."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Union

from align.words import counted
from align.errors import ConversationError

IMAGE_MARKER = "<image>"
USER, ASSISTANT = "user", "assistant"
Role = Literal["user", "assistant"]

# Accepted spellings of each role: LLaVA's from/value and the OpenAI-style role/content.
_ROLE_ALIASES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT, "system": "system"}


@dataclass(frozen=True)
class ImageItem:
    """Where one image goes in a message; `index` counts images in the conversation from 0."""

    index: int


ContentItem = Union[str, ImageItem]


@dataclass(frozen=True)
class Message:
    """One turn: its role, its content (text and images in order), and whether it is learnt from."""

    role: Role
    content: tuple[ContentItem, ...]
    supervised: bool = False

    @property
    def text(self) -> str:
        """The message's text with each image written as the `<image>` marker."""
        return "".join(IMAGE_MARKER if isinstance(item, ImageItem) else item for item in self.content)


@dataclass(frozen=True)
class Conversation:
    """Optional system text plus alternating user/assistant turns, starting with the user."""

    messages: tuple[Message, ...]
    system: str | None = None
    images: tuple[str, ...] = field(default=())

    @property
    def ends_with_user(self) -> bool:
        """True when the next thing to render is the generation prompt."""
        return bool(self.messages) and self.messages[-1].role == USER

    def truncated(self, n_messages: int) -> "Conversation":
        """The same conversation with only its first `n_messages` turns."""
        return Conversation(self.messages[:n_messages], self.system, self.images)

    def with_last_reply(self, text: str) -> "Conversation":
        """The same conversation with its last message's text replaced (a reply holds no images)."""
        last = self.messages[-1]
        return Conversation((*self.messages[:-1], replace(last, content=(text,))), self.system, self.images)


def split_markers(text: str, first_index: int) -> tuple[ContentItem, ...]:
    """Split text at `<image>` markers into text and image items (empty text pieces dropped)."""
    items: list[ContentItem] = []
    for i, piece in enumerate(text.split(IMAGE_MARKER)):
        if i:
            items.append(ImageItem(first_index + i - 1))
        if piece:
            items.append(piece)
    return tuple(items)


def record_images(record: Mapping) -> tuple[str, ...]:
    """The image references of a record (`image` or `images`: a string or a list of strings), in marker order.

    The one parser of a record's images: extraction, training's store lookup and rendering all read them here, so
    the images a sample's slots receive are the ones its features were looked up for."""
    image = record.get("image", record.get("images"))
    if image is None:
        return ()
    images = (image,) if isinstance(image, str) else image
    if not isinstance(images, list | tuple) or not all(isinstance(i, str) for i in images):
        raise ConversationError("'image' must be a string or a list of strings")
    if any(not i.strip() for i in images):
        raise ConversationError("'image' names an empty path")
    if any("\0" in i for i in images):
        raise ConversationError("'image' holds a NUL character, which no path can")
    return tuple(images)


def _turns_of(record: Mapping) -> list[tuple[str, str]]:
    if "caption" in record:
        caption = record["caption"]
        if not isinstance(caption, str):
            raise ConversationError("'caption' must be a string")
        return [(USER, IMAGE_MARKER), (ASSISTANT, caption)]
    raw = record.get("conversations", record.get("messages"))
    if not isinstance(raw, list):
        raise ConversationError("record needs a 'conversations' list (or a 'caption' string)")
    turns = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, Mapping):
            raise ConversationError(f"message {i}: must be an object with from/value or role/content")
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if not isinstance(role, str) or role not in _ROLE_ALIASES:
            raise ConversationError(f"message {i}: unknown role {str(role)[:40]!r} (use human/gpt or user/assistant)")
        if not isinstance(value, str):
            raise ConversationError(f"message {i}: its value/content must be a string")
        turns.append((_ROLE_ALIASES[role], value))
    return turns


def conversation_from_record(record: Mapping) -> Conversation:
    """Validate a conversation or caption record (DESIGN.md format) and turn it into a Conversation."""
    if not isinstance(record, Mapping):
        raise ConversationError("a record must be a JSON object")
    images = record_images(record)
    turns = _turns_of(record)
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise ConversationError("'system' must be a string")
    if turns and turns[0][0] == "system":
        if system is not None:
            raise ConversationError("message 0: a system message and a 'system' field; give only one")
        system = turns.pop(0)[1]
    validate_turns(turns)

    if "caption" in record and not images:
        raise ConversationError("no image: a caption record needs 'image'")
    markers = sum(text.count(IMAGE_MARKER) for _, text in turns)
    if images and markers == 0:
        # A record with an image and no marker gets it at the start of the first user turn.
        turns[0] = (USER, IMAGE_MARKER * len(images) + " " + turns[0][1])
        markers = len(images)
    if markers != len(images):
        raise ConversationError(f"the record has {counted(len(images), 'image')} but "
                                f"{counted(markers, repr(IMAGE_MARKER) + ' marker')}")

    messages, seen = [], 0
    for role, text in turns:
        content = split_markers(text, seen)
        seen += text.count(IMAGE_MARKER)
        messages.append(Message(role, content, supervised=role == ASSISTANT))
    return Conversation(tuple(messages), system, images)


def conversation_from_turns(turns: Sequence[tuple[str, str | None]], with_image: bool) -> Conversation:
    """(question, reply) pairs as a conversation (a last reply of None leaves it ending with the user); an image goes
    at the start of the first question, as a record's `<image> question` puts it."""
    messages = []
    for i, (question, reply) in enumerate(turns):
        messages.append(Message(USER, (ImageItem(0), " " + question) if with_image and i == 0 else (question,)))
        if reply is not None:
            messages.append(Message(ASSISTANT, (reply,), supervised=True))
    return Conversation(tuple(messages), None, ("image",) if with_image else ())


def validate_turns(turns: list[tuple[str, str]]) -> None:
    """Check role order and content of (role, text) turns; errors name the message index."""
    if not turns:
        raise ConversationError("the conversation has no messages")
    for i, (role, text) in enumerate(turns):
        expected = USER if i % 2 == 0 else ASSISTANT
        if role != expected:
            raise ConversationError(f"message {i}: expected a {expected} turn, got {role} (turns must alternate, user first)")
        if role == ASSISTANT and IMAGE_MARKER in text:
            raise ConversationError(f"message {i}: an assistant turn cannot contain '{IMAGE_MARKER}'")
        if role == ASSISTANT and not text.strip():
            raise ConversationError(f"message {i}: the assistant reply is empty (nothing to learn)")
        if role == USER and not text.strip():
            raise ConversationError(f"message {i}: the user turn is empty")
