"""Open-ended VQA accuracy exactly as the VQA authors' evaluation computes it (GT-Vision-Lab/VQA,
`PythonEvaluationTools/vqaEvaluation/vqaEval.py`, latest commit): the same punctuation, period, digit, article and
contraction rules, applied only when a question's ten answers are not all identical, and min(1, matches / 3)
averaged over the ten leave-one-out subsets. LAVIS / MiniGPT-4 and EvalAI copies normalise differently; this is the
official one. Also GQA-style exact match.
"""

import re
from collections import defaultdict
from dataclasses import dataclass

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# As written in the official code, quirks included: the look-behind is really a look-ahead for "<=digit", and
# re.UNICODE lands in sub()'s `count` argument, so at most 32 periods are removed.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(\d)(\,)(\d)")


def process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation."""
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_IN_NUMBER.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, re.UNICODE)


def process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle."""
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(answers: list[str], prediction: str) -> float:
    """One question's accuracy (0-1): the mean over leave-one-out subsets of the ten answers of min(1, matches / 3)."""
    gts = [_clean(a) for a in answers]
    prediction = _clean(prediction)
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        prediction = process_digit_article(process_punctuation(prediction))
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        scores.append(min(1.0, sum(a == prediction for a in others) / 3))
    return sum(scores) / len(scores)


@dataclass(frozen=True)
class VQAQuestion:
    """One annotated question: its ten answers, answer type, question type and most common answer."""

    question_id: object
    answers: tuple[str, ...]
    answer_type: str = ""
    question_type: str = ""
    multiple_choice_answer: str = ""


def vqa_scores(questions: list[VQAQuestion], predictions: dict) -> dict:
    """`overall`, `perAnswerType`, `perQuestionType` in percent with 2 decimals, as vqaEval reports them, over the
    questions that have a prediction; `exact_match` (GQA style) beside them."""
    per_answer, per_question, accs, exact = defaultdict(list), defaultdict(list), [], []
    for q in questions:
        if q.question_id not in predictions:
            continue
        acc = vqa_accuracy(list(q.answers), predictions[q.question_id])
        accs.append(acc)
        per_answer[q.answer_type].append(acc)
        per_question[q.question_type].append(acc)
        gold = q.multiple_choice_answer or max(set(q.answers), key=q.answers.count)
        exact.append(exact_match(predictions[q.question_id], gold))
    if not accs:
        return {"overall": 0.0, "perAnswerType": {}, "perQuestionType": {}, "exact_match": 0.0, "questions": 0}

    def percent(values):
        return round(100 * sum(values) / len(values), 2)

    return {"overall": percent(accs), "perAnswerType": {k: percent(v) for k, v in per_answer.items()},
            "perQuestionType": {k: percent(v) for k, v in per_question.items()}, "exact_match": percent(exact),
            "questions": len(accs)}


def exact_match(prediction: str, gold: str) -> float:
    """GQA-style: 1 when the answer, trimmed, without a final period and lower-cased, is the gold answer."""
    return float(prediction.strip().rstrip(".").strip().lower() == gold.strip().lower())
