"""Chat templates: conversation → input ids, labels and image slots (no torch here).

Importing this package registers every template; `get_template(name)` looks one up by its exact name.
"""

from align.templates import baichuan, caption, chatml, llama2, vicuna  # noqa: F401  (fill the registry)
from align.templates.conversation import Conversation, ImageItem, Message, conversation_from_record
from align.templates.render import IGNORE_INDEX, Rendered, render, resolve_controls, stop_ids
from align.templates.template import HF_CHAT, Template, check_template_name, get_template, template_names

__all__ = [
    "HF_CHAT",
    "IGNORE_INDEX",
    "Conversation",
    "ImageItem",
    "Message",
    "Rendered",
    "Template",
    "check_template_name",
    "conversation_from_record",
    "get_template",
    "render",
    "resolve_controls",
    "stop_ids",
    "template_names",
]
