"""`align serve`'s API through the official openai client against a live server on the demo workspace: plain,
streamed, images, the key, every bad request, concurrency, disconnects, memory, and the same greedy answer as
`align chat --question` and the Pipeline."""

import base64
import json
import threading
import time

import httpx
import openai
import pytest

from align.constants import DEFAULT_QUESTION
from align.tools.generation import GenerationOptions
from align.tools.pipeline import Pipeline
from conftest import run_align
from live_server import LiveServer

pytestmark = pytest.mark.slow
KEY = "test-key-123"


def direct() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=120)  # 127.0.0.1 whatever proxy the machine sets


@pytest.fixture(scope="module")
def served(demo):
    ws, _, home = demo
    server = LiveServer(["--adapter", ws / "runs/chat/adapter", "--model", ws / "llm", "--encoder", ws / "encoder",
                         "--api-key", KEY, "--image-root", ws / "images", "--max-body-mb", "1", "--no-ui"], home)
    yield server, ws, home
    code, said = server.stop()
    assert code == 0 and "server stopped" in said and "Traceback" not in said, said[-2000:]  # Ctrl-C stops it cleanly


@pytest.fixture(scope="module")
def client(served):
    server, _, _ = served
    return openai.OpenAI(base_url=server.api, api_key=KEY, http_client=direct(), max_retries=0)


