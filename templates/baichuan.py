"""Baichuan-13B-Chat and Baichuan2-Chat, which mark turns with reserved ids instead of text."""

from align.templates.conversation import USER, Conversation
from align.templates.segments import Control, Segment, Text
from align.templates.template import Template, register_template

# Baichuan's generation_config: user_token_id / assistant_token_id.
BAICHUAN_CONTROLS = {"user": 195, "assistant": 196}


class Baichuan(Template):
    """Baichuan-13B-Chat: `[195] user [196] reply [eos]`, no system role; a reply and its eos are learnt."""

    name = "baichuan"
    description = "Baichuan-13B-Chat (user id 195, assistant id 196, eos after each reply)"
    supports_system = False
    controls = BAICHUAN_CONTROLS

    def segments(self, conversation: Conversation, system: str | None) -> list[Segment]:
        out: list[Segment] = []
        for i, message in enumerate(conversation.messages):
            out.append(Control(message.role, message=i))
            out += self.content(message, i)
            if message.role != USER:
                out.append(Control("eos", supervised=message.supervised, message=i))
        if conversation.ends_with_user:
            out.append(Control("assistant"))
        return out


class Baichuan2(Template):
    """Baichuan2-Chat: `system [195] user [196] reply [195] ...` with no eos between turns (`build_chat_input`).

    For training, as Baichuan2's fine-tune script: the user token after a reply carries label eos, and a
    conversation that ends with a reply gets a final, learnt eos.
    """

    name = "baichuan2"
    description = "Baichuan2-Chat (system text, user id 195, assistant id 196, no eos between turns)"
    controls = BAICHUAN_CONTROLS

    def segments(self, conversation: Conversation, system: str | None) -> list[Segment]:
        out: list[Segment] = []
        if system:
            out.append(Text(system))
        for i, message in enumerate(conversation.messages):
            # i > 0 means a reply came just before this user turn: its end is taught here.
            out.append(Control(message.role, label="eos" if message.role == USER and i > 0 else None, message=i))
            out += self.content(message, i)
        if conversation.ends_with_user:
            out.append(Control("assistant"))
        else:
            out.append(Control("eos", supervised=conversation.messages[-1].supervised))
        return out


register_template(Baichuan())
register_template(Baichuan2())
