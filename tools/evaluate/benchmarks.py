"""Benchmarks in their published formats: the questions to ask (image, text), the prompt the benchmark's published
numbers were made with, how answers are written (the benchmark's results format) and how they are scored. Nothing is
downloaded: users bring their local copies."""

import base64
import csv
import io
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from align.errors import AlignError
from align.tools.evaluate.caption_metrics import caption_scores
from align.tools.evaluate.choices import choice_scores
from align.tools.evaluate.vqa_accuracy import VQAQuestion, exact_match, process_digit_article, process_punctuation, \
    vqa_scores
from align.tools.evaluate.yes_no import MME_COGNITION, MME_PERCEPTION, mme_scores, pope_scores

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
CAPTION = "Provide a one-sentence caption for the provided image."
DEFAULT_IMAGE_PATTERN = "COCO_val2014_{image_id:012d}.jpg"  # VQAv2 / OK-VQA on COCO val2014


class BenchmarkError(AlignError):
    """A benchmark file that is missing or not in its published format."""


@dataclass(frozen=True)
class Question:
    """One thing to ask: an id as the benchmark writes it, the image (a path, or the bytes a TSV carries), the text."""

    id: object
    image: Path | bytes
    text: str


@dataclass
class Benchmark:
    """Questions, the prompt put after each, and what turns answers (id → text) into a results file and scores."""

    kind: str
    questions: list[Question]
    prompt: str
    max_new_tokens: int
    results_name: str
    fields: tuple[str, str]  # the results format's id and answer keys
    score: Callable[[dict], dict]
    results: Callable[[dict], object] | None = None  # a format other than [{id: …, answer: …}]
    read_results: Callable[[Path], dict] | None = None

    def results_of(self, answers: dict) -> object:
        """The answers in the benchmark's results format."""
        if self.results is not None:
            return self.results(answers)
        return [{self.fields[0]: k, self.fields[1]: v} for k, v in answers.items()]

    def read_predictions(self, path: Path) -> dict:
        """id → answer from a predictions file in the benchmark's results format (JSON list or JSON lines), made
        by align or any other model."""
        if self.read_results is not None:
            return self.read_results(Path(path))
        text = Path(path).read_text(encoding="utf-8") if Path(path).is_file() else None
        if text is None:
            raise BenchmarkError(f"predictions {path} do not exist")
        try:
            data = json.loads(text)
        except ValueError:
            data = _jsonl(Path(path))
        if not isinstance(data, list):
            raise BenchmarkError(f"{path} is not a list of predictions")
        key, answer = self.fields
        found = {r[key]: str(r[answer]) for r in data if isinstance(r, dict) and key in r and answer in r}
        if not found:
            raise BenchmarkError(f"{path} holds no {{\"{key}\", \"{answer}\"}} predictions")
        return found


def _json(path: Path) -> object:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BenchmarkError(f"cannot read {path}: {str(exc).splitlines()[0][:200]}") from None


