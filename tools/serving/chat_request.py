"""An OpenAI chat-completions request body, checked and turned into what the pipeline takes: the conversation's
turns, its one image, the system text and the generation options. Every refusal is one line naming the field.

Unknown fields are ignored, as OpenAI-compatible servers do; fields align cannot honour (n > 1, penalties other than
repetition_penalty, log-probabilities, tools, a non-text response format) are refused rather than silently dropped.
"""

import base64
import binascii
import math
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from align.constants import DEFAULT_MAX_NEW_TOKENS
from align.errors import AlignError
from align.tools.generation import GenerationOptions
from align.tools.images import BadImage, decode_image, image_bytes
from align.tools.pipeline import Turn

MAX_STOPS = 4  # OpenAI's own limit on `stop`


@dataclass(frozen=True)
class Limits:
    """What one request may hold; past any of them it is refused in one line."""

    max_body_bytes: int = 20 * 2**20
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_images: int = 1  # the template reads one image, at the start of the conversation (MiniGPT-4's way)
    max_prompt_chars: int = 32_000
    max_queue: int = 32


class BadRequest(AlignError):
    """A request refused with an HTTP status, OpenAI's error `code` and the field at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclass(frozen=True)
class ChatRequest:
    """A checked request: turns (the last one unanswered), its image, system text and options."""

    model: str | None
    turns: list[Turn]
    image: Image.Image | None
    system: str | None
    options: GenerationOptions
    max_tokens_given: bool
    stream: bool
    include_usage: bool


def parse_chat_request(body: object, limits: Limits, image_root: Path | None) -> ChatRequest:
    """The request a chat-completions body asks for, or BadRequest saying what is wrong with it."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    _refuse_unsupported(body)
    turns, image, system = _conversation(body.get("messages"), limits, image_root)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise BadRequest(f"{param} must be a whole number of at least 1", param)
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else stop if stop is not None else ()
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise BadRequest(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise BadRequest("seed must be a whole number", "seed")
    options = {"max_new_tokens": max_tokens or DEFAULT_MAX_NEW_TOKENS, "stop": tuple(stops), "seed": seed}
    for field, name in (("temperature", "temperature"), ("top_p", "top_p"), ("repetition_penalty", "repetition_penalty")):
        value = body.get(field)
        if value is not None:
            if not _is_number(value):
                raise BadRequest(f"{field} must be a number", field)
            options[name] = float(value)
    if options.get("temperature", 0.0) > 2:
        raise BadRequest("temperature must be between 0 and 2", "temperature")
    try:
        generation = GenerationOptions(**options)
    except AlignError as exc:
        raise BadRequest(str(exc)) from None
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model must be a string", "model")
    return ChatRequest(model, turns, image, system, generation, max_tokens is not None, stream,
                       bool(stream_options.get("include_usage")))


def _refuse_unsupported(body: dict) -> None:
    if body.get("n", 1) != 1:
        raise BadRequest("n must be 1: this server returns one choice per request", "n")
    for field in ("frequency_penalty", "presence_penalty"):
        if body.get(field) not in (None, 0, 0.0):
            raise BadRequest(f"{field} is not supported (use repetition_penalty)", field)
    if body.get("logprobs") or body.get("top_logprobs"):
        raise BadRequest("log-probabilities are not supported", "logprobs")
    if body.get("tools") or body.get("functions") or body.get("tool_choice") not in (None, "none"):
        raise BadRequest("tools are not supported", "tools")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise BadRequest("only a text response format is supported", "response_format")


def _conversation(messages: object, limits: Limits, image_root: Path | None) -> tuple[list[Turn], Image.Image | None, str | None]:
    """(question, reply) turns ending with an unanswered question, the image and the system text of `messages`."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    system, image, images, said, chars = None, None, 0, [], 0
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{param} must be an object", param)
        role = message.get("role")
        if role in ("system", "developer"):
            if i != 0:
                raise BadRequest(f"{param}: a system message may only come first", param)
            system = _text(message.get("content"), param)
            chars += len(system)
            continue
        if role not in ("user", "assistant"):
            raise BadRequest(f"{param}: role must be system, user or assistant, not {role!r}", param)
        expected = "user" if len(said) % 2 == 0 else "assistant"
        if role != expected:
            raise BadRequest(f"{param}: expected a {expected} message (user and assistant alternate, user first)", param)
        content = message.get("content")
        if role == "user" and isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    images += 1
                    if images > limits.max_images:
                        raise BadRequest(f"{param}: at most {limits.max_images} image per request", param)
                    if said:
                        raise BadRequest(f"{param}: the image must be in the first user message (the model reads "
                                         "one image, at the start of the conversation)", param)
                    image = _image(part.get("image_url"), f"{param}.content[{j}]", limits, image_root)
        text = _text(content, param)
        if role == "user" and not text.strip():
            raise BadRequest(f"{param}: the user message has no text", param)
        chars += len(text)
        said.append(text)
    if len(said) % 2 == 0:
        raise BadRequest("the last message must be the user's", "messages")
    if chars > limits.max_prompt_chars:
        raise BadRequest(f"the messages hold {chars} characters, over the limit of {limits.max_prompt_chars}",
                         "messages", code="context_length_exceeded")
    turns = [(said[k], said[k + 1] if k + 1 < len(said) else None) for k in range(0, len(said), 2)]
    return turns, image, system


def _text(content: object, param: str) -> str:
    """The text of a message's content: a string, or its text parts joined by newlines (image parts skipped)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{param}: content must be a string or a list of parts", param)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind != "image_url":
            raise BadRequest(f"{param}.content[{j}]: a part must be {{'type': 'text', 'text': ...}} or an image_url",
                             f"{param}.content[{j}]")
    return "\n".join(texts)


_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)", re.DOTALL)


def _image(image_url: object, param: str, limits: Limits, image_root: Path | None) -> Image.Image:
    """The picture an image_url part points at: a base64 data: URL, or a file under `image_root`."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise BadRequest(f"{param}: image_url must hold a url", param)
    if url.startswith("data:"):
        match = _DATA_URL.fullmatch(url)
        if match is None:
            raise BadRequest(f"{param}: a data URL must be base64 (data:image/png;base64,...)", param)
        encoded = match["data"]
        if len(encoded) * 3 // 4 > limits.max_image_bytes:
            raise BadRequest(f"{param}: the image is over the limit of {limits.max_image_bytes} bytes", param, 413)
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{param}: the data URL is not valid base64", param) from None
    else:
        data = _local_image(url, param, limits, image_root)
    try:
        return decode_image(data, max_pixels=limits.max_image_pixels, convert_modes=True)
    except BadImage as exc:
        raise BadRequest(f"{param}: {exc}", param) from None


def _local_image(url: str, param: str, limits: Limits, image_root: Path | None) -> bytes:
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        raise BadRequest(f"{param}: this server fetches no URLs; send the image as a data: URL", param)
    if parsed.scheme not in ("", "file"):
        raise BadRequest(f"{param}: an image is a data: URL, or a file path under the server's --image-root", param)
    if image_root is None:
        raise BadRequest(f"{param}: local image paths are refused: the server was started without --image-root", param)
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else url)
    root = image_root.resolve()
    resolved = (root / path).resolve()  # an absolute path stays itself; links and .. are resolved before the check
    if not resolved.is_relative_to(root):
        raise BadRequest(f"{param}: {path} is outside the server's --image-root", param)
    try:
        return image_bytes(resolved, limits.max_image_bytes)
    except BadImage as exc:
        status = 413 if str(exc).startswith("file too large") else 400
        raise BadRequest(f"{param}: {path}: {exc}", param, status) from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
