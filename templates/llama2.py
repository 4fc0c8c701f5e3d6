"""Meta's Llama-2-chat format, as its reference `chat_completion` tokenizes it."""

from align.templates.conversation import USER, Conversation
from align.templates.segments import Control, Segment, Text
from align.templates.template import Template, register_template


class Llama2Chat(Template):
    """`<s>[INST] <<SYS>>\\nS\\n<</SYS>>\\n\\nuser [/INST] reply </s>` per exchange, each exchange one run.

    Meta strips each message and ends every answered exchange with a space, then eos; all of that is learnt. With a
    system text, Meta puts the `<<SYS>>` block in front of the first user message and strips the joined text, so
    the system text keeps its whitespace and the user message only loses its trailing whitespace.
    """

    name = "llama2-chat"
    description = "Llama-2-chat ([INST] ... [/INST], <<SYS>> system block)"

    def segments(self, conversation: Conversation, system: str | None) -> list[Segment]:
        out: list[Segment] = []
        for i, message in enumerate(conversation.messages):
            if message.role == USER:
                out += [Control("bos", optional=True), Text("[INST] ", message=i)]
                if i == 0 and system:
                    out.append(Text(f"<<SYS>>\n{system}\n<</SYS>>\n\n", message=i))
                    out += self.content(message, i, rstrip=True)
                else:
                    out += self.content(message, i, strip=True)
                out.append(Text(" [/INST]", message=i))
            else:
                out.append(Text(" ", message=i))
                out += self.content(message, i, strip=True)
                out += [
                    Text(" ", supervised=message.supervised, message=i),
                    Control("eos", supervised=message.supervised, message=i),
                ]
        return out


register_template(Llama2Chat())
