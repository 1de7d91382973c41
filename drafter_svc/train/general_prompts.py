"""`python -m drafter_svc.train.general_prompts`: a train prompt set of everyday assistant requests
(writing, role-play, explanation, advice, comparison, planning), written from templates × subjects.

Why: the train prompt sets (`../shared/data/prompts/train/`) are code, grade-school maths and
arena-hard's technical questions; none asks for prose. The target's greedy answers to mt-bench lean
on words those answers barely hold (8.5 % of its tokens occur < 20 times in 5.7 M archived answer
tokens, against ~2 % for the other eval files — TRAINING.md, thirty-third session), and a draft
vocabulary cannot fix that: the drafter has to read the target writing such text. The model is too
small to invent good prompts itself, so the prompts are composed here, deterministically, from
lists written for this file (not from any eval set); the target's answers to them are the data.

Output: JSONL rows `{"turns": [prompt], "category": ...}`, the format of the shared prompt sets."""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

SUBJECTS = [
    "the ocean", "a lighthouse keeper", "autumn in a small town", "a lost dog", "the first day of school",
    "a rainy afternoon", "an old bookshop", "friendship", "a mountain village", "the night sky",
    "a busy train station", "a grandmother's kitchen", "moving to a new city", "a forgotten letter",
    "the last day of summer", "a street musician", "winter mornings", "a family road trip",
    "learning to ride a bicycle", "a garden in spring", "a bakery at dawn", "an abandoned house",
    "the desert at noon", "a wedding", "a long flight", "a chess tournament", "a fishing boat",
    "a school science fair", "a thunderstorm", "a quiet library", "a farmers' market", "a city park",
    "a childhood home", "a marathon", "a river", "a snow day", "an art museum", "a campfire",
    "a small island", "a neighbourhood cafe", "public transport", "volunteering", "social media",
    "remote work", "recycling", "healthy sleep", "learning a new language", "saving money",
    "climate change", "electric cars", "the history of printing", "ancient Rome", "the Renaissance",
    "the industrial revolution", "democracy", "photosynthesis", "vaccines", "the water cycle",
    "black holes", "the human immune system", "inflation", "supply and demand", "urban gardening",
    "meditation", "team sports", "classical music", "jazz", "street food", "minimalism",
    "online privacy", "public libraries", "museums", "time management", "job interviews",
    "public speaking", "kindness", "courage", "honesty", "curiosity", "patience",
]

PERSONAS = [
    "a pirate captain", "a medieval knight", "a friendly robot", "a detective in 1920s London",
    "a tour guide in Paris", "a wise old wizard", "a nervous first-time astronaut", "a grumpy chef",
    "a cheerful kindergarten teacher", "a sports commentator", "a Shakespearean actor",
    "a park ranger", "a time traveller from the future", "a librarian", "a fitness coach",
    "a ship's cat", "a famous painter", "a radio host",
]

AUDIENCES = ["a ten-year-old", "a high-school student", "my grandmother", "a busy manager", "a complete beginner"]

TEMPLATES: dict[str, list[str]] = {
    "writing": [
        "Write a short poem about {s}.",
        "Write a short story about {s}.",
        "Write a haiku about {s}.",
        "Write a blog post introduction about {s}.",
        "Write a letter to a friend describing {s}.",
        "Write a short speech about {s} for a school assembly.",
        "Describe {s} in vivid detail in one paragraph.",
        "Write the opening paragraph of a novel that begins with {s}.",
        "Write a limerick about {s}.",
        "Write a diary entry about {s}.",
    ],
    "roleplay": [
        "Pretend you are {p}. Tell me about {s}.",
        "You are {p}. Describe your typical day.",
        "Act as {p} and give me advice about {s}.",
        "Imagine you are {p}. Write a short message to your friends about {s}.",
    ],
    "explain": [
        "Explain {s} to {a}.",
        "What are the most interesting facts about {s}?",
        "Why does {s} matter? Answer in a few paragraphs.",
        "Give a short history of {s}.",
        "Summarize the main ideas behind {s} in plain language.",
    ],
    "advice": [
        "What advice would you give someone who is nervous about {s}?",
        "Give me five tips related to {s}.",
        "How can I get better at {s}?",
        "What are the pros and cons of {s}?",
    ],
    "compare": [
        "Compare {s} and {t}. How are they alike and how are they different?",
        "Write a short dialogue between two friends who disagree about {s}.",
    ],
    "planning": [
        "Help me plan a weekend activity around {s}.",
        "Write an email to my team proposing a project about {s}.",
        "Write a product description for a gift inspired by {s}.",
    ],
}


def compose(n: int, seed: int = 0) -> list[dict]:
    """`n` distinct prompts, categories in turn (so any prefix stays balanced), reproducible by seed.
    A longer set keeps a shorter one as its prefix: answers keyed by row stay valid when it grows."""
    rng = random.Random(seed)
    pools: dict[str, list[str]] = {}
    for category, templates in TEMPLATES.items():
        pool = set()
        for t in templates:
            personas = PERSONAS if "{p}" in t else [""]
            audiences = AUDIENCES if "{a}" in t else [""]
            for i, s in enumerate(SUBJECTS):
                other = SUBJECTS[(i + 7) % len(SUBJECTS)]  # a fixed partner for the comparisons
                for p, a in itertools.product(personas, audiences):
                    pool.add(t.format(s=s, p=p, a=a, t=other))
        pools[category] = sorted(pool)
        rng.shuffle(pools[category])
    total = sum(len(v) for v in pools.values())
    if not 0 < n <= total:
        raise ValueError(f"n must be in 1..{total}, got {n}")
    rows: list[dict] = []
    while len(rows) < n:
        for category, pool in pools.items():
            if pool and len(rows) < n:
                rows.append({"turns": [pool.pop()], "category": category})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/prompts/general-chat.jsonl")
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows = compose(args.n, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {out}: {len(rows)} prompts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
