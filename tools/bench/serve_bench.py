"""`align bench serve`: time to first token and tokens/s of `align serve`'s API for 1 and 8 concurrent clients
(streamed requests through HTTP, as clients send them), with requests queued one at a time (--max-batch 1) and
batched (the default); and whether a batch changes any greedy answer."""

import base64
import json
import statistics
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

from align.constants import DEFAULT_QUESTION
from align.errors import AlignError
from align.tools.generation import GenerationOptions
from align.tools.pipeline import Pipeline
from align.tools.results import RESULTS_DIR, device_name, write_result
from align.tools.serving.chat_request import Limits
from align.tools.serving.engine import Engine
from align.tools.serving.server import bind, build_app


def client_run(api: str, images: list[Path], requests: int, max_tokens: int, offset: int) -> list[dict]:
    """One client's streamed requests, one after another: seconds to the first text, in all, and tokens."""
    rows = []
    with httpx.Client(trust_env=False, timeout=600) as http:
        for i in range(requests):
            image = images[(offset + i) % len(images)]
            url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
            body = {"stream": True, "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                             {"type": "text", "text": DEFAULT_QUESTION}]}]}
            started, first, tokens = time.perf_counter(), None, 0
            with http.stream("POST", f"{api}/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raise AlignError(f"the server answered {response.status_code}: {response.read().decode()[:200]}")
                for line in response.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line.removeprefix("data: "))
                    if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                        first = time.perf_counter()
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            ended = time.perf_counter()
            rows.append({"first_token_seconds": round((first or ended) - started, 5),
                         "seconds": round(ended - started, 5), "tokens": tokens})
    return rows


def concurrent(api: str, images: list[Path], clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` clients at once, each sending `requests` requests in turn."""
    results: list[list[dict]] = [[] for _ in range(clients)]
    failures: list[Exception] = []

    def run(k: int) -> None:
        try:
            results[k] = client_run(api, images, requests, max_tokens, k * requests)
        except Exception as exc:  # reported after the others finish
            failures.append(exc)

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if failures:
        raise AlignError(f"a client failed: {failures[0]}")
    rows = [row for rows in results for row in rows]
    firsts = sorted(r["first_token_seconds"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    return {"clients": clients, "requests": len(rows), "tokens": tokens, "wall_seconds": round(wall, 3),
            "median_first_token_seconds": round(statistics.median(firsts), 4),
            "p90_first_token_seconds": round(firsts[int(0.9 * (len(firsts) - 1))], 4),
            "tokens_per_second_all_clients": round(tokens / wall, 1),
            "tokens_per_second_per_client": round(statistics.mean(r["tokens"] / r["seconds"] for r in rows), 1)}


def batched_answers(pipeline: Pipeline, images: list[Path], max_tokens: int) -> dict:
    """How many of these greedy answers differ when generated as one left-padded batch instead of one at a time."""
    prompt = pipeline.prompt([(DEFAULT_QUESTION, None)], True, max_tokens)
    options = GenerationOptions(max_new_tokens=max_tokens)
    features = [pipeline.image_features([image]) for image in images]
    alone = [pipeline.replies([prompt], f, options)[0].text for f in features]
    batched = [r.text for r in pipeline.replies([prompt] * len(images), torch.cat(features), options)]
    return {"requests": len(images), "differing": sum(a != b for a, b in zip(alone, batched))}


def serving(pipeline: Pipeline, adapter: Path, max_batch: int, images: list[Path], clients: tuple[int, ...],
            requests: int, max_tokens: int) -> dict:
    """An API server in this process with `max_batch`, and the client runs against it."""
    engine = Engine(pipeline, max_queue=max(clients) * 2, max_batch=max_batch)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(build_app(engine, adapter=adapter, ui=False, limits=Limits()),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        api = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        client_run(api, images, 2, max_tokens, 0)  # warm-up
        runs = {f"clients_{n}": concurrent(api, images, n, requests, max_tokens) for n in clients}
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        engine.close()
    return {**runs, "batch_sizes": dict(sorted(engine.batch_sizes.items()))}


def bench_serve(workspace: Path, *, requests: int = 6, max_tokens: int = 32, clients: tuple[int, ...] = (1, 8),
                dtype: str | None = None, out_dir: Path = RESULTS_DIR) -> tuple[dict, Path]:
    """`align serve`'s API on an `align demo` workspace's chat adapter (its own tiny LLM, or the registered one
    `--backbone` used); the JSON result and where it was written."""
    workspace = Path(workspace)
    adapter = workspace / "runs" / "chat" / "adapter"
    if not adapter.is_dir():
        raise AlignError(f"{workspace} is not an `align demo` workspace (run `align demo --out {workspace}` first)")
    model = workspace / "llm" if (workspace / "llm").is_dir() else None
    pipeline = Pipeline.load(adapter, model=model, encoder=workspace / "encoder", device="cpu", dtype=dtype)
    images = sorted((workspace / "images" / "held_out").glob("*.png"))
    modes = {"queued": serving(pipeline, adapter, 1, images, clients, requests, max_tokens),
             "batched": serving(pipeline, adapter, 8, images, clients, requests, max_tokens)}
    command = f"align bench serve --workspace {workspace} --requests {requests} --max-tokens {max_tokens}"
    result = {"bench": "serve", "device": device_name(torch.device("cpu")), "workspace": str(workspace),
              "backbone": pipeline.spec.name, "dtype": str(pipeline.model.llm.dtype).removeprefix("torch."),
              "command": command + (f" --dtype {dtype}" if dtype else ""), "max_tokens": max_tokens, "requests_per_client": requests, **modes,
              "batched_answers": batched_answers(pipeline, images[:8], max_tokens)}
    return write_result(result, out_dir, "serve")
