"""Write the bundled example instruction data (examples/data/*.jsonl). Deterministic; rerun to regenerate.

The examples teach one house style on purpose: a direct answer first, then one sentence of reasoning
introduced by "Why:". A few SFT steps make that style measurably more likely (validation perplexity falls),
which is what the quickstart shows. Facts are written by hand; arithmetic and conversions are computed.
"""

import json
import random
from pathlib import Path

FACTS = [
    (
        "What is the capital of Japan?",
        "Tokyo.",
        "It has been the seat of the Japanese government since 1869.",
    ),
    (
        "What is the boiling point of water at sea level in Celsius?",
        "100 °C.",
        "At one standard atmosphere of pressure water boils at 100 degrees Celsius.",
    ),
    (
        "Which planet is closest to the Sun?",
        "Mercury.",
        "Its average distance from the Sun is about 58 million kilometres, less than any other planet.",
    ),
    ("Who wrote 'Pride and Prejudice'?", "Jane Austen.", "She published it in 1813."),
    (
        "What gas do plants absorb for photosynthesis?",
        "Carbon dioxide.",
        "Plants combine carbon dioxide and water into sugars using light energy.",
    ),
    (
        "How many continents are there?",
        "Seven.",
        "The usual count is Africa, Antarctica, Asia, Australia, Europe, North America and South America.",
    ),
    ("What is the chemical symbol for gold?", "Au.", "It comes from the Latin word for gold, aurum."),
    (
        "What is the largest ocean on Earth?",
        "The Pacific Ocean.",
        "It covers about a third of the planet's surface.",
    ),
    (
        "What language is mainly spoken in Brazil?",
        "Portuguese.",
        "Brazil was a Portuguese colony until 1822.",
    ),
    ("How many sides does a hexagon have?", "Six.", "The prefix hexa- means six."),
    (
        "What is the freezing point of water in Fahrenheit?",
        "32 °F.",
        "Water freezes at 0 °C, which is 32 °F.",
    ),
    (
        "Which organ pumps blood through the body?",
        "The heart.",
        "Its contractions push blood through the arteries.",
    ),
    (
        "What is the tallest mountain above sea level?",
        "Mount Everest.",
        "Its summit is about 8,849 metres above sea level.",
    ),
    ("What is the square root of 81?", "9.", "9 multiplied by 9 is 81."),
    ("Which element has atomic number 1?", "Hydrogen.", "Its nucleus has exactly one proton."),
    ("What is the capital of Canada?", "Ottawa.", "Queen Victoria chose it as the capital in 1857."),
    ("How many minutes are in a day?", "1,440.", "A day has 24 hours of 60 minutes each."),
    ("What do bees make from nectar?", "Honey.", "Bees evaporate water from nectar and add enzymes to it."),
    ("Which instrument measures air pressure?", "A barometer.", "It reads the weight of the air above it."),
    (
        "What is the main ingredient of guacamole?",
        "Avocado.",
        "Guacamole is mashed avocado seasoned with lime, salt and onion.",
    ),
    (
        "Name the longest river in Africa.",
        "The Nile.",
        "It flows about 6,650 kilometres to the Mediterranean.",
    ),
    ("What is H2O commonly called?", "Water.", "Each molecule has two hydrogen atoms and one oxygen atom."),
    (
        "How many legs does a spider have?",
        "Eight.",
        "All spiders are arachnids, which have four pairs of legs.",
    ),
    (
        "Which country gifted the Statue of Liberty to the United States?",
        "France.",
        "It was dedicated in 1886 as a gift from the French people.",
    ),
    (
        "What is the hardest natural substance?",
        "Diamond.",
        "Its carbon atoms are bonded in a rigid three-dimensional lattice.",
    ),
    (
        "What is the primary source of energy for Earth's climate?",
        "The Sun.",
        "Sunlight delivers almost all the energy that drives weather and climate.",
    ),
    ("In which year did humans first land on the Moon?", "1969.", "Apollo 11 landed on 20 July 1969."),
    (
        "What is the smallest prime number?",
        "2.",
        "It is the only even number whose only divisors are 1 and itself.",
    ),
    (
        "Which vitamin does the skin make in sunlight?",
        "Vitamin D.",
        "Ultraviolet B light converts a cholesterol precursor in the skin into vitamin D.",
    ),
    (
        "What is the currency of the United Kingdom?",
        "The pound sterling.",
        "It is issued by the Bank of England.",
    ),
]

ADVICE = [
    (
        "Give one tip for remembering new vocabulary.",
        "Review each new word a few times over spaced intervals.",
        "Spaced repetition strengthens memory more than cramming.",
    ),
    (
        "How can I make my code easier to read?",
        "Use clear names and keep functions short.",
        "Readers understand small, well-named pieces faster.",
    ),
    (
        "Suggest a way to save energy at home.",
        "Switch to LED bulbs.",
        "They use about a fifth of the power of incandescent bulbs for the same light.",
    ),
    (
        "What should I do before a job interview?",
        "Research the company and prepare examples of your work.",
        "Specific examples show your skills better than general claims.",
    ),
    (
        "How do I keep houseplants healthy?",
        "Water them only when the top of the soil is dry.",
        "Overwatering is the most common cause of houseplant death.",
    ),
    (
        "Give a tip for writing a clear email.",
        "Put the request in the first sentence.",
        "Busy readers may not read past the opening.",
    ),
    (
        "How can I sleep better?",
        "Keep a regular bedtime and avoid screens for an hour before it.",
        "A steady schedule and less evening light help the body's clock.",
    ),
    (
        "What is a good way to start learning to cook?",
        "Master a few simple recipes before trying complex ones.",
        "Repetition builds the basic skills that every recipe uses.",
    ),
    (
        "Summarise why exercise is useful.",
        "It strengthens the heart, muscles and mood.",
        "Regular activity improves circulation and releases mood-lifting chemicals.",
    ),
    (
        "How should I store fresh herbs?",
        "Keep them in a glass of water in the fridge, loosely covered.",
        "Water keeps the stems hydrated and the cold slows wilting.",
    ),
]