def _jsonl(path: Path) -> list[dict]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchmarkError(f"cannot read {path}: {exc}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                raise BenchmarkError(f"{path}:{number} is not JSON") from None
            if not isinstance(record, dict):
                raise BenchmarkError(f"{path}:{number} is not a JSON object")
            records.append(record)
    return records


def _list_of_objects(data: object, key: str, where: Path) -> list[dict]:
    items = data.get(key) if isinstance(data, dict) else None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise BenchmarkError(f"{where} needs \"{key}\": a list of objects")
    return items


def coco_caption(references: Path, images: Path) -> Benchmark:
    """COCO-style captions (Karpathy test, NoCaps val, Flickr30k): `{"images": [{"id", "file_name"}], "annotations":
    [{"image_id", "caption"}]}` and the image folder; results `[{"image_id", "caption"}]`."""
    data = _json(references)
    refs: dict = {}
    for a in _list_of_objects(data, "annotations", references):
        if "image_id" in a and isinstance(a.get("caption"), str):
            refs.setdefault(a["image_id"], []).append(a["caption"])
    questions = [Question(i["id"], Path(images) / str(i["file_name"]), "")
                 for i in _list_of_objects(data, "images", references) if "id" in i and "file_name" in i]
    return Benchmark("coco-caption", questions, CAPTION, 64, "captions_results.json", ("image_id", "caption"),
                     lambda answers: caption_scores(refs, answers))


def vqa(questions: Path, annotations: Path | None, images: Path, image_pattern: str) -> Benchmark:
    """VQAv2-style (VQAv2, OK-VQA, VizWiz, TextVQA): `{"questions": [{"question_id", "image_id", "question"}]}`,
    annotations with ten answers each; images found by `image_pattern` (e.g. COCO_val2014_{image_id:012d}.jpg) or a
    question's own "image"; results `[{"question_id", "answer"}]`."""
    asked = []
    for q in _list_of_objects(_json(questions), "questions", questions):
        if "question_id" not in q or not isinstance(q.get("question"), str):
            continue
        name = q.get("image") or image_pattern.format(image_id=q.get("image_id"))
        asked.append(Question(q["question_id"], Path(images) / str(name), q["question"]))
    gold = []
    if annotations is not None:
        for a in _list_of_objects(_json(annotations), "annotations", annotations):
            answers = tuple(x["answer"] for x in a.get("answers", []) if isinstance(x, dict) and isinstance(x.get("answer"), str))
            if "question_id" in a and answers:
                gold.append(VQAQuestion(a["question_id"], answers, str(a.get("answer_type", "")),
                                        str(a.get("question_type", "")), str(a.get("multiple_choice_answer", ""))))

    def score(answers: dict) -> dict:
        if annotations is None:
            return {}
        return vqa_scores(gold, answers)

    return Benchmark("vqa", asked, SHORT_ANSWER, 16, "vqa_results.json", ("question_id", "answer"), score)


def pope(questions: Path, images: Path) -> Benchmark:
    """POPE: JSON lines with `question_id`, `image`, `text`, `label` (and `category`); results as LLaVA writes them,
    `{"question_id", "text"}` lines; scores overall and per category."""
    records = [r for r in _jsonl(questions) if {"question_id", "image", "text"} <= r.keys()]
    labels = {r["question_id"]: str(r.get("label", "")) for r in records}
    category = {r["question_id"]: str(r.get("category", "")) for r in records}
    asked = [Question(r["question_id"], Path(images) / str(r["image"]), str(r["text"])) for r in records]

    def score(answers: dict) -> dict:
        ids = [i for i in answers if labels.get(i)]
        out = pope_scores([labels[i] for i in ids], [answers[i] for i in ids])
        groups = sorted({category[i] for i in ids} - {""})
        if groups:
            out["per_category"] = {g: pope_scores([labels[i] for i in ids if category[i] == g],
                                                  [answers[i] for i in ids if category[i] == g]) for g in groups}
        return out

    return Benchmark("pope", asked, SHORT_ANSWER, 16, "pope_answers.json", ("question_id", "text"), score)


def mme(root: Path) -> Benchmark:
    """MME as released (`MME_Benchmark_release_version/<subtask>/`: images with a .txt of two `question\\tYes|No`
    lines each, or `images/` and `questions_answers_YN/`); results as its eval_tool reads them, one
    `<subtask>.txt` of `image\\tquestion\\tanswer\\tprediction` lines per subtask."""
    asked, gold = [], {}
    for task in (*MME_PERCEPTION, *MME_COGNITION):
        folder = Path(root) / task
        if not folder.is_dir():
            continue
        texts = folder / "questions_answers_YN" if (folder / "questions_answers_YN").is_dir() else folder
        pictures = folder / "images" if (folder / "images").is_dir() else folder
        for txt in sorted(texts.glob("*.txt")):
            image = next((p for p in (pictures / (txt.stem + ext) for ext in (".jpg", ".png", ".jpeg")) if p.is_file()), None)
            if image is None:
                continue
            for n, line in enumerate(txt.read_text(encoding="utf-8", errors="replace").splitlines()):
                parts = line.split("\t")
                if len(parts) >= 2 and parts[1].strip().lower() in ("yes", "no"):
                    qid = f"{task}/{image.name}/{n}"
                    asked.append(Question(qid, image, parts[0].strip()))
                    gold[qid] = (task, image.name, parts[0].strip(), parts[1].strip())
    if not asked:
        raise BenchmarkError(f"{root} holds no MME subtask folder ({', '.join(MME_PERCEPTION + MME_COGNITION)})")

    def results(answers: dict) -> dict:
        files: dict[str, list[str]] = {}
        for qid, answer in answers.items():
            task, image, question, truth = gold[qid]
            files.setdefault(task, []).append("\t".join((image, question, truth, " ".join(answer.split()))))
        return files

    def score(answers: dict) -> dict:
        return mme_scores([(gold[q][0], gold[q][1], gold[q][3], a) for q, a in answers.items() if q in gold])

    def read(path: Path) -> dict:
        by_line = {(g[0], g[1], g[2]): q for q, g in gold.items()}
        found = {}
        for txt in Path(path).glob("*.txt"):
            for line in txt.read_text(encoding="utf-8", errors="replace").splitlines():
                parts = line.split("\t")
                if len(parts) == 4 and (txt.stem, parts[0], parts[1].strip()) in by_line:
                    found[by_line[(txt.stem, parts[0], parts[1].strip())]] = parts[3]
        if not found:
            raise BenchmarkError(f"{path} holds no eval_tool result files (<subtask>.txt of four columns)")
        return found

    return Benchmark("mme", asked, "", 16, "mme_results", ("", ""), score, results, read)


def mmbench(tsv: Path) -> Benchmark:
    """MMBench (dev) TSV: index, question, hint, A-D, answer, category, base64 image; the question asked as LLaVA
    asks it (hint, question, lettered options); results `[{"index", "prediction"}]`."""
    try:
        csv.field_size_limit(sys.maxsize)
        rows = list(csv.DictReader(Path(tsv).open(encoding="utf-8"), delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BenchmarkError(f"cannot read {tsv}: {exc}") from None
    asked, truth = [], {}
    for row in rows:
        options = {k: row[k].strip() for k in "ABCDE" if row.get(k) and row[k].strip() and row[k] != "nan"}
        if "index" not in row or "question" not in row or not options or not row.get("image"):
            continue
        hint = row.get("hint", "")
        text = "\n".join(([hint] if hint and hint != "nan" else []) + [row["question"]]
                         + [f"{k}. {v}" for k, v in options.items()])
        try:
            image = base64.b64decode(row["image"], validate=False)
        except ValueError:
            continue
        asked.append(Question(row["index"], image, text))
        truth[row["index"]] = (row.get("category", ""), row.get("answer", ""), options)

    def score(answers: dict) -> dict:
        known = [q for q in answers if truth.get(q, ("", "", {}))[1]]
        return choice_scores([(truth[q][0], truth[q][1], truth[q][2], answers[q]) for q in known])

    return Benchmark("mmbench", asked, LETTER, 8, "mmbench_results.json", ("index", "prediction"), score)


def scienceqa(problems: Path, images: Path, split: str = "test") -> Benchmark:
    """ScienceQA-IMG: the official `problems.json` (pid → question, choices, answer index, hint, image, split,
    subject) and `images/<split>/<pid>/image.png`; the questions of `split` with an image, asked as LLaVA asks them
    (context, question, lettered choices); results `[{"question_id", "prediction"}]`; accuracy per subject."""
    data = _json(problems)
    if not isinstance(data, dict):
        raise BenchmarkError(f"{problems} is not ScienceQA's problems.json (an object of problems by id)")
    asked, truth = [], {}
    for pid, problem in data.items():
        choices = problem.get("choices") if isinstance(problem, dict) else None
        if (not isinstance(choices, list) or problem.get("split") != split or not problem.get("image")
                or not isinstance(problem.get("answer"), int) or not 0 <= problem["answer"] < len(choices) <= 26):
            continue
        options = {chr(65 + i): str(c) for i, c in enumerate(choices)}
        hint = str(problem.get("hint") or "").strip()
        text = "\n".join(([f"Context: {hint}"] if hint else []) + [str(problem.get("question", ""))]
                         + [f"{k}. {v}" for k, v in options.items()])
        asked.append(Question(pid, Path(images) / split / pid / str(problem["image"]), text))
        truth[pid] = (str(problem.get("subject", "")), chr(65 + problem["answer"]), options)

    def score(answers: dict) -> dict:
        return choice_scores([(*truth[q][:1], truth[q][1], truth[q][2], a) for q, a in answers.items() if q in truth])

    return Benchmark("scienceqa", asked, LETTER, 8, "scienceqa_results.json", ("question_id", "prediction"), score)


# Full-width punctuation VQA's (ASCII) rules leave alone: removed before comparing answers in align's own JSONL.
CJK_PUNCTUATION = str.maketrans({c: " " for c in "。，、！？；：“”‘’（）《》【】…"})


def align_jsonl(data: Path, images: Path | None) -> Benchmark:
    """align's own JSON lines, Chinese included: `{"image", "question", "answers": [...]}` (scored by whether the
    answer, normalised as VQA normalises and without full-width punctuation, is one of the answers; and exact
    match) or `{"image", "captions": [...]}`
    (caption metrics); results `[{"id", "answer"}]`, ids being line numbers."""
    records = _jsonl(data)
    root = Path(images) if images else Path(data).parent
    captions = bool(records) and "captions" in records[0]
    asked, truth = [], {}
    for n, r in enumerate(records, 1):
        refs = r.get("captions") if captions else r.get("answers")
        if not isinstance(r.get("image"), str) or not isinstance(refs, list) or not refs:
            continue
        question = "" if captions else r.get("question")
        if not isinstance(question, str):
            continue
        asked.append(Question(n, root / r["image"], question))
        truth[n] = [str(x) for x in refs]

    def score(answers: dict) -> dict:
        if captions:
            return caption_scores(truth, answers)
        ids = [i for i in answers if i in truth]

        def norm(text):
            return process_digit_article(process_punctuation(text.translate(CJK_PUNCTUATION).strip()))

        hits = [norm(answers[i]) in {norm(a) for a in truth[i]} for i in ids]
        exact = [max(exact_match(answers[i].translate(CJK_PUNCTUATION), a) for a in truth[i]) for i in ids]
        return {"accuracy": round(100 * sum(hits) / len(ids), 2) if ids else 0.0,
                "exact_match": round(100 * sum(exact) / len(ids), 2) if ids else 0.0, "questions": len(ids)}

    return Benchmark("jsonl", asked, CAPTION if captions else SHORT_ANSWER, 64 if captions else 16, "results.json",
                     ("id", "answer"), score)


def read_image_input(question: Question):
    """What the pipeline reads: the path, or the image decoded from the bytes a TSV carried."""
    if isinstance(question.image, bytes):
        from PIL import Image

        return Image.open(io.BytesIO(question.image))
    return question.image
