"""The OpenAI-compatible HTTP API: `POST /v1/chat/completions` (plain or streamed as server-sent events) and
`GET /v1/models`, over the engine's queue. Errors are OpenAI's error object with the HTTP status that fits."""

import asyncio
import json
import secrets
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from align.errors import AlignError, TemplateError
from align.tools.serving.chat_request import BadRequest, ChatRequest, Limits, parse_chat_request
from align.tools.serving.engine import Busy, Done, Engine, Job
from align.tools.serving.engine import Request as EngineRequest

DISCONNECT_POLL_SECONDS = 0.25


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """OpenAI's error object."""
    kind = {401: "authentication_error", 503: "server_error"}.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class BodyLimit:
    """Refuses a request body over `max_bytes` with 413: by its Content-Length, or, sent without one, as it arrives
    (held until it ends, never past the limit, then handed on) (ASGI middleware)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error_response(413, f"the request body is over the limit of {self.max_bytes} bytes")
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await too_large(scope, receive, send)
            return await self.app(scope, receive, send)
        if headers.get(b"transfer-encoding") is None:  # no body at all
            return await self.app(scope, receive, send)
        held, seen = [], 0
        while True:
            message = await receive()
            held.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                return await too_large(scope, receive, send)
            if not message.get("more_body"):
                break

        async def replay():
            return held.pop(0) if held else await receive()

        await self.app(scope, replay, send)


def add_api(app: FastAPI, engine: Engine, *, served_name: str, limits: Limits, image_root: Path | None,
            api_key: str | None) -> None:
    """The /v1 routes on `app`, answering from `engine`."""
    pipeline = engine.pipeline
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, "the request body is not valid JSON")

    def refused(request: Request) -> JSONResponse | None:
        if api_key is None:
            return None
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            return error_response(401, "a valid API key is needed: send it as 'Authorization: Bearer KEY'",
                                  code="invalid_api_key")
        return None

    @app.get("/health")
    async def health():
        """For load balancers and people: up, and how busy (no key needed)."""
        return {"status": "ok", "model": served_name, "waiting": engine.waiting, "finished": engine.finished,
                "cancelled": engine.cancelled, "batch_sizes": dict(sorted(engine.batch_sizes.items()))}

    @app.get("/v1/models")
    async def models(request: Request):
        if (response := refused(request)) is not None:
            return response
        return {"object": "list", "data": [{"id": served_name, "object": "model", "created": created,
                                            "owned_by": "align"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if (response := refused(request)) is not None:
            return response
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(400, "the request body is not valid JSON")
        try:
            asked, job = await run_in_threadpool(prepare, body, asyncio.get_running_loop())
        except BadRequest as exc:
            return error_response(exc.status, str(exc), exc.param, exc.code)
        except Busy as exc:
            return error_response(503, str(exc), code="server_busy")
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served_name}
        if asked.stream:
            return StreamingResponse(stream(request, job, asked, meta), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        done = None
        try:
            async for event in watched(request, job):
                if isinstance(event, Done):
                    done = event
        except AlignError as exc:
            return error_response(500, str(exc))
        if done is None:  # the client went away
            return error_response(499, "the client closed the request")
        return {**meta, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done.reply.text},
                             "finish_reason": finish_reason(done)}],
                "usage": usage(job, done)}

    def prepare(body: object, loop: asyncio.AbstractEventLoop) -> tuple[ChatRequest, Job]:
        """Check and render the request and queue it (in a worker thread: images decode, prompts tokenize)."""
        asked = parse_chat_request(body, limits, image_root)
        if asked.model not in (None, served_name):
            raise BadRequest(f"model '{asked.model}' is not served here; this server serves '{served_name}'",
                             "model", 404, "model_not_found")
        try:
            prompt = pipeline.prompt(asked.turns, asked.image is not None,
                                     asked.options.max_new_tokens if asked.max_tokens_given else 1,
                                     system=asked.system, drop_oldest=False)
        except TemplateError as exc:  # e.g. a system message for a template without a system role
            raise BadRequest(str(exc), "messages") from None
        except AlignError as exc:
            raise BadRequest(str(exc), "messages", code="context_length_exceeded") from None
        return asked, engine.submit(EngineRequest(prompt, asked.options, image=asked.image), loop)

    async def watched(request: Request, job: Job):
        """The job's events; a client that disconnects cancels the job (its queue slot or the model is freed)."""
        events = job.events_async()
        try:
            while True:
                following = asyncio.ensure_future(anext(events))
                while not following.done():
                    await asyncio.wait([following], timeout=DISCONNECT_POLL_SECONDS)
                    if not following.done() and await request.is_disconnected():
                        following.cancel()
                        return
                try:
                    yield following.result()
                except StopAsyncIteration:
                    return
        finally:
            job.cancel()  # a no-op once the job is done

    async def stream(request: Request, job: Job, asked: ChatRequest, meta: dict):
        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            payload = {**meta, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        try:
            async for event in watched(request, job):
                if isinstance(event, Done):
                    yield chunk({}, finish_reason(event))
                    if asked.include_usage:
                        yield f"data: {json.dumps({**meta, 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage(job, event)})}\n\n"
                else:
                    yield chunk({"content": event})
        except AlignError as exc:  # the status is already sent: the error goes in the stream, as OpenAI's does
            error = {"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}}
            yield f"data: {json.dumps(error)}\n\n"
        finally:  # also when the server stops sending because the client went away
            job.cancel()
        yield "data: [DONE]\n\n"


def finish_reason(done: Done) -> str:
    """OpenAI's finish_reason for how a reply ended."""
    return "length" if done.reply.finish == "length" else "stop"


def usage(job: Job, done: Done) -> dict:
    """OpenAI's token counts: the prompt's ids (image slots included) and the reply's."""
    prompt = len(job.request.prompt.input_ids)
    return {"prompt_tokens": prompt, "completion_tokens": done.reply.tokens, "total_tokens": prompt + done.reply.tokens}
