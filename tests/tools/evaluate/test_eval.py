"""`align eval` end to end on the tiny workspace: batched answers equal one-by-one answers, a killed evaluation
continues to the answers of an uninterrupted one, stored features answer as the encoder does, a predictions file
scores as the run that wrote it, and a subsample is fixed."""

import json
import subprocess
import sys

import pytest

from align.errors import AlignError
from align.tools.evaluate.benchmarks import align_jsonl, coco_caption
from align.tools.evaluate.evaluate import evaluate_adapter, run_eval, subsample
from blip2_tiny import write_manifest


@pytest.fixture
def home(train_workspace, monkeypatch):
    monkeypatch.setenv("ALIGN_HOME", str(train_workspace["home"]))
    return train_workspace


@pytest.fixture
def questions(home, tmp_path):
    images = home["manifest"].parent
    return write_manifest(tmp_path / "qa.jsonl", [
        {"image": str(images / f"{i}.png"), "question": q, "answers": [a]}
        for i, (q, a) in enumerate([("What colour is it?", "red"), ("Is it bright?", "yes"), ("What is it?", "x")] * 4)])


def run(home, adapter, tiny_blip2, questions, out, **options):
    return evaluate_adapter(align_jsonl(questions, None), adapter, out, encoder=tiny_blip2[1], device="cpu",
                            progress=False, **options)


def answers(folder):
    return json.loads((folder / "results.json").read_text())


@pytest.mark.slow
def test_batched_answers_equal_one_by_one_and_a_killed_run_continues_to_them(home, adapter, tiny_blip2, questions,
                                                                            tmp_path, monkeypatch):
    one = run(home, adapter, tiny_blip2, questions, tmp_path / "one", batch_size=1)
    batched = run(home, adapter, tiny_blip2, questions, tmp_path / "batched", batch_size=5)
    assert answers(tmp_path / "one") == answers(tmp_path / "batched") and one.scores == batched.scores
    assert one.questions == 12 and set(one.scores) == {"accuracy", "exact_match", "questions"}

    from align.tools.pipeline import Pipeline

    real, calls = Pipeline.generate_batch, []

    def killed_after_two_batches(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "generate_batch", killed_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        run(home, adapter, tiny_blip2, questions, tmp_path / "cut", batch_size=4)
    assert len((tmp_path / "cut" / "answers-r0.jsonl").read_text().splitlines()) == 8
    monkeypatch.setattr(Pipeline, "generate_batch", real)
    resumed = run(home, adapter, tiny_blip2, questions, tmp_path / "cut", batch_size=4)
    assert answers(tmp_path / "cut") == answers(tmp_path / "one") and resumed.scores == one.scores
    with pytest.raises(AlignError, match="holds answers of another job \\(prompt differ"):
        run(home, adapter, tiny_blip2, questions, tmp_path / "cut", prompt="Say something.")


@pytest.mark.slow
def test_stored_features_answer_as_the_encoder_and_a_predictions_file_scores_alike(home, adapter, tiny_blip2,
                                                                                  questions, tmp_path):
    encoded = run(home, adapter, tiny_blip2, questions, tmp_path / "encoded")
    stored = evaluate_adapter(align_jsonl(questions, None), adapter, tmp_path / "stored", features=home["features"],
                              device="cpu", progress=False)
    assert answers(tmp_path / "encoded") == answers(tmp_path / "stored")
    rescored = run_eval(align_jsonl(questions, None), adapters=[], predictions=tmp_path / "stored" / "results.json",
                        out=None)
    assert rescored[0].scores == encoded.scores == stored.scores


def test_a_subsample_is_fixed_and_in_order():
    items = list(range(100))
    picked = subsample(items, 10)
    assert picked == subsample(items, 10) == sorted(picked) and len(picked) == 10 and subsample(items, None) == items


@pytest.mark.slow
def test_cli_scores_predictions_as_one_json_object_and_refuses_what_is_missing(home, tmp_path):
    images = home["manifest"].parent
    refs = {"images": [{"id": i, "file_name": f"{i}.png"} for i in range(3)],
            "annotations": [{"image_id": i, "caption": c} for i, c in enumerate(["a red picture", "a blue picture",
                                                                                  "a green picture"])]}
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    (tmp_path / "pred.json").write_text(json.dumps([{"image_id": 0, "caption": "a red picture"},
                                                    {"image_id": 1, "caption": "a green picture"}]))
    done = subprocess.run([sys.executable, "-m", "align", "eval", "coco-caption", "--references", tmp_path / "refs.json",
                           "--images", images, "--predictions", tmp_path / "pred.json", "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    scores = json.loads(done.stdout)
    assert scores["Bleu_1"] == pytest.approx(coco_caption(tmp_path / "refs.json", images).score(
        {0: "a red picture", 1: "a green picture"})["Bleu_1"]) and scores["images"] == 2
    assert {"Bleu_4", "ROUGE_L", "CIDEr"} <= scores.keys()
    missing = subprocess.run([sys.executable, "-m", "align", "eval", "coco-caption", "--references",
                              tmp_path / "refs.json", "--images", images], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error: give --adapter")


@pytest.mark.slow
def test_two_processes_under_torchrun_answer_as_one(home, adapter, tiny_blip2, questions, tmp_path):
    import os
    import shutil

    from align.tools.runtime import free_port

    torchrun = shutil.which("torchrun") or pytest.skip("torchrun not installed")
    one = run(home, adapter, tiny_blip2, questions, tmp_path / "one", batch_size=3)
    args = ["eval", "jsonl", "--data", questions, "--adapter", adapter, "--encoder", tiny_blip2[1], "--out",
            tmp_path / "two", "--batch-size", "3", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGN_HOME": str(home["home"])}
    two = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "align",
                          *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert answers(tmp_path / "two") == answers(tmp_path / "one")  # merged in the benchmark's order
    assert len(list((tmp_path / "two").glob("answers-r*.jsonl"))) == 2
    assert json.loads(two.stdout) == one.scores  # printed once, by rank 0


@pytest.mark.slow
def test_a_bad_question_is_a_reject_with_its_reason_and_the_rest_are_answered(home, adapter, tiny_blip2, tmp_path):
    images = home["manifest"].parent
    (tmp_path / "bad.png").write_bytes(b"not a picture")
    questions = write_manifest(tmp_path / "qa.jsonl", [
        {"image": str(images / "0.png"), "question": "What is it?", "answers": ["x"]},
        {"image": str(tmp_path / "missing.png"), "question": "What is it?", "answers": ["x"]},
        {"image": str(tmp_path / "bad.png"), "question": "What is it?", "answers": ["x"]},
        {"image": str(images / "1.png"), "question": "What is it?", "answers": ["x"]}])
    row = run(home, adapter, tiny_blip2, questions, tmp_path / "out")
    assert row.questions == 2 and row.rejected == 2
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "out" / "rejects-r0.jsonl").read_text().splitlines()]
    assert any("missing file" in r for r in reasons) and len(reasons) == 2
