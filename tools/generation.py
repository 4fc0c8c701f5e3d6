"""Generation from rendered prompts: left-padded batches, the template's stop ids and stop strings, token streaming."""

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from align.adapters.batch import pad_batch
from align.adapters.vision_llm import VisionLLM
from align.constants import DEFAULT_MAX_NEW_TOKENS
from align.errors import AlignError
from align.templates import Rendered
from align.templates.text_tokenizer import TextTokenizer


@dataclass(frozen=True)
class GenerationOptions:
    """How to pick tokens and when to stop; temperature 0 is greedy (beam search when num_beams > 1). `stop` adds
    stop strings to the template's; `seed` makes sampling repeatable."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 0.9
    num_beams: int = 1
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        problems = [f"{name.replace('_', ' ')} must be a finite number, not {value}"
                    for name, value in (("temperature", self.temperature), ("top_p", self.top_p),
                                        ("repetition_penalty", self.repetition_penalty)) if not math.isfinite(value)]
        if problems:
            raise AlignError("; ".join(problems))
        if self.max_new_tokens < 1:
            problems.append(f"max new tokens must be at least 1, not {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be 0 (greedy) or more, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top-p must be in (0, 1], not {self.top_p}")
        if self.num_beams < 1:
            problems.append(f"beams must be at least 1, not {self.num_beams}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition penalty must be positive, not {self.repetition_penalty}")
        if any(not stop for stop in self.stop):
            problems.append("a stop string must not be empty")
        if problems:
            raise AlignError("; ".join(problems))

    def as_record(self) -> dict:
        """These options as JSON writes and reads them back (what a job file records)."""
        return {**asdict(self), "stop": list(self.stop)}

    def config(self, stop_ids: list[int], pad_id: int, unused_ids: list[int]) -> GenerationConfig:
        """The transformers GenerationConfig for these options; `unused_ids` are never generated."""
        sampling = self.temperature > 0
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens, do_sample=sampling, num_beams=self.num_beams,
            temperature=self.temperature if sampling else None, top_p=self.top_p if sampling else None,
            top_k=None, repetition_penalty=self.repetition_penalty, eos_token_id=stop_ids, pad_token_id=pad_id,
            suppress_tokens=unused_ids or None,
        )


@dataclass(frozen=True)
class Stops:
    """What ends a reply: any of the template's stop ids, or text containing one of its stop strings."""

    ids: tuple[int, ...]
    strings: tuple[str, ...]

    def adding(self, strings: tuple[str, ...]) -> "Stops":
        """These stops and `strings` too."""
        return Stops(self.ids, self.strings + tuple(s for s in strings if s not in self.strings))

    def cut(self, text: str) -> str:
        """The text before the first stop string."""
        for stop in self.strings:
            text = text.split(stop, 1)[0]
        return text

    def held_back(self, text: str) -> int:
        """How many trailing characters might be the start of a stop string (not safe to show yet)."""
        return max((k for stop in self.strings for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)


class _RowEnds(StoppingCriteria):
    """Ends each row whose new text contains a stop string or whose `cancel` event is set (stop ids are handled by
    eos_token_id), and remembers how many ids each row had generated when it ended: a batch pads ended rows."""

    def __init__(self, tokenizer: TextTokenizer, stops: Stops, prompt_length: int,
                 cancel: "Sequence[threading.Event | None]"):
        self.tokenizer, self.stops, self.prompt_length, self.cancel = tokenizer, stops, prompt_length, cancel
        self.ended: list[int | None] = [None] * len(cancel)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        generated = input_ids.shape[1] - self.prompt_length
        for i, row in enumerate(input_ids):
            if self.ended[i] is None and (
                    (self.cancel[i] is not None and self.cancel[i].is_set())
                    or (self.stops.strings and any(s in self.tokenizer.decode(row[self.prompt_length:].tolist())
                                                   for s in self.stops.strings))):
                self.ended[i] = generated
        return torch.tensor([e is not None for e in self.ended], dtype=torch.bool, device=input_ids.device)


class _TextStream:
    """Hands `on_text` each new piece of one row's reply text as tokens arrive, holding back what may be a stop
    string, half of a multi-byte character or trailing spaces; nothing after the row's stop id (a batch pads it)."""

    def __init__(self, tokenizer: TextTokenizer, stops: Stops, on_text: Callable[[str], None]):
        self.tokenizer, self.stops, self.on_text = tokenizer, stops, on_text
        self.ids: list[int] = []
        self.shown = 0
        self.stopped = False

    def add(self, token: int) -> None:
        if self.stopped:
            return
        if token in self.stops.ids:
            self._show(final=True)
            self.stopped = True
            return
        self.ids.append(token)
        self._show(final=False)

    def end(self) -> None:
        self._show(final=True)

    def _show(self, final: bool) -> None:
        if self.stopped:
            return
        text = self.tokenizer.decode(self.ids)
        cut = self.stops.cut(text)
        self.stopped = cut != text
        if not (final or self.stopped):
            cut = cut[:len(cut) - self.stops.held_back(cut)]
            if cut.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its other bytes
                cut = cut[:-1]
        # Stripped as the whole reply is, and trailing spaces wait for what follows them: the pieces shown add up to
        # exactly the reply returned.
        cut = cut.strip()
        if len(cut) > self.shown:
            self.on_text(cut[self.shown:])
            self.shown = len(cut)


class _RowStreams(BaseStreamer):
    """One text stream per row of the batch (None for a row nobody watches)."""

    def __init__(self, streams: "list[_TextStream | None]"):
        self.streams = streams
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        for stream, token in zip(self.streams, value.reshape(-1).tolist()):
            if stream is not None:
                stream.add(token)

    def end(self) -> None:
        for stream in self.streams:
            if stream is not None:
                stream.end()


class TurnCache:
    """The KV cache of a conversation's last turn (its prompt and reply ids): the next turn's prompt starts with
    them, so only what differs is run again. Reused where the ids agree; the rest is cropped away."""

    def __init__(self):
        self.ids: list[int] = []
        self.kv = None

    def clear(self) -> None:
        """Forget it (a new image, a cleared conversation)."""
        self.ids, self.kv = [], None

    def reusable(self, prompt: Rendered) -> object | None:
        """The cache cropped to the longest common prefix with the prompt's ids (at least one id left to run), or
        None. Nothing is reused when an image slot lies past that prefix: the ids of image slots are placeholders
        (an id past the logits, see generate) and must never be embedded, which transformers before 5.25 did with
        the uncached tail."""
        if self.kv is None:
            return None
        prompt_ids = prompt.input_ids
        common = 0
        for cached, wanted in zip(self.ids, prompt_ids):
            if cached != wanted:
                break
            common += 1
        common = min(common, len(prompt_ids) - 1, self.kv.get_seq_length())
        if common == 0 or any(start + length > common for start, length in prompt.images):
            return None
        self.kv.crop(-(self.kv.get_seq_length() - common))
        return self.kv


@dataclass(frozen=True)
class Reply:
    """One generated reply: its text, how many ids were generated (a stop id included) and why it ended: "stop"
    (a stop id or string), "length" (max_new_tokens) or "cancelled"."""

    text: str
    tokens: int
    finish: str


def generate(
    model: VisionLLM, tokenizer: TextTokenizer, prompts: list[Rendered], features: torch.Tensor, stops: Stops,
    options: GenerationOptions, on_text: Callable[[str], None] | None = None, cache: TurnCache | None = None,
) -> list[str]:
    """The text of one reply per prompt (see `generate_replies`)."""
    return [reply.text for reply in generate_replies(model, tokenizer, prompts, features, stops, options, on_text, cache)]


@torch.inference_mode()
def generate_replies(
    model: VisionLLM, tokenizer: TextTokenizer, prompts: list[Rendered], features: torch.Tensor, stops: Stops,
    options: GenerationOptions, on_text: "Callable[[str], None] | Sequence[Callable[[str], None] | None] | None" = None,
    cache: TurnCache | None = None, cancel: "threading.Event | Sequence[threading.Event | None] | None" = None,
) -> list[Reply]:
    """One reply per prompt; prompts are left-padded into one batch; `features` fill the image slots in order.
    `on_text` streams a prompt's reply (one callable per prompt for a batch); setting a prompt's `cancel` event ends
    its row at the next token. With a `cache` (one prompt, no beam search), the last turn's keys and values are
    reused and kept for the next."""
    on_texts = _per_prompt(on_text, len(prompts))
    cancels = _per_prompt(cancel, len(prompts))
    if any(on_texts) and options.num_beams > 1:
        raise AlignError("streaming needs no beam search (use --beams 1)")
    stops = stops.adding(options.stop)
    device = model.llm.get_input_embeddings().weight.device
    batch = pad_batch(prompts, tokenizer.pad_id, left=True).to(device)
    input_ids, attention, longest = batch.input_ids, batch.attention_mask, batch.input_ids.shape[1]
    embeds = model.embed(input_ids, batch.image_mask, features.to(device))
    ends = _RowEnds(tokenizer, stops, longest, cancels) if stops.strings or any(cancels) else None
    streamer = (_RowStreams([_TextStream(tokenizer, stops, f) if f is not None else None for f in on_texts])
                if any(on_texts) else None)
    # LLMs often have more embedding rows than the tokenizer has ids (padded for speed); those rows are never picked.
    rows = model.llm.get_output_embeddings().weight.shape[0]
    unused = list(range(tokenizer.vocab_size, rows))
    config = options.config(list(stops.ids), tokenizer.pad_id, unused)
    cached = None
    if cache is not None and len(prompts) == 1 and options.num_beams == 1:
        config.return_dict_in_generate = True
        cached = cache.reusable(prompts[0])
    if options.seed is not None:
        torch.manual_seed(options.seed)
    # input_ids go along with the embeddings so the repetition penalty also sees the prompt's text. Image slots and
    # padding hold placeholder ids (the pad id, a stop id for some backbones): they become an id past the logits,
    # which the penalty ignores, and are never embedded (the cache is not reused past an image slot).
    penalised_ids = input_ids.masked_fill(batch.image_mask | (attention == 0), rows)
    out = model.llm.generate(
        input_ids=penalised_ids, inputs_embeds=embeds, attention_mask=attention, generation_config=config,
        stopping_criteria=StoppingCriteriaList([ends] if ends is not None else []), streamer=streamer,
        **({"cache": cached} if cached is not None else {}),
    )
    if config.return_dict_in_generate:
        cache.kv, out = out.cache, out.sequences
        cache.ids = prompts[0].input_ids + out[0, longest:].tolist()
    replies = []
    for i, row in enumerate(out[:, longest:].tolist()):
        first_stop = next((k for k, token in enumerate(row) if token in stops.ids), None)
        ended = ends.ended[i] if ends is not None else None
        decoded = tokenizer.decode(row[:first_stop] if first_stop is not None else row[:ended])
        text = stops.cut(decoded).strip()
        if first_stop is not None and (ended is None or first_stop < ended):
            finish, tokens = "stop", first_stop + 1
        elif ended is not None:
            cancelled = cancels[i] is not None and cancels[i].is_set() and text == decoded.strip()
            finish, tokens = ("cancelled" if cancelled else "stop"), ended
        else:
            finish, tokens = "length", len(row)
        replies.append(Reply(text, tokens, finish))
    return replies


def _per_prompt(value, n: int) -> list:
    """One value per prompt: a sequence as it is, a single value for a single prompt."""
    if value is None:
        return [None] * n
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{len(value)} values for {n} prompts")
        return list(value)
    if n != 1:
        raise AlignError("streaming or cancelling a batch needs one callable or event per prompt")
    return [value]