def arithmetic(rng):
    a, b = rng.randint(12, 99), rng.randint(12, 99)
    op = rng.choice(["+", "-", "*"])
    val = {"+": a + b, "-": a - b, "*": a * b}[op]
    word = {"+": "plus", "-": "minus", "*": "times"}[op]
    return (f"What is {a} {word} {b}?", f"{val}.", f"{a} {op.replace('*', '×')} {b} = {val}.")


# unit: (range of the value, question, answer, why)
CONVERSIONS = {
    "km": ((2, 50), "Convert {x} kilometres to miles.", lambda x: f"About {x * 0.621371:.1f} miles.",
           "One kilometre is 0.621371 miles."),
    "kg": ((2, 90), "How many pounds is {x} kg?", lambda x: f"About {x * 2.20462:.1f} pounds.",
           "One kilogram is 2.20462 pounds."),
    "c": ((-10, 40), "What is {x} °C in Fahrenheit?", lambda x: f"{x * 9 / 5 + 32:.1f} °F.",
          "Multiply by 9/5 and add 32."),
}  # fmt: skip


def conversion(rng):
    kind = rng.choice(list(CONVERSIONS))
    (lo, hi), question, answer, why = CONVERSIONS[kind]
    x = rng.randint(lo, hi)
    return question.format(x=x), answer(x), why


def row(q, a, why, style):
    answer = f"{a}\nWhy: {why}"
    if style == "chat":
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}
    return {"instruction": q, "input": "", "output": answer}


def main():
    rng = random.Random(7)
    items = FACTS + ADVICE + [arithmetic(rng) for _ in range(30)] + [conversion(rng) for _ in range(30)]
    rng.shuffle(items)
    rows = [row(q, a, why, "chat" if i % 3 == 0 else "alpaca") for i, (q, a, why) in enumerate(items)]
    out = Path(__file__).resolve().parent.parent / "examples" / "data"
    out.mkdir(parents=True, exist_ok=True)
    n_val = 24
    for name, part in (
        ("instructions_train.jsonl", rows[n_val:]),
        ("instructions_validation.jsonl", rows[:n_val]),
    ):
        with open(out / name, "w", encoding="utf-8") as f:
            for r in part:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows) - n_val} train and {n_val} validation rows to {out}")
    write_style_rankings(items, out / "preference_rankings.jsonl", random.Random(11))


HEDGES = [
    "Hmm, that is a tricky one and I would not want to mislead you. It depends on many things, so the best I can "
    "say is that you should look it up in a reliable source.",
    "Great question! There are many opinions about this and it is hard to give a single answer. Perhaps ask an "
    "expert or search online for more details.",
    "I am not completely sure. It could be one of several things, and the answer may vary. Please double-check "
    "with a trustworthy reference before relying on it.",
]


def write_style_rankings(items, path: Path, rng: random.Random) -> None:
    """Ranking lines for the quickstart's reward model and DPO: per question four responses, ranked by three
    annotators. Best: the house style (answer, then 'Why:'); then the bare answer; the long non-answer and a
    confident wrong answer (another question's answer) share the bottom, in an order annotators disagree on.
    Length alone does not predict the ranking: the non-answer is the longest response."""
    lines = []
    for i, (q, a, why) in enumerate(items):
        wrong = items[(i + 7) % len(items)][1]
        responses = [
            {"id": "style", "text": f"{a}\nWhy: {why}"},
            {"id": "bare", "text": a},
            {"id": "hedge", "text": HEDGES[i % len(HEDGES)]},
            {"id": "wrong", "text": wrong},
        ]
        rng.shuffle(responses)
        for k, ann in enumerate(("ann-01", "ann-02", "ann-03")):
            bottom = ["hedge", "wrong"] if (k + i) % 2 == 0 else ["wrong", "hedge"]
            top = (
                ["style", "bare"] if rng.random() > 0.1 else ["bare", "style"]
            )  # some annotators like it short
            lines.append(
                {
                    "prompt_id": f"q{i:03d}",
                    "prompt": q,
                    "responses": responses,
                    "ranking": top + bottom,
                    "annotator": ann,
                    "created_at": f"2026-11-2{k}T09:{i % 60:02d}:00Z",
                }
            )
    with open(path, "w", encoding="utf-8") as f:
        for x in lines:
            f.write(json.dumps(x, ensure_ascii=False) + "\n")
    print(f"wrote {len(lines)} ranking lines ({len(items)} prompts x 3 annotators) to {path}")


if __name__ == "__main__":
    main()
