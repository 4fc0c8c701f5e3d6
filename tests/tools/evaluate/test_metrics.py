"""The metric code against the official tools: pycocoevalcap run here, the VQA authors' vqaEval.py (values obtained by
running it), LLaVA's POPE reading, MME's eval_tool arithmetic and MMBench's letter reading."""

import json
import shutil

import pytest

from align.tools.evaluate.caption_metrics import caption_scores, java_available, python_tokenize
from align.tools.evaluate.choices import choice_scores, parse_letter
from align.tools.evaluate.vqa_accuracy import VQAQuestion, process_digit_article, process_punctuation, vqa_accuracy, \
    vqa_scores
from align.tools.evaluate.yes_no import mme_answer, mme_scores, pope_answer, pope_scores

# (ten answers, prediction, accuracy in percent as GT-Vision-Lab/VQA vqaEval.py (latest) computes it, run under
# Python 3 on these very inputs), one case per rule.
OFFICIAL_VQA = [
    (["yes"] * 10, "Yes", 0.0),                      # ten identical answers: nothing is normalised, case included
    (["red"] * 10, " red ", 100.0),                  # but answers are trimmed
    (["yes"] * 9 + ["no"], "." * 40 + "yes", 0.0),   # re.UNICODE lands in sub()'s count: only 32 periods go
    (["yes"] * 9 + ["no"], "yes...", 100.0),         # a period not before a digit is removed
    (["0.5"] * 9 + ["1"], "0.5", 100.0),             # one before a digit stays
    (["left right"] * 9 + ["x"], "left - right", 100.0),  # punctuation beside a space is removed
    (["x y"] * 9 + ["z"], "x/y", 100.0),             # elsewhere it becomes a space
    (["1000"] * 9 + ["1"], "1,000!", 100.0),         # a comma inside a number removes all punctuation
    (["2"] * 9 + ["3"], "Two.", 100.0),              # number words become digits, after lower-casing
    (["dog"] * 9 + ["cat"], "The dog", 100.0),       # articles go
    (["don't"] * 9 + ["no"], "dont", 100.0),         # contractions get their apostrophe
    (["cat"] * 2 + ["dog"] * 8, "cat", 60.0),        # min(1, matches/3) over the ten leave-one-out subsets
    (["left"] + ["right"] * 9, "left", 30.0),
    (["ok"] * 9 + ["fine"], "ok\n", 100.0),          # newlines and tabs are spaces
]


@pytest.mark.parametrize("answers,prediction,expected", OFFICIAL_VQA)
def test_vqa_accuracy_is_the_official_one(answers, prediction, expected):
    assert round(100 * vqa_accuracy(answers, prediction), 2) == expected


def test_vqa_normalisation_steps_by_hand():
    assert process_punctuation("a, b") == "a b" and process_punctuation("a,b") == "a b"
    assert process_punctuation("1,000.") == "1000"
    assert process_digit_article("The two dogs arent here") == "2 dogs aren't here"


def test_vqa_scores_report_as_vqaeval_does():
    questions = [VQAQuestion(1, ("yes",) * 10, "yes/no", "is the"), VQAQuestion(2, ("cat",) * 2 + ("dog",) * 8,
                 "other", "what is"), VQAQuestion(3, ("2",) * 10, "number", "how many")]
    scores = vqa_scores(questions, {1: "yes", 2: "cat", 3: "3"})
    assert scores["overall"] == round(100 * (1 + 0.6 + 0) / 3, 2) == 53.33
    assert scores["perAnswerType"] == {"yes/no": 100.0, "other": 60.0, "number": 0.0}
    assert scores["perQuestionType"]["what is"] == 60.0 and scores["exact_match"] == 33.33


REFERENCES = {
    1: ["A cat sits on a red sofa.", "a cat on a couch", "A grey cat lying on the sofa."],
    2: ["Two dogs run in the park.", "Dogs running on grass."],
    3: ["A man rides a bicycle down the street.", "a person cycling on a road"],
}
PREDICTIONS = {1: "a cat sitting on a sofa", 2: "two dogs running in a park", 3: "a man riding a bike on a street"}


