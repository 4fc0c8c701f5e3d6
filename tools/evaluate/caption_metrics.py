"""Caption metrics as pycocoevalcap computes them (the package COCO-style results are reported with): BLEU-1..4,
METEOR, ROUGE-L and CIDEr (its CIDEr-D) on its PTB tokenizer; the tokenizer and METEOR run on Java. Without Java:
BLEU, ROUGE-L and CIDEr on a Python tokenization (below), marked in the result. No SPICE: it downloads models.

Chinese (and other CJK) text has no spaces between words: each CJK character is made a token of its own before
tokenizing, so n-gram metrics count character n-grams (as Chinese captioning evaluations commonly do).
"""

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

from align.errors import AlignError

_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af])")
# The tokens pycocoevalcap's PTBTokenizer drops after tokenizing.
PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...",
                   ";"}
_WORDS = re.compile(r"[^\W_]+(?:'[^\W_]+)?|\.\.\.|--|\S")


def split_cjk(text: str) -> str:
    """CJK characters spaced apart, so that each is a token."""
    return re.sub(r"\s+", " ", _CJK.sub(r" \1 ", text)).strip()


@contextlib.contextmanager
def _quiet():
    """Both output streams, at the file-descriptor level (Java subprocesses inherit them), into a temporary file."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1), os.dup2(sink.fileno(), 2)
        try:
            yield
        except Exception as exc:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            sink.seek(0)
            said = sink.read().decode(errors="replace").strip().splitlines()[-3:]
            raise AlignError(f"pycocoevalcap failed: {exc} {' | '.join(said)}".strip()) from None
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


def java_available() -> bool:
    """Whether a Java runtime answers (pycocoevalcap's tokenizer and METEOR need one)."""
    java = shutil.which("java")
    if java is None:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def python_tokenize(text: str) -> str:
    """The tokenization used without Java: lower-cased, words and single punctuation marks split by a regular
    expression, PTB's punctuation tokens dropped."""
    return " ".join(t for t in _WORDS.findall(split_cjk(text).lower()) if t not in PTB_PUNCTUATION)


def caption_scores(references: dict, predictions: dict, use_java: bool | None = None) -> dict:
    """pycocoevalcap's scores of `predictions` (id → caption) against `references` (id → captions) over the ids that
    have a prediction, as fractions under pycocoevalcap's names; `tokenizer` says which tokenization ran."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = [i for i in predictions if i in references]
    if not ids:
        return {}
    use_java = java_available() if use_java is None else use_java
    gts = {i: [split_cjk(c) for c in references[i]] for i in ids}
    res = {i: [split_cjk(predictions[i])] for i in ids}
    scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Rouge(), ["ROUGE_L"]), (Cider(), ["CIDEr"])]
    # pycocoevalcap and its Java tools print progress on stdout and stderr: kept off both (`--json` prints one
    # document), and shown only if scoring fails.
    with _quiet():
        if use_java:
            from pycocoevalcap.meteor.meteor import Meteor
            from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

            tokenizer = PTBTokenizer()
            gts = tokenizer.tokenize({i: [{"caption": c} for c in caps] for i, caps in gts.items()})
            res = tokenizer.tokenize({i: [{"caption": c} for c in caps] for i, caps in res.items()})
            scorers.insert(1, (Meteor(), ["METEOR"]))
        else:
            gts = {i: [python_tokenize(c) for c in caps] for i, caps in gts.items()}
            res = {i: [python_tokenize(c) for c in caps] for i, caps in res.items()}
        out: dict = {}
        for scorer, names in scorers:
            score, _ = scorer.compute_score(gts, res)
            for name, value in zip(names, score if isinstance(score, list) else [score]):
                out[name] = float(value)
    order = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
    return {**{k: out[k] for k in order if k in out}, "tokenizer": "ptb" if use_java else "python", "images": len(ids)}
