"""Vicuna formats: MiniGPT-4's Vicuna v0 prompt and FastChat's vicuna-v1.1."""

from align.errors import TemplateError
from align.templates.conversation import USER, Conversation
from align.templates.segments import Break, Control, Segment, Text
from align.templates.template import Template, register_template


class MiniGPT4Vicuna0(Template):
    """MiniGPT-4's chat with Vicuna v0 (`CONV_VISION_Vicuna0`): `SYSTEM###Human: ...###Assistant: reply###Human: ...`.

    MiniGPT-4's `Chat` splits the prompt only at each image, so the text between images (earlier replies included)
    is one run, and bos comes only at the very start. A conversation that ends with a reply (training) tokenizes
    that reply and its learnt `###` as their own run, as MiniGPT-4 tokenizes its targets; the run before it is then
    exactly the chat prompt the model answers at inference.
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

    def segments(self, conversation: Conversation, system: str | None) -> list[Segment]:
        out: list[Segment] = [Control("bos", optional=True)]
        if system:
            out.append(Text(system))
        last = len(conversation.messages) - 1
        for i, message in enumerate(conversation.messages):
            if message.role == USER:
                # After a reply, its "###" already separates the turns.
                out.append(Text(("###" if i == 0 else "") + "Human: ", message=i))
                out += self.content(message, i)
                out.append(Text("###Assistant: ", message=i))
            else:
                if i == last:
                    out.append(Break())  # the training target
                out += self.content(message, i)
                out.append(Text("###", supervised=message.supervised, message=i))
        return out


class MiniGPT4Stage2(Template):
    """MiniGPT-4's stage-2 training sample: `###Human: <Img>…</Img> {instruction} ###Assistant: ` + reply + `###`.

    No system text, a space before `###Assistant:`, the prompt split only at the image, the reply and its `###`
    tokenized as the target. Training only: chat with such an adapter uses the backbone's chat template, as
    MiniGPT-4 does.
    """

    name = "minigpt4-stage2"
    description = "MiniGPT-4 stage-2 training prompt (###Human: … ###Assistant: reply###), no system text"
    supports_system = False
    chat = False
    stop_strings = ("###",)
    reply_end_control = None
    reply_end_text = "###"

    def segments(self, conversation: Conversation, system: str | None) -> list[Segment]:
        if len(conversation.messages) != 2 or conversation.messages[0].role != USER:
            raise TemplateError("the minigpt4-stage2 template takes one instruction and one reply")
        instruction, reply = conversation.messages
        return [
            Control("bos", optional=True), Text("###Human: ", message=0), *self.content(instruction, 0),
            Text(" ###Assistant: ", message=0), Break(),
            *self.content(reply, 1), Text("###", supervised=reply.supervised, message=1),
        ]


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
register_template(MiniGPT4Stage2())
register_template(VicunaV11())