@pytest.mark.slow
def test_caption_scores_equal_pycocoevalcap_run_as_coco_does(tmp_path, monkeypatch):
    if not java_available():
        pytest.skip("no Java runtime: pycocoevalcap's tokenizer and METEOR need one")
    from pycocotools.coco import COCO
    from pycocoevalcap import eval as coco_eval

    class NoSpice:  # COCOEvalCap's SPICE downloads Stanford CoreNLP at first use: never run here
        def compute_score(self, gts, res):
            return 0.0, []

        def method(self):
            return "SPICE"

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)

    annotations = {"images": [{"id": i} for i in REFERENCES], "type": "captions", "info": {}, "licenses": [],
                   "annotations": [{"id": 10 * i + k, "image_id": i, "caption": c}
                                   for i, caps in REFERENCES.items() for k, c in enumerate(caps)]}
    (tmp_path / "refs.json").write_text(json.dumps(annotations))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": i, "caption": c} for i, c in PREDICTIONS.items()]))
    coco = COCO(str(tmp_path / "refs.json"))
    evaluation = coco_eval.COCOEvalCap(coco, coco.loadRes(str(tmp_path / "res.json")))
    evaluation.params["image_id"] = coco.getImgIds()
    evaluation.evaluate()
    ours = caption_scores(REFERENCES, PREDICTIONS)
    assert ours["tokenizer"] == "ptb" and ours["images"] == 3
    for name in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert ours[name] == pytest.approx(evaluation.eval[name], abs=1e-9), name


def test_without_java_the_python_tokenization_is_marked_and_close_to_ptb():
    scores = caption_scores(REFERENCES, PREDICTIONS, use_java=False)
    assert scores["tokenizer"] == "python" and "METEOR" not in scores
    assert python_tokenize("A cat's toy, (red)!") == "a cat's toy ( red )"
    for name in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):  # these captions tokenize alike either way
        assert scores[name] == pytest.approx(caption_scores(REFERENCES, PREDICTIONS, use_java=java_available())[name])
    assert python_tokenize("一只猫。") == "一 只 猫 。"  # CJK characters are tokens of their own


def test_pope_reads_answers_as_llava_does():
    assert [pope_answer(a) for a in ["Yes, there is.", "No.", "There is not a dog.", "I see no cat", "Not sure",
                                     "yes. No."]] == ["yes", "no", "no", "no", "yes", "yes"]
    scores = pope_scores(["yes", "yes", "no", "no"], ["Yes", "No, it is not.", "yes", "no"])
    assert (scores["accuracy"], scores["precision"], scores["recall"], scores["f1"], scores["yes_ratio"]) == (
        0.5, 0.5, 0.5, 0.5, 0.5)


def test_mme_arithmetic_is_its_eval_tools():
    assert [mme_answer(a) for a in ["Yes", "no", "Yes, it is.", "Nope", "Maybe yes"]] == ["yes", "no", "yes", "no",
                                                                                        "other"]
    records = [("existence", "a.jpg", "Yes", "yes"), ("existence", "a.jpg", "No", "no"),     # both right
               ("existence", "b.jpg", "Yes", "yes"), ("existence", "b.jpg", "No", "yes"),    # one right
               ("code_reasoning", "c.png", "Yes", "Maybe"), ("code_reasoning", "c.png", "No", "No")]
    scores = mme_scores(records)
    assert scores["subtasks"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert scores["perception"] == 125.0 and scores["cognition"] == 50.0 + 0.0


def test_an_option_letter_is_read_and_no_letter_is_wrong():
    options = {"A": "cat", "B": "dog", "C": "red car", "D": "a tree"}
    read = {a: parse_letter(a, options) for a in ["B", "B.", "(C)", "D) a tree", "The answer is A.", "dog",
                                                   "A or B", "nothing", "I think it is a dog"]}
    assert read == {"B": "B", "B.": "B", "(C)": "C", "D) a tree": "D", "The answer is A.": "A", "dog": "B",
                    "A or B": None, "nothing": None, "I think it is a dog": "B"}
    scores = choice_scores([("x", "B", options, "B"), ("x", "A", options, "nothing"), ("y", "C", options, "C.")])
    assert scores["accuracy"] == pytest.approx(200 / 3) and scores["unreadable"] == 1
    assert scores["per_category"] == {"x": 50.0, "y": 100.0}


def test_java_is_said_to_be_missing(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert java_available() is False
