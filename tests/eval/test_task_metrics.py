"""Task metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from eval.task_metrics import bleu, bleu_from_stats, bleu_stats, exact_match, normalise, rouge_l, token_f1


def test_normalise_and_exact_match():
    assert normalise("The  Capital, of France!") == "capital of france"
    assert exact_match(["Paris.", "the paris", "Lyon"], ["paris", "Paris", "Paris"]) == pytest.approx(2 / 3)


def test_token_f1_hand_computed():
    # pred "red big cat", ref "big cat sat": overlap 2, P 2/3, R 2/3, F1 2/3; second pair: no overlap
    assert token_f1(["red big cat", "dog"], ["big cat sat", "cat"]) == pytest.approx((2 / 3 + 0) / 2)
    assert token_f1(["a", ""], ["the", ""]) == 1.0  # both empty after normalisation


def test_bleu_hand_computed():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # pred "the cat sat on mat" (5) vs ref "the cat sat on the mat" (6):
    # 1-grams 5/5, 2-grams 3/4 (the cat, cat sat, sat on; not "on mat"), 3-grams 2/3, 4-grams 1/2; BP exp(1 - 6/5)
    expected = 100 * math.exp(1 - 6 / 5) * (1 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert bleu(["the cat sat on mat"], ["the cat sat on the mat"]) == pytest.approx(expected)
    assert bleu(["dog"], ["the cat"]) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        bleu(["a", "b"], ["a"])


def test_rouge_l_hand_computed():
    # LCS of "the cat sat on mat" and "the cat was on the mat" = the cat on mat (4): P 4/5, R 4/6
    p, r = 4 / 5, 4 / 6
    assert rouge_l(["the cat sat on mat"], ["the cat was on the mat"]) == pytest.approx(2 * p * r / (p + r))
    assert rouge_l(["x"], ["y"]) == 0.0


def test_bleu_from_per_example_stats_is_the_corpus_bleu():
    """The bootstrap's path (per-example sufficient statistics, summed) gives sacreBLEU's corpus score."""
    preds = ["The quick brown fox, jumps over the lazy dog.", "the cat sat on mat", "a b c d e f"]
    refs = ["the quick brown fox jumped over the lazy dog!", "the cat sat on the mat", "a b c d e g"]
    rows = bleu_stats(preds, refs)
    assert rows[1] == [5, 6, 5, 3, 2, 1, 5, 4, 3, 2]  # lengths, matches of 1..4-grams, candidate n-grams
    assert bleu_from_stats([sum(c) for c in zip(*rows, strict=True)]) == pytest.approx(bleu(preds, refs))
    assert bleu(preds, refs) == pytest.approx(
        58.99255, abs=1e-4
    )  # align's former BLEU gave the same 58.99255


def test_rouge_l_tokens_are_words_in_every_script():
    # punctuation is not a token (rouge-score's definition): "cat , sat" vs "cat sat" is a perfect match
    assert rouge_l(["the cat, sat!"], ["The cat sat"]) == pytest.approx(1.0)
    # letters of other scripts are words too (rouge-score's own tokenizer would drop them and score 0)
    assert rouge_l(["добрый день мир"], ["добрый вечер мир"]) == pytest.approx(2 / 3)


def test_eval_generate_cli_writes_predictions_and_metrics(tmp_path, tiny_model_path, capsys):
    import json

    from align.cli import main

    data = tmp_path / "held.jsonl"
    good = "".join(json.dumps({"instruction": f"Say {w}.", "output": w}) + "\n" for w in ["yes", "no", "ok"])
    data.write_text('{"instruction": "broken"\n' + good)  # a bad first line: named, and the good rows kept
    out = tmp_path / "gen"
    argv = ["eval", "generate", "--model", "tiny-random-llama", "--data", str(data), "--out", str(out)]
    assert main([*argv, "--max-new-tokens", "4"]) == 0
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows] == ["yes", "no", "ok"] and rows[0]["prompt"][-1][
        "content"
    ] == "Say yes."
    assert "held.jsonl:1: not valid JSON" in " ".join(capsys.readouterr().err.split())
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["skipped_rows"]) == 1 and m["skipped_rows"][0].endswith(
        ":1: not valid JSON (Expecting ',' delimiter at column 1)"
    )
    preds, refs = [r["prediction"] for r in rows], [r["reference"] for r in rows]
    assert m["examples"] == 3 and m["token_f1"] == pytest.approx(token_f1(preds, refs))
    assert {"exact_match", "bleu", "rouge_l"} <= set(m)
