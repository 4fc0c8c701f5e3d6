"""`hf-chat`: a model's own chat template (the Jinja `chat_template` shipped with its tokenizer) as an align template.

The template is run as transformers runs it (a sandboxed Jinja environment with the same options and globals), so
the text equals `apply_chat_template`'s. To keep message content from ever becoming control tokens, the rendering is
taken apart: each message's content is located by rendering with unique placeholders, and the text the template
wrote around it is split at the tokenizer's special-token strings, which become control ids; everything between is
tokenized as plain text, in the same runs a tokenizer's own split at special tokens makes. For ordinary text the ids
are therefore those of `apply_chat_template`; typed `<|im_end|>` stays text.

Labels: each assistant message's content and what the template writes after it up to and including the first
special token (its end token). Generation stops on that token and on eos.
"""

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import jinja2
import jinja2.ext

from align.errors import NotPrefixStableError, TemplateError
from align.templates.conversation import ASSISTANT, USER, Conversation, ImageItem, Message
from align.templates.sandbox import BoundedSandbox, RenderBudgetError, budget
from align.templates.segments import Control, Image, Segment, Text
from align.templates.template import HF_CHAT, Template

# Private-use characters: no template trims, splits or tests on them, and no data set holds them.
_CONTENT = "\ue000{}\ue001"
_IMAGE = "\ue002{}\ue003"
_IMAGE_PATTERN = re.compile("\ue002(\\d+)\ue003")


