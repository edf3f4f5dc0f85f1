"""Write the planets document collection: fictional planets, short passages with ids, and questions
whose answers sit in exactly one known passage (week 6, retrieval and RAG).

    python datasets/documents/make_documents.py

Entirely synthetic: names are drawn from syllables, facts from small word lists, all with fixed seeds,
so running it again gives byte-identical files (passages.jsonl, dev.jsonl, test.jsonl, train.jsonl).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 6
N_PLANETS = 40
SYLLABLES = ["ka", "vel", "or", "tan", "mi", "ris", "do", "phe", "lu", "zar", "qui", "nos", "bre", "tho", "al",
             "yen", "sor", "ga", "ith", "mon", "ew", "ra", "cel", "dun", "fi", "sha", "ob", "tur", "ven", "ix"]
EXPORTS = ["blue salt", "glass fibre", "ice wine", "copper wire", "spice moss", "rare crystals", "woven silk",
           "heavy water", "amber resin", "iron ore", "sky pearls", "dried kelp"]
SPORTS = ["sky rowing", "glide polo", "stone chess", "dune racing", "wave hurling", "tower climbing",
          "sand fencing", "ring ball"]
RIVERS_SUFFIX = ["", "a", "el", "on"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh"]

# attribute -> (passage number, literal question, paraphrased question); answers live in that passage only
QUESTIONS = {
    "moons": (0, "How many moons does {P} have?", "How many natural satellites circle {P}?"),
    "year_days": (0, "How many local days does one orbit of {P} take?", "How long is a year on {P}, in days?"),
    "capital": (1, "What is the capital of {P}?", "Which city is the seat of government on {P}?"),
    "peak": (1, "How many metres high is Mount {M} on {P}?", "What is the height of the tallest mountain on {P}, in metres?"),
    "settled": (2, "In which year was {P} settled?", "When did the first colonists arrive on {P}?"),
    "founder": (2, "Who led the expedition that settled {P}?", "Who was the leader of the first colonists of {P}?"),
    "export": (3, "What is the main export of {P}?", "What does {P} sell most to other worlds?"),
    "currency": (3, "What currency do traders on {P} pay with?", "What money is used on {P}?"),
    "sport": (4, "What is the most popular sport on {P}?", "Which game do most people on {P} play?"),
    "festival": (4, "Which festival is celebrated on {P} every spring?", "What is the name of the spring celebration on {P}?"),
    # inverse questions: the answer is the planet, the key is a rare name (words beat meaning here)
    "planet_of_city": (1, "On which planet is the city of {C}?", "Which world has {C} as its capital?"),
    "planet_of_founder": (2, "Which planet was settled by an expedition led by {F}?", "Which world did {F} lead colonists to?"),
    "planet_of_currency": (3, "On which planet do traders pay with the {K}?", "Which world uses the {K} as its money?"),
    "planet_of_festival": (4, "On which planet is the Festival of {E} celebrated?", "Which world holds the Festival of {E}?"),
}


def make_name(rng: random.Random, used: set[str], parts: int) -> str:
    while True:
        name = "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()
        if name not in used and 4 <= len(name) <= 10:
            used.add(name)
            return name


def make_planets() -> list[dict]:
    rng = random.Random(SEED)
    used: set[str] = set()
    planets = []
    for _ in range(N_PLANETS):
        p = {"name": make_name(rng, used, 2), "star": make_name(rng, used, 2), "ordinal": rng.choice(ORDINALS),
             "moons": rng.randint(0, 14), "year_days": rng.randint(90, 900), "capital": make_name(rng, used, 2),
             "river": make_name(rng, used, 2) + rng.choice(RIVERS_SUFFIX), "mountain": make_name(rng, used, 2),
             "peak": rng.randint(1200, 9800), "settled": rng.randint(2150, 2790),
             "founder": f"{make_name(rng, used, 1 + rng.randint(1, 2))} {make_name(rng, used, 2)}",
             "export": rng.choice(EXPORTS), "currency": make_name(rng, used, 2).lower(), "sport": rng.choice(SPORTS),
             "festival": make_name(rng, used, 2)}
        planets.append(p)
    return planets


def passages_of(p: dict) -> list[str]:
    return [
        f"{p['name']} is the {p['ordinal']} planet of the {p['star']} system. It completes one orbit of its star in "
        f"{p['year_days']} local days, and {p['moons']} moons circle it.",
        f"The capital of {p['name']} is {p['capital']}, a city built on the banks of the {p['river']} river. The "
        f"highest peak of the planet, Mount {p['mountain']}, rises {p['peak']} metres above the plains.",
        f"{p['name']} was settled in the year {p['settled']} by an expedition led by {p['founder']}. The first "
        f"colonists landed near the {p['river']} river and built their homes from local stone.",
        f"The main export of {p['name']} is {p['export']}, shipped to the other worlds of the {p['star']} system. "
        f"Traders on {p['name']} pay with the {p['currency']}, a currency minted in {p['capital']}.",
        f"The most popular sport on {p['name']} is {p['sport']}. Every spring the people of {p['name']} celebrate "
        f"the Festival of {p['festival']} with music and lanterns.",
    ]


def make_collection() -> tuple[list[dict], list[dict]]:
    """(passages, questions): passages {"id", "title", "text"}; questions {"id", "question", "answer", "passage_id", ...}."""
    rng = random.Random(SEED + 1)
    passages, questions = [], []
    for p in make_planets():
        slug = p["name"].lower()
        for k, text in enumerate(passages_of(p)):
            passages.append({"id": f"{slug}-{k}", "title": p["name"], "text": text})
        for attr, (k, literal, paraphrase) in QUESTIONS.items():
            style = rng.choice(["literal", "paraphrase"])
            q = (literal if style == "literal" else paraphrase).format(
                P=p["name"], M=p["mountain"], C=p["capital"], F=p["founder"], K=p["currency"], E=p["festival"])
            answer = p["name"] if attr.startswith("planet_of") else str(p[attr])
            assert answer in passages_of(p)[k] and sum(answer in t for t in passages_of(p)) >= 1
            questions.append({"id": f"{slug}-{attr}", "question": q, "answer": answer, "passage_id": f"{slug}-{k}",
                              "planet": p["name"], "attribute": attr, "style": style})
    rng.shuffle(questions)
    return passages, questions


SPLITS = {"dev": (0, 100), "test": (100, 400), "train": (400, 560)}  # question ranges after the shuffle


def main() -> None:
    passages, questions = make_collection()
    with open(HERE / "passages.jsonl", "w", encoding="utf-8") as f:
        for row in passages:
            f.write(json.dumps(row) + "\n")
    for split, (lo, hi) in SPLITS.items():
        with open(HERE / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in questions[lo:hi]:
                f.write(json.dumps(row) + "\n")
        print(f"{split}.jsonl: {hi - lo} questions")
    print(f"passages.jsonl: {len(passages)} passages about {N_PLANETS} planets")


if __name__ == "__main__":
    main()
