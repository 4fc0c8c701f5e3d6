"""`align bench chat`: time to first text and tokens/s of a multi-turn `align chat` conversation, with the last
turn's KV cache kept and reused (the default) and without it (every turn re-runs the whole prompt), back to back."""

import statistics
import time
from pathlib import Path

import torch

from align.errors import AlignError
from align.tools.results import RESULTS_DIR, device_name, write_result
from align.tools.inference.chat_session import ChatSession
from align.tools.generation import GenerationOptions
from align.tools.pipeline import Pipeline

QUESTIONS = ("Describe this image.", "What colour is it?", "What shape is it?", "Describe it again, please.")


def conversation(pipeline: Pipeline, image: Path, keep_cache: bool, turns: int, max_new_tokens: int) -> list[dict]:
    """Per turn: prompt tokens, seconds to the first text shown, generated tokens and seconds in all."""
    session = ChatSession(pipeline, keep_cache=keep_cache)
    session.set_image(image)
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    rows = []
    for turn in range(turns):
        question = QUESTIONS[turn % len(QUESTIONS)]
        prompt_tokens = len(pipeline.prompt([*session.turns, (question, None)], True, max_new_tokens).input_ids)
        first: list[float] = []
        started = time.perf_counter()
        reply = session.ask(question, options, on_text=lambda text: first.append(time.perf_counter()) if not first else None)
        seconds = time.perf_counter() - started
        rows.append({"turn": turn + 1, "prompt_tokens": prompt_tokens, "reply_tokens": len(pipeline.tokenizer.encode(reply)),
                     "first_text_seconds": round((first[0] if first else time.perf_counter()) - started, 5),
                     "seconds": round(seconds, 5)})
    return rows


def bench_chat(workspace: Path, *, turns: int = 8, max_new_tokens: int = 24, out_dir: Path = RESULTS_DIR) -> tuple[dict, Path]:
    """Both ways on an `align demo` workspace's chat adapter; the JSON result and where it was written."""
    workspace = Path(workspace)
    adapter = workspace / "runs" / "chat" / "adapter"
    if not adapter.is_dir():
        raise AlignError(f"{workspace} is not an `align demo` workspace (run `align demo --out {workspace}` first)")
    pipeline = Pipeline.load(adapter, model=workspace / "llm", encoder=workspace / "encoder", device="cpu")
    image = sorted((workspace / "images" / "held_out").glob("*.png"))[0]
    conversation(pipeline, image, True, 1, max_new_tokens)  # warm-up
    runs = {"without_cache": conversation(pipeline, image, False, turns, max_new_tokens),
            "with_cache": conversation(pipeline, image, True, turns, max_new_tokens)}

    def summary(rows: list[dict]) -> dict:
        later = rows[1:] or rows
        return {"median_first_text_seconds_after_turn_1": statistics.median(r["first_text_seconds"] for r in later),
                "tokens_per_second": round(sum(r["reply_tokens"] for r in rows) / sum(r["seconds"] for r in rows), 1)}

    without, with_cache = summary(runs["without_cache"]), summary(runs["with_cache"])
    result = {
        "bench": "chat", "device": device_name(torch.device("cpu")), "workspace": str(workspace), "turns": turns,
        "command": f"align bench chat --workspace {workspace} --turns {turns}", "max_new_tokens": max_new_tokens,
        "without_cache": without, "with_cache": with_cache,
        "first_text_speedup": round(without["median_first_text_seconds_after_turn_1"]
                                    / max(1e-9, with_cache["median_first_text_seconds_after_turn_1"]), 2),
        "turns_detail": runs,
    }
    return write_result(result, out_dir, "chat")
