"""Multiple-choice answers (MMBench, ScienceQA): the option letter read from the answer. An answer with no letter to
read is wrong: never a random pick, which would add chance accuracy to a model that did not answer."""


def parse_letter(answer: str, options: dict[str, str]) -> str | None:
    """The chosen option's letter, read as MMBench's evaluation (VLMEvalKit's `can_infer`) reads it: with
    `.()[],:;!*#{}` made spaces, exactly one option letter among the words; else exactly one option's text in the
    answer; else None ("A or B" and "nothing" are unreadable)."""
    words = answer
    for mark in ".()[],:;!*#{}":
        words = words.replace(mark, " ")
    said = [letter for letter in options if letter in words.split()]
    if len(said) == 1:
        return said[0]
    if said:
        return None
    named = [letter for letter, text in options.items() if text and text.strip().lower() in answer.lower()]
    return named[0] if len(named) == 1 else None


def choice_scores(records: list[tuple[str, str, dict[str, str], str]]) -> dict:
    """(category, gold letter, options, answer) per question → accuracy (percent) overall and per category, and how
    many answers had no readable letter."""
    per: dict[str, list[bool]] = {}
    unread = 0
    for category, gold, options, answer in records:
        letter = parse_letter(answer, options)
        unread += letter is None
        per.setdefault(category, []).append(letter == gold)
    right = [r for values in per.values() for r in values]
    return {"accuracy": 100 * sum(right) / len(right) if right else 0.0,
            "per_category": {k: 100 * sum(v) / len(v) for k, v in sorted(per.items())},
            "unreadable": unread, "questions": len(right)}
