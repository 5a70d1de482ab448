"""Task metrics of generated answers against references: exact match, token F1, BLEU, ROUGE-L.

Local, dependency-free implementations of the standard definitions (`evaluate.load("bleu")` fetches its script from
the hub, which align cannot assume is reachable):

- Normalisation (SQuAD, Rajpurkar et al. 2016): lower case, drop punctuation and the articles a/an/the, collapse
  whitespace. Exact match and token F1 compare normalised answers.
- Token F1: harmonic mean of token precision and recall over the multiset overlap of normalised tokens, per
  example, averaged.
- BLEU (Papineni et al. 2002): corpus-level, up to 4-grams, clipped n-gram precisions summed over the corpus, their
  geometric mean times the brevity penalty exp(1 - r/c) when the candidates are shorter than the references
  (c < r). Tokens: whitespace after separating punctuation (lower-cased), close to sacreBLEU's 13a without its
  special cases. 0-100.
- ROUGE-L (Lin 2004): per example, the longest common subsequence of tokens; F = (1 + b^2) P R / (R + b^2 P) with
  b = 1 (the F1 the `rouge-score` package reports), averaged; 0-1.

Each function takes parallel lists of predictions and references (one reference per example).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    scores = example_scores("exact_match", predictions, references)
    return sum(scores) / max(len(scores), 1)


def _f1(pred: list[str], ref: list[str]) -> float:
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def token_f1(predictions: list[str], references: list[str]) -> float:
    scores = example_scores("token_f1", predictions, references)
    return sum(scores) / max(len(scores), 1)


def bleu_tokens(text: str) -> list[str]:
    return re.sub(r"([^\w\s])", r" \1 ", text.lower()).split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu_stats(predictions: list[str], references: list[str], max_n: int = 4) -> list[list[int]]:
    """Per example: [clipped matches of 1..max_n-grams, candidate n-gram counts of 1..max_n, candidate length,
    reference length]. Corpus BLEU is a function of their column sums, so a bootstrap resamples rows."""
    _same_length(predictions, references)
    rows = []
    for p, r in zip(predictions, references, strict=True):
        pt, rt = bleu_tokens(p), bleu_tokens(r)
        matches, totals = [], []
        for n in range(1, max_n + 1):
            pc, rc = _ngrams(pt, n), _ngrams(rt, n)
            matches.append(sum(min(c, rc[g]) for g, c in pc.items()))
            totals.append(max(len(pt) - n + 1, 0))
        rows.append([*matches, *totals, len(pt), len(rt)])
    return rows


def bleu_from_stats(sums: list[int] | list[float], max_n: int = 4) -> float:
    """Corpus BLEU (0-100) from the column sums of `bleu_stats`."""
    matches, totals = sums[:max_n], sums[max_n : 2 * max_n]
    c_len, r_len = sums[2 * max_n], sums[2 * max_n + 1]
    if c_len == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_n
    brevity = 1.0 if c_len > r_len else math.exp(1 - r_len / c_len)
    return 100 * brevity * math.exp(log_precision)


def bleu(predictions: list[str], references: list[str], max_n: int = 4) -> float:
    rows = bleu_stats(predictions, references, max_n)
    return bleu_from_stats(
        [sum(col) for col in zip(*rows, strict=True)] if rows else [0] * (2 * max_n + 2), max_n
    )


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_scores(predictions: list[str], references: list[str]) -> list[float]:
    _same_length(predictions, references)
    scores = []
    for p, r in zip(predictions, references, strict=True):
        pt, rt = bleu_tokens(p), bleu_tokens(r)
        lcs = _lcs(pt, rt)
        if lcs == 0:
            scores.append(0.0)
            continue
        prec, rec = lcs / len(pt), lcs / len(rt)
        scores.append(2 * prec * rec / (prec + rec))
    return scores


def rouge_l(predictions: list[str], references: list[str]) -> float:
    scores = rouge_l_scores(predictions, references)
    return sum(scores) / max(len(scores), 1)


def example_scores(metric: str, predictions: list[str], references: list[str]) -> list[float]:
    """Per-example values of a mean-type metric (exact_match, token_f1, rouge_l): the metric is their mean."""
    _same_length(predictions, references)
    pairs = list(zip(predictions, references, strict=True))
    if metric == "exact_match":
        return [float(normalise(p) == normalise(r)) for p, r in pairs]
    if metric == "token_f1":
        return [_f1(normalise(p).split(), normalise(r).split()) for p, r in pairs]
    if metric == "rouge_l":
        return rouge_l_scores(predictions, references)
    raise ValueError(f"{metric}: not a per-example metric (bleu is corpus-level: bleu_stats)")


METRICS = {"exact_match": exact_match, "token_f1": token_f1, "bleu": bleu, "rouge_l": rouge_l}


def prompts_and_references(convs) -> tuple[list[list[dict]], list[str]]:
    """(each conversation's turns before its last answer, that answer): what a model answers, and the reference
    its answer is scored against (every conversation ends with an assistant turn: data_schemas/records.py)."""
    return [[m.model_dump() for m in c.messages[:-1]] for c in convs], [c.messages[-1].content for c in convs]


def task_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    return {name: fn(predictions, references) for name, fn in METRICS.items()}


def _same_length(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
