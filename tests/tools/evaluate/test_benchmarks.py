"""Each benchmark read from a tiny copy of its published format: the questions asked, the results format written
and read back (a predictions file from any model), and the scores of those predictions."""

import base64
import io
import json

import pytest
from PIL import Image

from align.tools.evaluate.benchmarks import BenchmarkError, align_jsonl, coco_caption, mmbench, mme, pope, scienceqa, \
    vqa


def roundtrip(benchmark, answers, tmp_path):
    """Scores of `answers` after writing them in the results format and reading that file back."""
    results = benchmark.results_of(answers)
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps(results))
    return benchmark.score(benchmark.read_predictions(path))


def test_vqa_finds_images_by_the_pattern_and_scores_the_official_way(tmp_path):
    (tmp_path / "q.json").write_text(json.dumps({"questions": [
        {"question_id": 10, "image_id": 7, "question": "How many?"}, {"question_id": 11, "image_id": 8, "question": "Is it?"}]}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [
        {"question_id": 10, "answers": [{"answer": "2"}] * 10, "answer_type": "number", "question_type": "how many"},
        {"question_id": 11, "answers": [{"answer": "yes"}] * 10, "answer_type": "yes/no", "question_type": "is"}]}))
    benchmark = vqa(tmp_path / "q.json", tmp_path / "a.json", tmp_path, "COCO_val2014_{image_id:012d}.jpg")
    assert [q.image.name for q in benchmark.questions] == ["COCO_val2014_000000000007.jpg", "COCO_val2014_000000000008.jpg"]
    scores = roundtrip(benchmark, {10: "2", 11: "no"}, tmp_path)
    assert scores["overall"] == 50.0 and scores["perAnswerType"] == {"number": 100.0, "yes/no": 0.0}


def test_pope_reads_llava_files_and_scores_per_category(tmp_path):
    lines = [{"question_id": i, "image": f"{i}.jpg", "text": "Is there a dog in the image?", "label": label,
              "category": cat} for i, (label, cat) in enumerate([("yes", "random"), ("no", "random"), ("yes", "adversarial")])]
    (tmp_path / "pope.jsonl").write_text("\n".join(map(json.dumps, lines)))
    benchmark = pope(tmp_path / "pope.jsonl", tmp_path)
    scores = roundtrip(benchmark, {0: "Yes.", 1: "Yes, there is.", 2: "No"}, tmp_path)
    assert scores["accuracy"] == pytest.approx(1 / 3) and scores["per_category"]["random"]["accuracy"] == 0.5


def test_mme_reads_the_release_layout_and_writes_eval_tool_files(tmp_path):
    for task, nested in (("existence", False), ("artwork", True)):
        folder = tmp_path / task
        pictures, texts = (folder / "images", folder / "questions_answers_YN") if nested else (folder, folder)
        pictures.mkdir(parents=True), texts.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(pictures / "a.jpg")
        (texts / "a.txt").write_text("Is there a cat? Please answer yes or no.\tYes\nIs there a dog? Please answer yes or no.\tNo\n")
    benchmark = mme(tmp_path)
    assert len(benchmark.questions) == 4 and benchmark.prompt == ""  # MME's questions carry their own instruction
    answers = {q.id: "Yes" for q in benchmark.questions}
    files = benchmark.results_of(answers)
    assert set(files) == {"existence", "artwork"} and files["existence"][0].split("\t")[2:] == ["Yes", "Yes"]
    for name, lines in files.items():
        (tmp_path / "out").mkdir(exist_ok=True)
        (tmp_path / "out" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    scores = benchmark.score(benchmark.read_predictions(tmp_path / "out"))
    assert scores["subtasks"]["existence"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}
    assert scores["perception"] == 100.0
    with pytest.raises(BenchmarkError, match="holds no MME subtask folder"):
        mme(tmp_path / "out")


def test_mmbench_tsv_and_scienceqa_ask_lettered_options(tmp_path):
    image = io.BytesIO()
    Image.new("RGB", (8, 8)).save(image, format="PNG")
    encoded = base64.b64encode(image.getvalue()).decode()
    (tmp_path / "mmb.tsv").write_text("index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
                                      f"0\tWhat is it?\tA pet.\tcat\tdog\tnan\tnan\tB\tpets\t{encoded}\n")
    benchmark = mmbench(tmp_path / "mmb.tsv")
    assert benchmark.questions[0].text == "A pet.\nWhat is it?\nA. cat\nB. dog"
    assert roundtrip(benchmark, {"0": "B"}, tmp_path)["accuracy"] == 100.0
    (tmp_path / "problems.json").write_text(json.dumps({"5": {
        "question": "Which is a mammal?", "choices": ["frog", "whale"], "answer": 1, "hint": "", "image": "image.png",
        "split": "test", "subject": "natural science"}, "6": {"question": "x", "choices": ["a"], "answer": 0,
                                                             "image": None, "split": "test"}}))
    science = scienceqa(tmp_path / "problems.json", tmp_path / "images")
    assert [q.id for q in science.questions] == ["5"] and science.questions[0].image.parts[-3:] == ("test", "5", "image.png")
    assert roundtrip(science, {"5": "The answer is B."}, tmp_path)["per_category"] == {"natural science": 100.0}


def test_coco_captions_and_align_jsonl(tmp_path):
    (tmp_path / "refs.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                                    "annotations": [{"image_id": 1, "caption": "a red car"}]}))
    benchmark = coco_caption(tmp_path / "refs.json", tmp_path)
    assert benchmark.fields == ("image_id", "caption") and benchmark.questions[0].image == tmp_path / "a.jpg"
    (tmp_path / "mine.jsonl").write_text(json.dumps({"image": "a.jpg", "question": "颜色？", "answers": ["红色"]}) + "\n")
    mine = align_jsonl(tmp_path / "mine.jsonl", None)
    assert roundtrip(mine, {1: "红色。"}, tmp_path) == {"accuracy": 100.0, "exact_match": 100.0, "questions": 1}
    with pytest.raises(BenchmarkError, match="holds no"):
        (tmp_path / "empty.json").write_text("[]")
        mine.read_predictions(tmp_path / "empty.json")
