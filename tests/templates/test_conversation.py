"""Conversation records: both spellings, image markers, and validation errors that name the message."""

import pytest

from align.errors import ConversationError
from align.templates import ImageItem, conversation_from_record


def test_llava_and_role_content_spellings_are_equal():
    llava = {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yo"}]}
    roles = {"image": "a.jpg", "messages": [{"role": "user", "content": "<image>\nHi"}, {"role": "assistant", "content": "Yo"}]}
    assert conversation_from_record(llava) == conversation_from_record(roles)


def test_image_without_marker_goes_to_start_of_first_user_turn():
    record = {"image": "a.jpg", "conversations": [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A cat."}]}
    conversation = conversation_from_record(record)
    assert conversation.messages[0].content == (ImageItem(0), " What is it?")
    assert conversation.messages[1].supervised and not conversation.messages[0].supervised


def test_markers_split_content_in_order():
    record = {
        "image": ["a.jpg", "b.jpg"],
        "conversations": [{"from": "human", "value": "<image> vs <image>?"}, {"from": "gpt", "value": "Same."}],
    }
    conversation = conversation_from_record(record)
    assert conversation.messages[0].content == (ImageItem(0), " vs ", ImageItem(1), "?")
    assert conversation.images == ("a.jpg", "b.jpg")


def test_caption_record_is_one_image_prompt_and_reply():
    conversation = conversation_from_record({"image": "a.jpg", "caption": "A dog."})
    assert [m.role for m in conversation.messages] == ["user", "assistant"]
    assert conversation.messages[0].content == (ImageItem(0),)


def test_system_message_or_field():
    record = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}]}
    assert conversation_from_record(record).system == "Be brief."
    assert conversation_from_record({**record, "conversations": record["conversations"][1:], "system": "S"}).system == "S"
    with pytest.raises(ConversationError, match="only one"):
        conversation_from_record({**record, "system": "S"})


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"conversations": [{"from": "gpt", "value": "Hi"}]}, "message 0: expected a user turn"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}, "message 1: expected a assistant"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "  "}]}, "message 1: .*nothing to learn"),
        ({"conversations": [{"from": "bot", "value": "a"}]}, "message 0: unknown role 'bot'"),
        ({"conversations": [{"from": "human", "value": 3}]}, "message 0: its value"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "<image>"}]}, "message 1: an assistant"),
        ({"conversations": [{"from": "human", "value": "<image> a"}]}, "0 images but 1 .<image>. marker$"),
        ({"image": ["a", "b"], "conversations": [{"from": "human", "value": "<image> a"}]}, "2 images but 1 .<image>. marker$"),
        ({"conversations": []}, "no messages"),
        ({"image": "a.jpg"}, "needs a 'conversations' list"),
        ({"image": 3, "caption": "x"}, "'image' must be"),
        (["not", "an", "object"], "JSON object"),
    ],
)
def test_invalid_records_say_what_and_where(record, message):
    with pytest.raises(ConversationError, match=message):
        conversation_from_record(record)
