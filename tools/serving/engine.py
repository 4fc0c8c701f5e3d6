"""The one place requests meet the model: a bounded queue and a single worker thread that owns the pipeline, so
concurrent requests never mix conversations and each one's text streams back to whoever waits for it.

Requests are queued, not batched: `align bench serve` measured both (see its JSON), and a batch helps throughput only
when requests arrive together with the same options, while it delays everyone's first token and ends no stream early.
"""

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import torch
from align.errors import AlignError
from align.templates import Rendered
from align.tools.generation import GenerationOptions, Reply
from align.tools.images import ImageInput
from align.tools.pipeline import Pipeline


class Busy(AlignError):
    """The queue is full: the request is refused rather than left waiting without bound."""


@dataclass(frozen=True)
class Request:
    """What to generate: a rendered prompt and its image (a picture to encode, or features already encoded)."""

    prompt: Rendered
    options: GenerationOptions
    image: ImageInput | None = None
    features: torch.Tensor | None = None


@dataclass(frozen=True)
class Done:
    """The end of a request: its reply, and the image's features (kept by a conversation for its next turn)."""

    reply: Reply
    features: torch.Tensor | None


class Job:
    """One queued request: pieces of text (str), then a Done or an AlignError, delivered to a thread or an event
    loop; `cancel` drops it from the queue or ends its generation at the next token."""

    def __init__(self, request: Request, engine: "Engine", loop: asyncio.AbstractEventLoop | None = None):
        self.request = request
        self.cancelled = threading.Event()
        self.queued = True  # until the worker takes it or it is cancelled (the engine's lock guards it)
        self._engine = engine
        self._loop = loop
        self._events: queue.Queue | asyncio.Queue = asyncio.Queue() if loop is not None else queue.Queue()

    def cancel(self) -> None:
        """Give up on this request (a client that went away): its queue place is free at once."""
        self.cancelled.set()
        self._engine._leave_queue(self)

    def put(self, event: "str | Done | AlignError") -> None:
        """Hand an event to whoever waits (called by the worker)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        else:
            self._events.put(event)

    def events(self) -> Iterator["str | Done"]:
        """Text pieces, then the Done; an AlignError is raised (for a job submitted without a loop)."""
        while True:
            event = self._events.get()
            if isinstance(event, AlignError):
                raise event
            yield event
            if isinstance(event, Done):
                return

    async def events_async(self) -> AsyncIterator["str | Done"]:
        """`events` for a job submitted with an event loop."""
        while True:
            event = await self._events.get()
            if isinstance(event, AlignError):
                raise event
            yield event
            if isinstance(event, Done):
                return


class Engine:
    """A single worker generating queued requests one at a time with one pipeline."""

    def __init__(self, pipeline: Pipeline, max_queue: int = 32):
        self.pipeline = pipeline
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting = 0  # queued and not yet started
        self.finished = 0  # requests answered to the end
        self.cancelled = 0  # requests whose client left, before or during generation
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._run, name="align-serve-worker", daemon=True)
        self._worker.start()

    @property
    def waiting(self) -> int:
        """Requests queued behind the one being generated."""
        return self._waiting

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop | None = None) -> Job:
        """Queue a request; Busy when `max_queue` are already waiting."""
        with self._lock:
            if self._waiting >= self.max_queue:
                raise Busy(f"the server is busy: {self._waiting} requests are waiting; try again shortly")
            self._waiting += 1
        job = Job(request, self, loop)
        self._queue.put(job)
        return job

    def _leave_queue(self, job: Job) -> bool:
        """Count a job out of the waiting ones, once; False when it had already left (started or cancelled)."""
        with self._lock:
            if not job.queued:
                return False
            job.queued = False
            self._waiting -= 1
            return True

    def close(self) -> None:
        """Stop the worker after the request it is on."""
        self._queue.put(None)
        self._worker.join(timeout=60)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if not self._leave_queue(job):  # cancelled while it waited
                self.cancelled += 1
                continue
            try:
                done = self._generate(job)
                if done.reply.finish == "cancelled":
                    self.cancelled += 1
                else:
                    self.finished += 1
                job.put(done)
            except AlignError as exc:
                job.put(exc)
            except Exception as exc:  # the server keeps serving: the request fails with a one-line reason
                job.put(AlignError(f"generation failed: {type(exc).__name__}: {exc}"))

    def _generate(self, job: Job) -> Done:
        request, pipeline = job.request, self.pipeline
        features = request.features
        if features is None and request.image is not None:
            features = pipeline.image_features([request.image])
        streaming = request.options.num_beams == 1
        [reply] = pipeline.replies([request.prompt], features if features is not None else torch.zeros(0),
                                   request.options, on_text=job.put if streaming else None, cancel=job.cancelled)
        if not streaming and reply.text:
            job.put(reply.text)
        return Done(reply, features)
