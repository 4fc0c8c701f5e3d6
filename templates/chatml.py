"""ChatML, as Qwen-Chat (and MiniGPT4Qwen's preprocessing) and Qwen1.5/2/2.5 use it."""

from align.templates.conversation import Conversation
from align.templates.segments import Break, Control, Segment, Text
from align.templates.template import Template, register_template


class ChatML(Template):
    """`<|im_start|>role\\ncontent<|im_end|>\\n` per turn; a reply and its `<|im_end|>` are learnt.

    Qwen's `make_context` and MiniGPT4Qwen tokenize the role, the newline and the content separately, so each is
    its own run here too; that is what makes the ids equal theirs.
    """

    name = "chatml"
    description = "ChatML (<|im_start|> / <|im_end|>): Qwen-Chat, Qwen1.5/2/2.5"
    default_system = "You are a helpful assistant."
    controls = {"im_start": "<|im_start|>", "im_end": "<|im_end|>"}
    optional_controls = {"endoftext": "<|endoftext|>"}
    stop_controls = ("im_end", "endoftext", "eos")
    reply_end_control = "im_end"

    def _turn(self, role: str, body: list[Segment], supervised: bool = False, index: int | None = None) -> list[Segment]:
        return [
            Control("im_start", message=index), Text(role, message=index), Break(), Text("\n", message=index), Break(),
            *body,
            Control("im_end", supervised=supervised, message=index), Text("\n", message=index),
        ]

    def segments(self, conversation: Conversation, system: str | None) -> list[Segment]:
        out: list[Segment] = []
        if system:
            out += self._turn("system", [Text(system)])
        for i, message in enumerate(conversation.messages):
            out += self._turn(message.role, self.content(message, i), message.supervised, i)
        if conversation.ends_with_user:
            out += [Control("im_start"), Text("assistant"), Break(), Text("\n")]
        return out


register_template(ChatML())
