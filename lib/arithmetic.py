"""A verifiable task for RL with a verifier: arithmetic word problems, generated from a seed, with exact answers.

Each problem is one operation (+, -, x; up to max_steps of them) on small whole numbers, told as a short story from a
handful of templates ("Mia has 7 marbles. Then Mia gets 5 more marbles. How many marbles does Mia have now?"); its
answer is a whole number (never negative). Rows are TRL's prompt-completion shape with the answer beside it:

    {"prompt": "...problem... End your reply with: The answer is N.",
     "completion": "7 + 5 = 12. The answer is 12.", "answer": "12"}

so SFT can learn from the completions, and PPO/GRPO reads the prompts and hands `answer` to the `exact_answer`
reward. The train and test splits never share a problem text. The same seed gives the same files, on any machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = ("Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Sara", "Tom", "Ines", "Kai")
THINGS = (
    "apples",
    "marbles",
    "stickers",
    "books",
    "coins",
    "shells",
    "cards",
    "pencils",
    "stamps",
    "cookies",
)
INSTRUCTION = "Solve the problem. End your reply with: The answer is N."


@dataclass(frozen=True)
class Problem:
    text: str
    steps: tuple[str, ...]
    answer: int


def _one(rng: random.Random, who: str, what: str, start: int, max_operand: int) -> tuple[str, str, int]:
    """(sentence, worked step, new total) of one operation applied to `start`."""
    op = rng.choice("+-x")
    if op == "+":
        k = rng.randint(1, max_operand)
        return f"Then {who} gets {k} more {what}.", f"{start} + {k} = {start + k}", start + k
    if op == "-" and start > 1:
        k = rng.randint(1, start - 1)
        return f"Then {who} gives away {k} {what}.", f"{start} - {k} = {start - k}", start - k
    k = rng.randint(2, 4)
    word = {2: "doubles", 3: "triples", 4: "quadruples"}[k]
    return f"Then {who} {word} the number of {what}.", f"{start} x {k} = {start * k}", start * k


def problem(rng: random.Random, max_operand: int = 20, max_steps: int = 1) -> Problem:
    who, what = rng.choice(NAMES), rng.choice(THINGS)
    total = rng.randint(2, max_operand)
    sentences, steps = [f"{who} has {total} {what}."], []
    for _ in range(rng.randint(1, max_steps)):
        sentence, step, total = _one(rng, who, what, total, max_operand)
        sentences.append(sentence)
        steps.append(step)
    sentences.append(f"How many {what} does {who} have now?")
    return Problem(" ".join(sentences), tuple(steps), total)


def row(p: Problem) -> dict:
    return {
        "prompt": f"{p.text}\n{INSTRUCTION}",
        "completion": " ".join(f"{s}." for s in p.steps) + f" The answer is {p.answer}.",
        "answer": str(p.answer),
    }


def splits(
    n_train: int, n_test: int, seed: int = 0, max_operand: int = 20, max_steps: int = 1
) -> dict[str, list]:
    """{"train": rows, "test": rows}: n_train + n_test distinct problems from `seed` (a ValueError when the settings
    cannot make that many)."""
    rng = random.Random(seed)
    seen: dict[str, Problem] = {}
    tries = 0
    while len(seen) < n_train + n_test:
        p = problem(rng, max_operand, max_steps)
        seen.setdefault(p.text, p)
        tries += 1
        if tries > 50 * (n_train + n_test) + 1000:
            raise ValueError(
                f"only {len(seen)} distinct problems with max_operand {max_operand} and max_steps {max_steps}; "
                "ask for fewer or allow larger numbers"
            )
    problems = list(seen.values())
    return {"train": [row(p) for p in problems[:n_train]], "test": [row(p) for p in problems[n_train:]]}
