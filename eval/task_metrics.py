"""Task metrics of generated answers against references: exact match, token F1, BLEU, ROUGE-L.

- Normalisation (SQuAD, Rajpurkar et al. 2016): lower case, drop punctuation and the articles a/an/the, collapse
  whitespace. Exact match and token F1 compare normalised answers. These few lines are the official SQuAD script's
  definitions; they stay here because no installable library ships them (`evaluate.load("squad")` fetches its
  script from the hub, which align cannot assume is reachable).
- Token F1: harmonic mean of token precision and recall over the multiset overlap of normalised tokens, per
  example, averaged.
- BLEU (Papineni et al. 2002): sacreBLEU's corpus BLEU (Post 2018), lower-cased, its 13a tokenizer and default
  exponential smoothing, 0-100. The per-example sufficient statistics (n-gram matches and totals, lengths) come from
  sacreBLEU too, so a bootstrap resamples examples and recomputes the corpus score from column sums.
- ROUGE-L (Lin 2004): the `rouge-score` package's per-example longest-common-subsequence F1 (the figure published
  ROUGE tables report), averaged; 0-1. Its tokenizer keeps ASCII letters and digits only, so answers in other
  scripts would all score 0; align hands it one that keeps the letters and digits of every script and is the same
  on ASCII text.

Each function takes parallel lists of predictions and references (one reference per example).
"""

from __future__ import annotations

import re
import string
from collections import Counter

from sacrebleu.metrics import BLEU

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


_BLEU = BLEU(lowercase=True)


def bleu_stats(predictions: list[str], references: list[str]) -> list[list[int]]:
    """Per example, sacreBLEU's sufficient statistics: [candidate length, reference length, matches of 1..4-grams,
    candidate n-grams of 1..4]. Corpus BLEU is a function of their column sums, so a bootstrap resamples rows."""
    _same_length(predictions, references)
    return [list(map(int, row)) for row in _BLEU._extract_corpus_statistics(predictions, [references])]


def bleu_from_stats(sums: list[int] | list[float]) -> float:
    """Corpus BLEU (0-100) from the column sums of `bleu_stats`."""
    return float(_BLEU._compute_score_from_stats([int(round(x)) for x in sums]).score)


def bleu(predictions: list[str], references: list[str]) -> float:
    _same_length(predictions, references)
    return float(_BLEU.corpus_score(predictions, [references]).score) if predictions else 0.0


class _WordTokenizer:
    """rouge-score's tokenizer on ASCII text (lower case, runs of letters and digits), for every script."""

    def tokenize(self, text: str) -> list[str]:
        return _WORDS.findall(text.lower())


_WORDS = re.compile(r"[^\W_]+")


def rouge_l_scores(predictions: list[str], references: list[str]) -> list[float]:
    from rouge_score.rouge_scorer import RougeScorer  # rouge-score loads nltk: 1 s, only where ROUGE is asked

    _same_length(predictions, references)
    scorer = RougeScorer(["rougeL"], tokenizer=_WordTokenizer())
    return [
        float(scorer.score(r, p)["rougeL"].fmeasure) for p, r in zip(predictions, references, strict=True)
    ]


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
