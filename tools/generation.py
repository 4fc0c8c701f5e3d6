"""Generation from rendered prompts: left-padded batches, the template's stop ids and stop strings, token streaming."""

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

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


class _StopOnStrings(StoppingCriteria):
    """Ends each sequence whose new text contains a stop string (stop ids are handled by eos_token_id)."""

    def __init__(self, tokenizer: TextTokenizer, stops: Stops, prompt_length: int):
        self.tokenizer, self.stops, self.prompt_length = tokenizer, stops, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = [any(s in self.tokenizer.decode(row[self.prompt_length:].tolist()) for s in self.stops.strings)
                for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _OnEvent(StoppingCriteria):
    """Ends every sequence once `event` is set: a client that went away frees the model at the next token."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _TextStream(BaseStreamer):
    """Hands `on_text` each new piece of reply text as tokens arrive, holding back what may be a stop string,
    half of a multi-byte character or trailing spaces."""

    def __init__(self, tokenizer: TextTokenizer, stops: Stops, on_text: Callable[[str], None]):
        self.tokenizer, self.stops, self.on_text = tokenizer, stops, on_text
        self.ids: list[int] = []
        self.shown = 0
        self.prompt_seen = False
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.ids += [i for i in value.reshape(-1).tolist() if i not in self.stops.ids]
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
    options: GenerationOptions, on_text: Callable[[str], None] | None = None, cache: TurnCache | None = None,
    cancel: threading.Event | None = None,
) -> list[Reply]:
    """One reply per prompt; prompts are left-padded into one batch; `features` fill the image slots in order.
    With a `cache` (one prompt, no beam search), the last turn's keys and values are reused and kept for the next.
    Setting `cancel` ends generation at the next token."""
    if on_text is not None and (len(prompts) != 1 or options.num_beams > 1):
        raise AlignError("streaming needs one prompt and no beam search (use --beams 1)")
    stops = stops.adding(options.stop)
    device = model.llm.get_input_embeddings().weight.device
    batch = pad_batch(prompts, tokenizer.pad_id, left=True).to(device)
    input_ids, attention, longest = batch.input_ids, batch.attention_mask, batch.input_ids.shape[1]
    embeds = model.embed(input_ids, batch.image_mask, features.to(device))
    criteria = StoppingCriteriaList([_StopOnStrings(tokenizer, stops, longest)] if stops.strings else [])
    if cancel is not None:
        criteria.append(_OnEvent(cancel))
    streamer = _TextStream(tokenizer, stops, on_text) if on_text is not None else None
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
        stopping_criteria=criteria, streamer=streamer, **({"cache": cached} if cached is not None else {}),
    )
    if config.return_dict_in_generate:
        cache.kv, out = out.cache, out.sequences
        cache.ids = prompts[0].input_ids + out[0, longest:].tolist()
    replies = []
    for row in out[:, longest:].tolist():
        ends = [i for i, token in enumerate(row) if token in stops.ids]
        decoded = tokenizer.decode(row[:ends[0]] if ends else row)
        text = stops.cut(decoded).strip()
        if ends or text != decoded.strip():
            finish, tokens = "stop", (ends[0] + 1 if ends else len(row))
        else:
            finish, tokens = ("cancelled" if cancel is not None and cancel.is_set() else "length"), len(row)
        replies.append(Reply(text, tokens, finish))
    return replies
