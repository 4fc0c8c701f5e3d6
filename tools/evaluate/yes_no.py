"""Yes/no benchmarks scored as the numbers users compare with were computed: POPE as LLaVA's
`llava/eval/eval_pope.py` turns an answer into yes/no, MME as its official `eval_tool/calculation.py` does."""

from collections import defaultdict

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def pope_answer(text: str) -> str:
    """LLaVA's reading: the first sentence, commas removed, split on spaces; 'No', 'not' or 'no' among the words is
    no, anything else yes."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_scores(labels: list[str], answers: list[str]) -> dict:
    """accuracy, precision, recall, f1 and yes_ratio of answers against yes/no labels (LLaVA's arithmetic)."""
    preds = [pope_answer(a) == "yes" for a in answers]
    gold = [label != "no" for label in labels]
    tp = sum(p and g for p, g in zip(preds, gold))
    fp = sum(p and not g for p, g in zip(preds, gold))
    tn = sum(not p and not g for p, g in zip(preds, gold))
    fn = sum(not p and g for p, g in zip(preds, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(preds) if preds else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(preds) / len(preds) if preds else 0.0, "questions": len(preds)}


def mme_answer(text: str) -> str:
    """calculation.py's parse_pred_ans on the lower-cased answer: yes, no, or other (wrong either way)."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_scores(records: list[tuple[str, str, str, str]]) -> dict:
    """(subtask, image, gold yes/no, answer) for every question → per subtask `acc` and `acc_plus` (both questions
    of an image right) in percent and their sum `score`; `perception` and `cognition` totals of the subtasks
    present."""
    by_task: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for task, image, gold, answer in records:
        by_task[task][image].append(mme_answer(answer) == gold.lower())
    tasks = {}
    for task, images in by_task.items():
        right = [r for answers in images.values() for r in answers]
        acc = 100 * sum(right) / len(right)
        acc_plus = 100 * sum(all(answers) and len(answers) == 2 for answers in images.values()) / len(images)
        tasks[task] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    return {"perception": sum(t["score"] for name, t in tasks.items() if name in MME_PERCEPTION),
            "cognition": sum(t["score"] for name, t in tasks.items() if name in MME_COGNITION),
            "subtasks": tasks, "questions": len(records)}
