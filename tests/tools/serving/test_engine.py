"""The serving engine: one worker, a bounded queue, streamed text that adds up to the reply, cancellation that frees
the model at the next token, and the same greedy answer the Pipeline gives."""

import pytest

from align.errors import AlignError
from align.tools.generation import GenerationOptions
from align.tools.pipeline import Pipeline
from align.tools.serving.engine import Busy, Done, Engine, Request

QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def pipeline(train_workspace, adapter, tiny_blip2):
    import os

    os.environ["ALIGN_HOME"] = str(train_workspace["home"])
    try:
        yield Pipeline.load(adapter, encoder=tiny_blip2[1], device="cpu")
    finally:
        os.environ.pop("ALIGN_HOME", None)


@pytest.fixture
def engine(pipeline):
    engine = Engine(pipeline, max_queue=1)
    yield engine
    engine.close()


def picture(train_workspace, i=0):
    return train_workspace["manifest"].parent / f"{i}.png"


def request(pipeline, image, options: GenerationOptions) -> Request:
    return Request(pipeline.prompt([(QUESTION, None)], True, options.max_new_tokens), options, image=image)


def test_streamed_pieces_add_up_to_the_pipeline_s_greedy_answer(engine, pipeline, train_workspace):
    options = GenerationOptions(max_new_tokens=12)
    events = list(engine.submit(request(pipeline, picture(train_workspace), options)).events())
    pieces, done = events[:-1], events[-1]
    assert isinstance(done, Done) and all(isinstance(p, str) for p in pieces) and len(pieces) > 1
    assert "".join(pieces) == done.reply.text == pipeline.generate(picture(train_workspace), QUESTION, options)
    assert done.reply.finish == "length" and done.reply.tokens == 12
    assert done.features.shape == pipeline.image_features([picture(train_workspace)]).shape


def test_a_cancelled_job_frees_the_model_at_the_next_token_and_a_queued_one_never_runs(engine, pipeline, train_workspace):
    long = GenerationOptions(max_new_tokens=400)
    running = engine.submit(request(pipeline, picture(train_workspace), long))
    events = running.events()
    assert isinstance(next(events), str)  # generating now
    queued = engine.submit(request(pipeline, picture(train_workspace, 1), long))
    with pytest.raises(Busy, match="1 requests are waiting"):
        engine.submit(request(pipeline, picture(train_workspace, 2), long))
    queued.cancel()  # its place is free at once, though the model is still on the first job
    engine.submit(request(pipeline, picture(train_workspace, 2), long)).cancel()
    running.cancel()
    done = [e for e in events if isinstance(e, Done)][0]
    assert done.reply.finish == "cancelled" and done.reply.tokens < 400
    after = list(engine.submit(request(pipeline, picture(train_workspace), GenerationOptions(max_new_tokens=3))).events())
    assert isinstance(after[-1], Done) and after[-1].reply.tokens == 3
    assert queued._events.empty()  # skipped: nothing was generated for it


def test_seed_stops_and_a_failing_request_leave_the_engine_serving(engine, pipeline, train_workspace):
    sampled = GenerationOptions(max_new_tokens=10, temperature=1.5, seed=3)
    first, second = ([e for e in engine.submit(request(pipeline, picture(train_workspace), sampled)).events()][-1]
                     for _ in range(2))
    assert first.reply.text == second.reply.text
    greedy = pipeline.generate(picture(train_workspace), QUESTION, GenerationOptions(max_new_tokens=12))
    cut = next(c for c in greedy[2:] if c.isalpha())  # a random LLM: no words, but letters
    stopped = list(engine.submit(request(pipeline, picture(train_workspace), GenerationOptions(max_new_tokens=12, stop=(cut,)))).events())[-1]
    assert stopped.reply.finish == "stop" and cut not in stopped.reply.text and greedy.startswith(stopped.reply.text)
    with pytest.raises(AlignError, match="cannot read image"):
        list(engine.submit(request(pipeline, train_workspace["root"] / "missing.png", GenerationOptions())).events())
    assert list(engine.submit(request(pipeline, picture(train_workspace), GenerationOptions(max_new_tokens=2))).events())[-1].reply.tokens == 2


def test_requests_waiting_together_are_batched_with_the_answers_each_gets_alone(pipeline, train_workspace):
    engine = Engine(pipeline, max_queue=8, max_batch=4)
    try:
        greedy = GenerationOptions(max_new_tokens=10)
        asked = [request(pipeline, picture(train_workspace, i), greedy) for i in range(5)]
        alone = [pipeline.replies([r.prompt], pipeline.image_features([r.image]), greedy)[0] for r in asked]
        running = engine.submit(request(pipeline, picture(train_workspace, 9), GenerationOptions(max_new_tokens=380)))
        first = running.events()
        next(first)  # the model is busy: the next five wait together
        jobs = [engine.submit(r) for r in asked]
        sampled = engine.submit(request(pipeline, picture(train_workspace), GenerationOptions(max_new_tokens=10, seed=1,
                                                                                          temperature=1.0)))
        list(first)
        results = [list(job.events()) for job in jobs]
        list(sampled.events())
    finally:
        engine.close()
    assert [r[-1].reply for r in results] == alone  # text, token count and why each ended
    assert ["".join(r[:-1]) for r in results] == [a.text for a in alone]  # each row streamed its own reply
    assert engine.batch_sizes == {1: 3, 4: 1}  # the long one, four together, the fifth, the seeded one alone
