"""Stage-1 caption pretraining, as MiniGPT-4 stage 1: image slots, then the caption, no prompt."""

from align.errors import TemplateError
from align.templates.conversation import USER, Conversation, ImageItem
from align.templates.segments import Control, Image, Segment, Text
from align.templates.template import Template, register_template


class Caption(Template):
    """`[bos] slots caption eos`: the caption and its eos are learnt; the user turn may hold only images."""

    name = "caption"
    description = "Stage-1 captions: [bos] image slots, caption, eos (no prompt)"
    supports_system = False
    chat = False
    image_open = image_close = ""

    def sample_record(self) -> dict:
        return {"image": "sample.jpg", "caption": "A cat sitting on a sofa."}

    def segments(self, conversation: Conversation, system: str | None) -> list[Segment]:
        if len(conversation.messages) > 2:
            raise TemplateError("the caption template takes one image prompt and one caption")
        out: list[Segment] = [Control("bos", optional=True)]
        for i, message in enumerate(conversation.messages):
            if message.role == USER:
                if any(not isinstance(item, ImageItem) and item.strip() for item in message.content):
                    raise TemplateError(f"message {i}: the caption template takes an image-only prompt, not text")
                out += [Image(item.index, message=i) for item in message.content if isinstance(item, ImageItem)]
            else:
                out += self.content(message, i)
                out += self.end(message.supervised, i)
        return out

    def end(self, supervised: bool, index: int) -> list[Segment]:
        """What ends a caption (learnt with it)."""
        return [Control("eos", supervised=supervised, message=index)]


class MiniGPT4Caption(Caption):
    """MiniGPT-4 stage 1: `[bos] slots caption\n` — the caption ends with its end symbol `\n`, learnt, not eos."""

    name = "minigpt4-caption"
    description = "MiniGPT-4 stage-1 captions: [bos] image slots, caption + \"\\n\" (learnt), no eos"
    reply_end_control = None
    reply_end_text = "\n"

    def end(self, supervised: bool, index: int) -> list[Segment]:
        return [Text("\n", supervised=supervised, message=index)]


register_template(Caption())
register_template(MiniGPT4Caption())
