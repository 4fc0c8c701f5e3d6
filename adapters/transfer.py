"""Carrying a projector to another LLM (VPGTrans, Zhang et al. 2023): a linear converter from the source LLM's
input-embedding space to the target's, fitted on words both read, composed with the source projector. What the
projector wrote as "words" of the source LLM becomes, through the converter, words of the target: a warm start that
its own training then finishes.
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from align.adapters.adapter_files import AdapterError
from align.templates.text_tokenizer import TextTokenizer

MAX_WORDS = 60_000  # pairs enough for any hidden size here, tokenized in seconds
_WORD = re.compile(r"\w+", re.UNICODE)
RIDGE = 1e-3  # relative to the mean squared source embedding: keeps the fit stable when pairs barely outnumber sizes


@dataclass(frozen=True)
class Converter:
    """target ≈ source @ weight + bias, and how well that held on pairs left out of the fit."""

    weight: torch.Tensor  # [source hidden, target hidden]
    bias: torch.Tensor  # [target hidden]
    pairs: int
    held_out: int
    held_out_cosine: float  # mean cosine similarity of converted and true target embeddings (weighted)
    held_out_r2: float  # 1 - residual / total variance of the target embeddings (weighted)

    def fit_report(self) -> dict:
        """What the adapter config records of the fit."""
        return {"pairs": self.pairs, "held_out": self.held_out, "held_out_cosine": round(self.held_out_cosine, 4),
                "held_out_r2": round(self.held_out_r2, 4)}


def shared_words(source: TextTokenizer, target: TextTokenizer, texts: Iterable[str] = (),
                 limit: int = MAX_WORDS) -> tuple[list[str], list[str]]:
    """Words both LLMs read: the words of `texts` (sorted, at most `limit`), and every other vocabulary entry of
    either that decodes to a word (sorted, up to `limit` words in all)."""
    corpus = {w for text in texts for w in _WORD.findall(text)}
    tokens = {w for tokenizer in (source, target) for i in range(tokenizer.vocab_size)
              for w in [tokenizer.decode([i]).strip()] if _WORD.fullmatch(w)}
    chosen = sorted(corpus)[:limit]
    return chosen, sorted(tokens - corpus)[:max(0, limit - len(chosen))]


def paired_rows(words: list[str], source: TextTokenizer, source_embeddings: torch.Tensor, target: TextTokenizer,
                target_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each word, the mean input embedding of its tokens on each side ([N, Hs], [N, Ht]): a word that is one
    token in both vocabularies pairs two embedding rows exactly; a longer one pairs the averages. Words are taken as
    they stand inside a sentence, after a space (`▁red`, `Ġred`), the form an LLM reads most; a token of the space
    alone (SentencePiece's `▁` before a leading space) is left out."""
    left, right = [], []
    for word in words:
        ids = [[i for i in tokenizer.encode(" " + word) if i < table.shape[0] and tokenizer.decode([i]).strip()]
               for tokenizer, table in ((source, source_embeddings), (target, target_embeddings))]
        if ids[0] and ids[1]:
            left.append(source_embeddings[ids[0]].float().mean(0))
            right.append(target_embeddings[ids[1]].float().mean(0))
    if not left:
        raise AdapterError("the two LLMs' tokenizers share no words: nothing to fit a converter on")
    return torch.stack(left), torch.stack(right)


def fit_converter(source: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
                  held_out: float = 0.1, seed: int = 0) -> Converter:
    """Weighted least squares (lightly ridge-regularised) from paired source rows [N, Hs] to target rows [N, Ht],
    reporting its fit on a held-out share of the pairs before refitting on all of them."""
    if source.shape[0] != target.shape[0]:
        raise ValueError(f"{source.shape[0]} source rows against {target.shape[0]} target rows")
    n = source.shape[0]
    weights = torch.ones(n) if weights is None else weights
    kept = max(1, int(round(n * held_out)))
    if n - kept < 2:
        raise AdapterError(f"only {n} words are shared by both LLMs' tokenizers: too few to fit a converter "
                           "(give a --corpus of text both read)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test, train = order[:kept], order[kept:]
    weight, bias = _least_squares(source[train], target[train], weights[train])
    # Scored with the pairs' weights, as fitted: the corpus's words count as much as the rest of the vocabulary.
    predicted, truth, w = source[test].double() @ weight + bias, target[test].double(), weights[test].double()
    cosine = float((nn.functional.cosine_similarity(predicted, truth, dim=1) * w).sum() / w.sum())
    spread = ((truth - (w[:, None] * truth).sum(0) / w.sum()).square().sum(1) * w).sum().clamp_min(1e-12)
    r2 = float(1 - ((predicted - truth).square().sum(1) * w).sum() / spread)
    weight, bias = _least_squares(source, target, weights)
    return Converter(weight.float(), bias.float(), n, kept, cosine, r2)


def _least_squares(source: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, w = source.double(), target.double(), (weights.double() / weights.double().mean())[:, None]
    x_mean, y_mean = (w * x).sum(0) / w.sum(), (w * y).sum(0) / w.sum()
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ (w * xc)
    gram += torch.eye(gram.shape[0], dtype=gram.dtype) * RIDGE * float(x.square().mean()) * x.shape[0]
    weight = torch.linalg.solve(gram, xc.T @ (w * yc))
    return weight, y_mean - x_mean @ weight


def compose(kind: str, state: dict[str, torch.Tensor], converter: Converter) -> dict[str, torch.Tensor]:
    """The source projector's weights with the converter applied to its output: for `linear` one matrix product;
    for `mlp2x_gelu` its last layer (whose input width is the source's hidden size, so the two LLMs must share it)."""
    weight, bias = converter.weight.double(), converter.bias.double()
    if kind == "linear":
        last = ""
    elif kind == "mlp2x_gelu":
        source_hidden, target_hidden = weight.shape
        if source_hidden != target_hidden:
            raise AdapterError(f"an mlp2x_gelu projector keeps its hidden width ({source_hidden}) when carried over; "
                               f"the target's hidden size is {target_hidden}: transfer between LLMs of one hidden "
                               "size, or train a linear projector")
        last = "2."
    else:
        raise AdapterError(f"a {kind} projector cannot be carried to another LLM: only linear and mlp2x_gelu can")
    composed = dict(state)
    w, b = state[f"{last}weight"].double(), state[f"{last}bias"].double()
    composed[f"{last}weight"] = (weight.T @ w).float()  # y_t = (x Wᵀ + b) A + c
    composed[f"{last}bias"] = (b @ weight + bias).float()
    return composed