@dataclass(frozen=True)
class SpecialToken:
    """A tokenizer's special token string and how it eats neighbouring whitespace (HF `AddedToken` flags)."""

    content: str
    lstrip: bool = False
    rstrip: bool = False


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}` (transformers' assistant-mask marker) renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace without underscore attributes, as transformers restricts it."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    """The template in transformers' environment (sandboxed, trim/lstrip blocks, its filters and globals), with a
    budget on what a render may cost."""
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=dict, namespace=_Namespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"the model's chat template does not parse: {exc}") from None


class HFChatTemplate(Template):
    """One model's own chat template; `specials` are its tokenizer's special tokens, `variables` the values
    transformers passes to templates (`bos_token`, `eos_token`, …)."""

    name = HF_CHAT

    def __init__(self, source: str, specials: list[SpecialToken], variables: Mapping[str, object], sha256: str = ""):
        self.source, self.sha256 = source, sha256
        self.jinja = compile_chat_template(source)
        self.variables = dict(variables)
        self.specials = {s.content: s for s in specials if s.content}
        self.controls = {s: s for s in self.specials}
        # Longest first, so `<|im_start|>` is never read as a shorter special that prefixes it.
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(self.specials, key=len, reverse=True))) + ")") \
            if self.specials else None
        self.description = f"the model's own chat template (sha256 {sha256[:12]})" if sha256 else "the model's own chat template"
        end = self._reply_end()
        self.reply_end_control, self.reply_end_text = end
        self.stop_controls = tuple(dict.fromkeys(([end[0]] if end[0] else []) + ["eos"]))

    # -- rendering the Jinja template ---------------------------------------------------------------------------------

    def render_text(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The template's own text for these messages (what `apply_chat_template(tokenize=False)` returns)."""
        try:
            with budget():
                return self.jinja.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.variables)
        except RenderBudgetError as exc:
            raise TemplateError(f"the model's chat template is too costly on this conversation: {exc}") from None
        except jinja2.exceptions.TemplateError as exc:
            raise TemplateError(f"the model's chat template refuses this conversation: {exc}") from None
        except RecursionError:
            raise TemplateError("the model's chat template recursed without end on this conversation") from None
        except Exception as exc:  # the template's own arithmetic or filters failing on some content
            raise TemplateError(f"the model's chat template failed on this conversation: {type(exc).__name__}: "
                                f"{str(exc)[:200]}") from None

    def _reply_end(self) -> tuple[str | None, str]:
        """The first special token the template writes after a reply, and the text between (a sample rendering)."""
        try:
            pieces, _ = self._pieces(_turns(STANDARD_CONVERSATION, None), False)
        except TemplateError:
            return None, ""
        found = self._split.search(pieces[-1]) if self._split else None
        return (found.group(0), pieces[-1][:found.start()]) if found else (None, "")

    def _pieces(self, turns: list[tuple[str, str]], add_prompt: bool) -> tuple[list[str], str]:
        """[template text, content, template text, content, …, template text] and the whole rendering."""
        def messages(contents):
            return [{"role": role, "content": content} for (role, _), content in zip(turns, contents)]

        real = [content for _, content in turns]
        marks = [_CONTENT.format(i) for i in range(len(turns))]
        marked = self.render_text(messages(marks), add_prompt)
        whole = self.render_text(messages(real), add_prompt)
        starts = [marked.find(mark) for mark in marks]
        if any(s < 0 for s in starts) or starts != sorted(starts) or any(marked.count(m) != 1 for m in marks):
            raise TemplateError("the model's chat template does not write each message once, in order")
        texts, position = [], 0
        for mark, start in zip(marks, starts):
            texts.append(marked[position:start])
            position = start + len(mark)
        texts.append(marked[position:])
        contents = real
        if "".join(_interleave(texts, contents)) != whole:
            # The template changes content (trims it, say): find each message's rendered form with the others marked.
            contents = []
            for i in range(len(turns)):
                one = self.render_text(messages(marks[:i] + [real[i]] + marks[i + 1:]), add_prompt)
                prefix, suffix = marked[:starts[i]], marked[starts[i] + len(marks[i]):]
                if not (one.startswith(prefix) and one.endswith(suffix)) or len(one) < len(prefix) + len(suffix):
                    raise TemplateError(f"the model's chat template renders message {i} differently from its place")
                contents.append(one[len(prefix):len(one) - len(suffix)])
            if "".join(_interleave(texts, contents)) != whole:
                raise TemplateError("the model's chat template renders messages depending on each other's content")
        return _interleave(texts, contents), whole

    # -- segments ------------------------------------------------------------------------------------------------------

    def segments(self, conversation: Conversation, system: str | None) -> list[Segment]:
        turns = _turns(conversation, system)
        pieces, whole = self._pieces(turns, conversation.ends_with_user)
        if not conversation.ends_with_user:
            self._check_prefix_stable(conversation, system, whole)
        first = len(turns) - len(conversation.messages)  # 1 when a system message leads
        out: list[Segment] = []
        end_of: int | None = None  # a learnt reply whose end (up to its first special token) is learnt too
        for k, piece in enumerate(pieces):
            if k % 2 == 0:
                out += self._template_text(piece, end_of)
                end_of = None
                continue
            index = k // 2 - first
            if index < 0:  # the system text: plain, never learnt
                out += [Text(piece)] if piece else []
                continue
            message = conversation.messages[index]
            learnt = message.role == ASSISTANT and message.supervised
            out += self._content(piece, index, learnt)
            end_of = index if learnt else None
        return _strip_around_specials(out, self.specials)

    def _content(self, text: str, index: int, supervised: bool) -> list[Segment]:
        """A located content string: text (learnt for replies) and image slots where markers were."""
        out: list[Segment] = []
        for k, part in enumerate(_IMAGE_PATTERN.split(text)):
            if k % 2:
                out += [Text(self.image_open, message=index), Image(int(part), message=index),
                        Text(self.image_close, message=index)]
            elif part:
                out.append(Text(part, supervised=supervised, message=index))
        return out

    def _template_text(self, text: str, end_of: int | None) -> list[Segment]:
        """Template-written text: special-token strings become controls; after a learnt reply, the text up to and
        including the first of them is learnt."""
        out: list[Segment] = []
        learn = end_of is not None
        parts = self._split.split(text) if self._split else [text]
        for k, part in enumerate(parts):
            if k % 2:
                out.append(Control(part, supervised=learn, message=end_of if learn else None))
                learn = False
            elif part:
                out.append(Text(part, supervised=learn, message=end_of if learn else None))
        return out

    def _check_prefix_stable(self, conversation: Conversation, system: str | None, whole: str) -> None:
        """Every earlier reply, up to its end token, must render as it would if it were the last: else the model
        learns a format it never sees when it generates (what follows the end token may differ)."""
        for k, message in enumerate(conversation.messages[:-1]):
            if message.role != ASSISTANT:
                continue
            pieces, _ = self._pieces(_turns(conversation.truncated(k + 1), system), False)
            found = self._split.search(pieces[-1]) if self._split else None
            alone = "".join(pieces[:-1]) + (pieces[-1][:found.end()] if found else "")
            if not whole.startswith(alone):
                raise NotPrefixStableError(
                    f"the model's chat template renders reply {k} differently once later turns follow (not "
                    "prefix-stable); give each such turn its own record"
                )

    def check_system(self, system: str | None) -> None:
        """The template itself decides (its raise_exception refuses a system role it has none of)."""


STANDARD_CONVERSATION = Conversation(messages=(
    Message(USER, ("What is in this image?",)), Message(ASSISTANT, ("A cat sitting on a sofa.",), supervised=True),
))


def _turns(conversation: Conversation, system: str | None) -> list[tuple[str, str]]:
    """(role, content) of every message the template receives; images as placeholders inside the content."""
    head = [("system", system)] if system is not None else []
    return head + [(m.role, _content_text(m.content)) for m in conversation.messages]


def _content_text(items) -> str:
    return "".join(_IMAGE.format(item.index) if isinstance(item, ImageItem) else item for item in items)


def _interleave(texts: list[str], contents: list[str]) -> list[str]:
    out = []
    for text, content in zip(texts, contents):
        out += [text, content]
    return out + [texts[-1]]


def _strip_around_specials(segments: list[Segment], specials: Mapping[str, SpecialToken]) -> list[Segment]:
    """Whitespace next to a special token with lstrip/rstrip belongs to the token, as HF tokenizers split it."""
    out = list(segments)
    for i, segment in enumerate(out):
        if not isinstance(segment, Control) or segment.name not in specials:
            continue
        flags = specials[segment.name]
        if flags.rstrip and i + 1 < len(out) and isinstance(out[i + 1], Text):
            nxt = out[i + 1]
            out[i + 1] = Text(nxt.text.lstrip(), nxt.supervised, nxt.message)
        if flags.lstrip and i > 0 and isinstance(out[i - 1], Text):
            prev = out[i - 1]
            out[i - 1] = Text(prev.text.rstrip(), prev.supervised, prev.message)
    return [s for s in out if not (isinstance(s, Text) and not s.text)]