def held_out(ws, i=0):
    return sorted((ws / "images" / "held_out").glob("*.png"))[i]


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def asking(url: str, question: str = DEFAULT_QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def test_the_model_is_listed_and_a_data_url_image_is_answered_as_chat_and_the_pipeline_answer(served, client):
    server, ws, home = served
    assert [m.id for m in client.models.list().data] == ["demo-tiny"]
    answer = client.chat.completions.create(model="demo-tiny", messages=asking(data_url(held_out(ws))))
    text = answer.choices[0].message.content
    chat = run_align("chat", "--adapter", ws / "runs/chat/adapter", "--model", ws / "llm", "--encoder", ws / "encoder",
                     "--image", held_out(ws), "--question", DEFAULT_QUESTION, home=home)
    assert chat.returncode == 0, chat.stderr[-2000:]
    pipeline = Pipeline.load(ws / "runs/chat/adapter", model=ws / "llm", encoder=ws / "encoder", device="cpu")
    assert text == chat.stdout.strip() == pipeline.generate(held_out(ws), DEFAULT_QUESTION)
    assert text.startswith("It is a ") and answer.choices[0].finish_reason == "stop"
    prompt = len(pipeline.prompt([(DEFAULT_QUESTION, None)], True).input_ids)
    assert answer.usage.prompt_tokens == prompt
    assert answer.usage.completion_tokens == len(pipeline.tokenizer.encode(text)) + 1  # and the stop id
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_a_stream_adds_up_to_the_plain_answer_and_ends_with_done(served, client):
    server, ws, _ = served
    plain = client.chat.completions.create(model="demo-tiny", messages=asking("held_out/" + held_out(ws, 1).name))
    chunks = list(client.chat.completions.create(model="demo-tiny", messages=asking(f"file://{held_out(ws, 1)}"),
                                                 stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 2 and "".join(pieces) == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens
    with direct() as http:  # the wire format itself: server-sent events ending with [DONE]
        body = {"messages": asking(data_url(held_out(ws, 1))), "stream": True}
        with http.stream("POST", f"{server.api}/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {KEY}"}) as response:
            lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_options_max_tokens_stop_and_a_multi_turn_conversation(served, client):
    _, ws, _ = served
    short = client.chat.completions.create(model="demo-tiny", messages=asking(data_url(held_out(ws))), max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    stopped = client.chat.completions.create(model="demo-tiny", messages=asking(data_url(held_out(ws))), stop=[" a "])
    assert stopped.choices[0].message.content == "It is" and stopped.choices[0].finish_reason == "stop"
    turns = asking(data_url(held_out(ws))) + [{"role": "assistant", "content": "It is a red circle."},
                                              {"role": "user", "content": DEFAULT_QUESTION}]
    again = client.chat.completions.create(model="demo-tiny", messages=turns, max_completion_tokens=20)
    assert again.choices[0].message.content.startswith("It is")
    sampled = [client.chat.completions.create(model="demo-tiny", messages=asking(data_url(held_out(ws))),
                                              temperature=1.5, seed=11).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_without_the_key_the_api_answers_401(served):
    server, ws, _ = served
    for key in ("", "wrong"):
        client = openai.OpenAI(base_url=server.api, api_key=key or "none", http_client=direct(), max_retries=0)
        with pytest.raises(openai.AuthenticationError) as refused:
            client.chat.completions.create(model="demo-tiny", messages=asking(data_url(held_out(ws))))
        assert refused.value.status_code == 401 and refused.value.body["code"] == "invalid_api_key"
    with direct() as http:
        assert http.get(f"{server.api}/models").status_code == 401


BAD = [
    (dict(messages=[]), 400, "messages must be a non-empty list"),
    (dict(messages=[{"role": "assistant", "content": "hi"}]), 400, "expected a user message"),
    (dict(messages=asking("https://example.com/cat.png")), 400, "fetches no URLs"),
    (dict(messages=asking("../../../etc/passwd")), 400, "outside the server's --image-root"),
    (dict(messages=asking("data:image/png;base64,bm90IGFuIGltYWdl")), 400, "not an image file"),
    (dict(messages=asking("data:image/png;base64,@@")), 400, "not valid base64"),
    (dict(messages=[{"role": "user", "content": "x" * 40_000}]), 400, "over the limit of 32000"),
    (dict(messages=[{"role": "user", "content": "hi " * 3000}]), 400, "past the model's context"),
    (dict(messages=[{"role": "user", "content": "hi"}], max_tokens=10**6), 400, "past the model's context"),
    (dict(messages=[{"role": "user", "content": "hi"}], n=2), 400, "n must be 1"),
    (dict(messages=[{"role": "user", "content": "hi"}], temperature=5), 400, "between 0 and 2"),
    (dict(messages=[{"role": "user", "content": "hi"}], stop=["a", "b", "c", "d", "e"]), 400, "at most 4"),
    (dict(messages=[{"role": "user", "content": "hi"}], tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
]


@pytest.mark.parametrize("asked, status, message", BAD, ids=[b[2] for b in BAD])
def test_every_bad_request_is_an_openai_error_object_with_its_status(served, client, asked, status, message):
    model = asked.pop("model", "demo-tiny")
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model=model, **asked)
    error = refused.value.body
    assert refused.value.status_code == status and message in error["message"] and "\n" not in error["message"]
    assert error["type"] == "invalid_request_error"


def test_an_unknown_model_a_broken_body_and_an_oversized_one_are_refused(served, client):
    server, ws, _ = served
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=asking(data_url(held_out(ws))))
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    with direct() as http:
        broken = http.post(f"{server.api}/chat/completions", content=b"{not json", headers=headers)
        assert broken.status_code == 400 and broken.json()["error"]["message"] == "the request body is not valid JSON"
        huge = "data:image/png;base64," + "A" * (2 * 2**20)  # the server was started with --max-body-mb 1
        body = json.dumps({"model": "demo-tiny", "messages": asking(huge)})
        too_large = http.post(f"{server.api}/chat/completions", content=body, headers=headers)
        assert too_large.status_code == 413 and "over the limit of 1048576 bytes" in too_large.json()["error"]["message"]

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(40):
                yield b" " * 2**16
        streamed = http.post(f"{server.api}/chat/completions", content=chunks(), headers=headers)
        assert streamed.status_code == 413
    assert client.chat.completions.create(model="demo-tiny", messages=asking(data_url(held_out(ws)))).choices


def test_eight_concurrent_clients_get_the_answers_each_gets_alone(served, client):
    _, ws, _ = served
    images = [held_out(ws, i) for i in range(8)]
    alone = [client.chat.completions.create(model="demo-tiny", messages=asking(data_url(p))).choices[0].message.content
             for p in images]
    together = [None] * 8

    def ask(i):
        stream = i % 2 == 0
        answer = client.chat.completions.create(model="demo-tiny", messages=asking(data_url(images[i])), stream=stream)
        together[i] = ("".join(c.choices[0].delta.content or "" for c in answer if c.choices) if stream
                       else answer.choices[0].message.content)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together == alone and len(set(alone)) > 1


def test_memory_stays_flat_over_hundreds_of_requests(served):
    server, ws, _ = served
    body = {"model": "demo-tiny", "messages": asking(data_url(held_out(ws, 3))), "max_tokens": 8}
    headers = {"Authorization": f"Bearer {KEY}"}
    with direct() as http:
        def run(n):
            for i in range(n):
                body["stream"] = i % 2 == 0
                assert http.post(f"{server.api}/chat/completions", json=body, headers=headers).status_code == 200
        run(60)  # warm: allocator pools, caches, lazily built things
        before = server.rss_kib()
        run(300)
        after = server.rss_kib()
    assert after - before < 20 * 1024, f"resident memory grew by {after - before} KiB over 300 requests"


@pytest.fixture(scope="module")
def narrow(train_workspace, adapter, tiny_blip2):
    """A registered real-layout backbone (a random tiny LLaMA in Vicuna's template: its replies run long) served with
    room for one waiting request."""
    server = LiveServer(["--adapter", adapter, "--encoder", tiny_blip2[1], "--max-queue", "1", "--no-ui"],
                        train_workspace["home"])
    yield server, train_workspace["manifest"].parent / "0.png"
    server.stop()


def long_stream(http: httpx.Client, server, image):
    """A streamed request that runs long (a random LLM rarely says its stop id)."""
    body = {"messages": asking(data_url(image)), "stream": True, "max_tokens": 380}
    return http.stream("POST", f"{server.api}/chat/completions", json=body)


def test_a_registered_backbone_answers_through_the_api_as_through_the_pipeline(narrow, adapter, tiny_blip2, train_workspace, monkeypatch):
    server, image = narrow
    client = openai.OpenAI(base_url=server.api, api_key="unused", http_client=direct(), max_retries=0)
    answer = client.chat.completions.create(model="tiny-llama", messages=asking(data_url(image)), max_tokens=12)
    monkeypatch.setenv("ALIGN_HOME", str(train_workspace["home"]))
    pipeline = Pipeline.load(adapter, encoder=tiny_blip2[1], device="cpu")
    assert pipeline.template.name == "vicuna-v1.1"
    assert answer.choices[0].message.content == pipeline.generate(image, DEFAULT_QUESTION, GenerationOptions(max_new_tokens=12))
    # a system message replaces the backbone's system text, as Pipeline.prompt(system=...) does
    told = client.chat.completions.create(model="tiny-llama", max_tokens=12,
                                          messages=[{"role": "system", "content": "Be brief."}, *asking(data_url(image))])
    prompt = pipeline.prompt([(DEFAULT_QUESTION, None)], True, 12, system="Be brief.")
    [expected] = pipeline.replies([prompt], pipeline.image_features([image]), GenerationOptions(max_new_tokens=12))
    assert told.choices[0].message.content == expected.text and told.usage.prompt_tokens == len(prompt.input_ids)


def test_a_full_queue_answers_503_and_the_rest_are_answered(narrow):
    server, image = narrow
    body = {"messages": asking(data_url(image)), "max_tokens": 380}
    statuses = [None] * 8

    def ask(i):
        with direct() as http:
            statuses[i] = http.post(f"{server.api}/chat/completions", json=body)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    busy = [r for r in statuses if r.status_code == 503]
    answered = [r.json()["choices"][0]["message"]["content"] for r in statuses if r.status_code == 200]
    assert busy and answered and len(busy) + len(answered) == 8  # one generating, one waiting, the rest refused
    assert busy[0].json()["error"] == {"message": "the server is busy: 1 requests are waiting; try again shortly",
                                       "type": "server_error", "param": None, "code": "server_busy"}
    assert len(set(answered)) == 1


def test_a_client_that_leaves_mid_stream_frees_the_model_at_once(narrow):
    server, image = narrow
    with direct() as http:
        before = http.get(f"{server.url}/health").json()
        with direct() as leaving:
            with long_stream(leaving, server, image) as running:
                lines = running.iter_lines()
                next(lines), next(lines)  # generating now
        for _ in range(40):
            after = http.get(f"{server.url}/health").json()
            if after["cancelled"] > before["cancelled"]:
                break
            time.sleep(0.05)
        assert after["cancelled"] == before["cancelled"] + 1 and after["finished"] == before["finished"]
        answer = http.post(f"{server.api}/chat/completions", json={"messages": asking(data_url(image)), "max_tokens": 4})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4


def test_align_serve_refuses_what_it_cannot_serve_in_one_line(demo, tmp_path):
    import socket

    ws, _, home = demo
    base = ["serve", "--adapter", ws / "runs/chat/adapter", "--model", ws / "llm"]
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    cases = [
        (base, "align serve needs --encoder PATH"),
        (base + ["--encoder", ws / "encoder", "--no-ui", "--no-api"], "--no-ui and --no-api together leave nothing"),
        (base + ["--encoder", ws / "encoder", "--port", port], f"cannot listen on 127.0.0.1:{port}"),
        (base + ["--encoder", ws / "encoder", "--image-root", tmp_path / "nowhere"], "is not a folder"),
        (base + ["--encoder", ws / "encoder", "--examples", tmp_path / "missing.png"], "does not exist"),
    ]
    try:
        for args, message in cases:
            result = run_align(*args, home=home, timeout=120)
            assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
            assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1
    finally:
        taken.close()
