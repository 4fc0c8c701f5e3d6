"""OpenAI chat-completions bodies: what is taken, and every refusal in one line naming its field and status."""

import base64
import io

import pytest
from PIL import Image

from align.tools.serving.chat_request import BadRequest, Limits, parse_chat_request

LIMITS = Limits()


def png(size=(8, 6), colour=(200, 30, 30), noise=False) -> bytes:
    out = io.BytesIO()
    picture = Image.effect_noise(size, 60).convert("RGB") if noise else Image.new("RGB", size, colour)
    picture.save(out, "PNG")
    return out.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def asking(*parts, **extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": list(parts)}], **extra}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


TEXT = {"type": "text", "text": "Describe this image."}


def test_a_conversation_becomes_turns_with_its_image_system_and_options():
    body = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [image_part(data_url(png())), TEXT]},
                         {"role": "assistant", "content": "A red picture."},
                         {"role": "user", "content": "What colour?"}],
            "max_completion_tokens": 12, "max_tokens": 99, "temperature": 0.5, "top_p": 0.8, "stop": "###",
            "seed": 7, "stream": True, "stream_options": {"include_usage": True}, "user": "ignored"}
    asked = parse_chat_request(body, LIMITS, None)
    assert asked.turns == [("Describe this image.", "A red picture."), ("What colour?", None)]
    assert asked.system == "Be brief." and asked.image.size == (8, 6) and asked.image.mode == "RGB"
    options = asked.options
    assert (options.max_new_tokens, options.temperature, options.top_p, options.stop, options.seed) == (12, 0.5, 0.8, ("###",), 7)
    assert asked.stream and asked.include_usage and asked.max_tokens_given


def test_defaults_are_greedy_and_align_s_own_length():
    asked = parse_chat_request({"messages": [{"role": "user", "content": "Hi"}]}, LIMITS, None)
    assert asked.options.temperature == 0 and asked.options.max_new_tokens == 256 and not asked.max_tokens_given
    assert asked.image is None and asked.system is None and not asked.stream


def test_a_local_image_is_read_only_under_the_image_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.png").write_bytes(png())
    (tmp_path / "secret.png").write_bytes(png())
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    for url in ("a.png", str(root / "a.png"), f"file://{root / 'a.png'}"):
        assert parse_chat_request(asking(image_part(url), TEXT), LIMITS, root).image.size == (8, 6)
    for url in ("../secret.png", str(tmp_path / "secret.png"), f"file://{tmp_path / 'secret.png'}", "link.png"):
        with pytest.raises(BadRequest, match="outside the server's --image-root"):
            parse_chat_request(asking(image_part(url), TEXT), LIMITS, root)
    with pytest.raises(BadRequest, match="without --image-root"):
        parse_chat_request(asking(image_part("a.png"), TEXT), LIMITS, None)


BAD = [
    ([], "must be a JSON object", None, 400),
    ({"messages": []}, "non-empty list", "messages", 400),
    ({"messages": [{"role": "tool", "content": "x"}]}, "role must be", "messages[0]", 400),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "expected a user message", "messages[0]", 400),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "expected a assistant", "messages[1]", 400),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "last message must be the user's", "messages", 400),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "may only come first", "messages[1]", 400),
    ({"messages": [{"role": "user", "content": 5}]}, "string or a list of parts", "messages[0]", 400),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "a part must be", "messages[0].content[0]", 400),
    ({"messages": [{"role": "user", "content": "   "}]}, "has no text", "messages[0]", 400),
    (asking(image_part(data_url(png()))), "has no text", "messages[0]", 400),
    (asking(image_part(data_url(png())), image_part(data_url(png())), TEXT), "at most 1 image", "messages[0]", 400),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": [image_part(data_url(png())), TEXT]}]}, "first user message", "messages[2]", 400),
    (asking(image_part("https://example.com/cat.png"), TEXT), "fetches no URLs", "messages[0].content[0]", 400),
    (asking(image_part("ftp://example.com/cat.png"), TEXT), "a data: URL, or a file path", "messages[0].content[0]", 400),
    (asking(image_part("data:image/png,rawbytes"), TEXT), "must be base64", "messages[0].content[0]", 400),
    (asking(image_part("data:image/png;base64,@@@@"), TEXT), "not valid base64", "messages[0].content[0]", 400),
    (asking(image_part(data_url(b"not an image at all")), TEXT), "not an image file", "messages[0].content[0]", 400),
    (asking(image_part(data_url(png((64, 64), noise=True)[:2000])), TEXT), "corrupt or truncated", "messages[0].content[0]", 400),
    (asking(image_part(data_url(png(size=(5000, 4000)))), TEXT), "decompression bomb guard", "messages[0].content[0]", 400),
    (asking(image_part({"detail": "high"}), TEXT), "must hold a url", "messages[0].content[0]", 400),
    (asking(TEXT, n=2), "n must be 1", "n", 400),
    (asking(TEXT, presence_penalty=0.5), "presence_penalty is not supported", "presence_penalty", 400),
    (asking(TEXT, logprobs=True), "log-probabilities", "logprobs", 400),
    (asking(TEXT, tools=[{"type": "function"}]), "tools are not supported", "tools", 400),
    (asking(TEXT, response_format={"type": "json_object"}), "text response format", "response_format", 400),
    (asking(TEXT, max_tokens=0), "max_tokens must be a whole number", "max_tokens", 400),
    (asking(TEXT, max_completion_tokens="9"), "max_completion_tokens must be", "max_completion_tokens", 400),
    (asking(TEXT, stop=["a", "b", "c", "d", "e"]), "at most 4", "stop", 400),
    (asking(TEXT, stop=[""]), "stop must be", "stop", 400),
    (asking(TEXT, temperature=3), "between 0 and 2", "temperature", 400),
    (asking(TEXT, temperature="hot"), "temperature must be a number", "temperature", 400),
    (asking(TEXT, top_p=0), "top-p must be in", None, 400),
    (asking(TEXT, seed=1.5), "seed must be a whole number", "seed", 400),
    (asking(TEXT, stream="yes"), "stream must be true or false", "stream", 400),
    ({"messages": [{"role": "user", "content": "x" * 40_000}]}, "over the limit of 32000", "messages", 400),
]


@pytest.mark.parametrize("body, message, param, status", BAD, ids=[b[1] for b in BAD])
def test_a_bad_request_is_refused_in_one_line_naming_its_field(body, message, param, status):
    with pytest.raises(BadRequest, match=message) as refused:
        parse_chat_request(body, LIMITS, None)
    assert (refused.value.param, refused.value.status) == (param, status)
    assert "\n" not in str(refused.value)


def test_an_image_over_the_byte_limit_is_refused_before_decoding_with_413(tmp_path):
    small = Limits(max_image_bytes=100)
    with pytest.raises(BadRequest, match="over the limit of 100 bytes") as refused:
        parse_chat_request(asking(image_part(data_url(png(size=(64, 64), colour=(1, 2, 3)) + b"\0" * 200)), TEXT), small, None)
    assert refused.value.status == 413
    (tmp_path / "big.png").write_bytes(png() + b"\0" * 200)
    with pytest.raises(BadRequest, match="too large") as refused:
        parse_chat_request(asking(image_part("big.png"), TEXT), small, tmp_path)
    assert refused.value.status == 413
