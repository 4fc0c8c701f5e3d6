"""Vicuna formats: MiniGPT-4's Vicuna v0 prompt and FastChat's vicuna-v1.1."""

from align.templates.conversation import USER, Conversation
from align.templates.segments import Break, Control, Segment, Text
from align.templates.template import Template, register_template


class MiniGPT4Vicuna0(Template):
    """MiniGPT-4 with Vicuna v0: `###Human: ...###Assistant: reply###`.

    As MiniGPT-4 does, the text before and after each image and each reply are tokenized as separate runs,
    and bos comes only at the very start. The `###` after a reply ends it (learnt) and separates the next turn.
    """

    name = "minigpt4-vicuna0"
    description = "MiniGPT-4 with Vicuna v0 (###Human / ###Assistant)"
    default_system = (
        "Give the following image: <Img>ImageContent</Img>. "
        "You will be able to see the image once I provide it to you. Please answer my questions."
    )
    stop_strings = ("###",)
    reply_end_control = None
    reply_end_text = "###"
    chat_template_markers = ("###Human", "###Assistant")

    def segments(self, conversation: Conversation, system: str | None) -> list[Segment]:
        out: list[Segment] = [Control("bos", optional=True)]
        if system:
            out.append(Text(system))
        for i, message in enumerate(conversation.messages):
            if message.role == USER:
                # After a reply, its learnt "###" already separates the turns.
                out.append(Text(("###" if i == 0 else "") + "Human: ", message=i))
                out += self.content(message, i)
                out.append(Text("###Assistant: ", message=i))
            else:
                out.append(Break())
                out += self.content(message, i)
                out += [Text("###", supervised=message.supervised, message=i), Break()]
        return out


class VicunaV11(Template):
    """FastChat's vicuna_v1.1: `SYSTEM USER: ... ASSISTANT: reply</s>`.

    FastChat tokenizes the whole prompt at once, so text between image slots and control tokens is one run and
    labels follow character spans.
    """

    name = "vicuna-v1.1"
    description = "Vicuna v1.1 / v1.5 (FastChat's USER: / ASSISTANT:)"
    default_system = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    chat_template_markers = ("USER:", "ASSISTANT:")

    def segments(self, conversation: Conversation, system: str | None) -> list[Segment]:
        out: list[Segment] = [Control("bos", optional=True)]
        if system:
            out.append(Text(system + " "))
        for i, message in enumerate(conversation.messages):
            if message.role == USER:
                out.append(Text("USER: ", message=i))
                out += self.content(message, i)
                out.append(Text(" ", message=i))
            else:
                out.append(Text("ASSISTANT: ", message=i))
                out += self.content(message, i)
                out.append(Control("eos", supervised=message.supervised, message=i))
        if conversation.ends_with_user:
            out.append(Text("ASSISTANT:"))
        return out


register_template(MiniGPT4Vicuna0())
register_template(VicunaV11())
