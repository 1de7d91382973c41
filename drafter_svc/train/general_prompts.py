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


NAMES = ["Maria", "James", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Fatima", "Ivan", "Grace", "Kwame",
         "Sofia", "Daniel", "Mei", "Lucas", "Amara", "Noah", "Elena", "Hassan"]
CITIES = ["Lisbon", "Toronto", "Nairobi", "Osaka", "Denver", "Krakow", "Lima", "Melbourne", "Cairo", "Oslo",
          "Mumbai", "Dublin", "Seoul", "Austin", "Marseille", "Hanoi"]
JOBS = ["nurse", "architect", "baker", "software developer", "teacher", "journalist", "pilot", "pharmacist",
        "carpenter", "marine biologist", "accountant", "chef"]
ITEMS = ["apples", "notebooks", "bus tickets", "concert tickets", "coffee beans", "paint brushes", "plant pots",
         "batteries", "candles", "scarves"]
STEM = ["how vaccines train the immune system", "why the sky is blue", "how a refrigerator keeps food cold",
        "how GPS finds your position", "what causes the seasons", "how batteries store energy",
        "how airplanes stay in the air", "what DNA does in a cell", "how earthquakes happen",
        "why ice floats on water", "how solar panels make electricity", "what an exoplanet is",
        "how antibiotics work", "what entropy means", "how the heart pumps blood", "how rainbows form",
        "what a chemical catalyst does", "how sound travels", "why metals conduct electricity",
        "how a vaccine trial is run", "what the speed of light tells us", "how tides work"]
HUMANITIES = ["the printing press", "the French Revolution", "the Silk Road", "the invention of writing",
              "Greek tragedy", "the Harlem Renaissance", "the fall of the Berlin Wall", "impressionist painting",
              "the Enlightenment", "the Olympic Games", "the rise of cities", "folk tales", "the novel as a form",
              "the abolition of slavery", "the history of money", "Stoic philosophy", "the Cold War",
              "the Mughal Empire", "the Meiji era", "the civil rights movement"]


def _chat_pools(rng: random.Random) -> dict[str, list[str]]:
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
    return pools


def _task_pools(rng: random.Random, per_category: int = 1500) -> dict[str, list[str]]:
    """The `tasks` set: what the chat set lacks — reading a given text (extraction, rewriting), short
    reasoning, and explanations of science and history. Texts are drawn from the lists above by `rng`."""

    def job() -> str:
        j = rng.choice(JOBS)
        return ("an " if j[0] in "aeiou" else "a ") + j

    def bio() -> str:
        n, n2 = rng.sample(NAMES, 2)
        a, b, c = rng.sample(CITIES, 3)
        y = rng.randrange(1975, 2015)
        return (f"{n} was born in {a} and worked as {job()} before moving to {b} in {y}. There {n} met {n2}, "
                f"{job()} from {c}, and in {y + rng.randrange(1, 9)} the two opened a small business together.")

    makers = {
        "extraction": [
            lambda: f"Extract every person, city and year from this text and return them as JSON: \"{bio()}\"",
            lambda: f"Summarize this text in one sentence: \"{bio()}\"",
            lambda: f"Read the text and answer: who moved, and where to? \"{bio()}\"",
            lambda: f"Turn this text into a bulleted timeline: \"{bio()}\"",
        ],
        "rewriting": [
            lambda: f"Rewrite this paragraph in a more formal tone: \"{bio()}\"",
            lambda: f"Rewrite this paragraph for a children's book: \"{bio()}\"",
            lambda: (f"Fix the grammar in this sentence: \"me and {rng.choice(NAMES)} goes to "
                     f"the market in {rng.choice(CITIES)} every weeks and we was happy.\""),
            lambda: f"Make this sentence shorter and clearer: \"In my personal opinion I think that "
                    f"{rng.choice(SUBJECTS)} is something that is really quite important for many people.\"",
        ],
        "reasoning": [
            lambda: "{0} is taller than {1}, {1} is taller than {2}, and {3} is shorter than {2}. "
                    "Who is the tallest and who is the shortest? Explain step by step.".format(*rng.sample(NAMES, 4)),
            lambda: (f"A shop sells {rng.choice(ITEMS)} at {rng.randrange(2, 9)} dollars each. "
                     f"{rng.choice(NAMES)} buys {rng.randrange(3, 12)} and pays with a "
                     f"{rng.choice([50, 100])}-dollar note. How much change is due? Show your reasoning."),
            lambda: (f"A train leaves {rng.choice(CITIES)} at {rng.randrange(6, 12)}:00 and travels for "
                     f"{rng.randrange(2, 7)} hours and {rng.choice([15, 30, 45])} minutes. At what time does it "
                     "arrive? Explain."),
            lambda: "{0}, {1} and {2} each have a different pet: a cat, a dog and a parrot. {0} is allergic to "
                    "fur, and {1} does not own the cat. Who owns which pet? Reason it out.".format(*rng.sample(NAMES, 4)),
        ],
        "stem": [
            lambda: f"Explain {rng.choice(STEM)}.",
            lambda: f"Explain {rng.choice(STEM)} to {rng.choice(AUDIENCES)}, with an everyday example.",
            lambda: f"Many people misunderstand {rng.choice(STEM)}. Explain it and correct a common mistake.",
        ],
        "humanities": [
            lambda: f"Discuss the influence of {rng.choice(HUMANITIES)} on the modern world.",
            lambda: f"What were the causes and consequences of {rng.choice(HUMANITIES)}?",
            lambda: f"Write a short essay comparing {' and '.join(rng.sample(HUMANITIES, 2))}.",
            lambda: f"Explain {rng.choice(HUMANITIES)} to {rng.choice(AUDIENCES)}.",
        ],
    }
    pools: dict[str, list[str]] = {}
    for category, fns in makers.items():
        pool: dict[str, None] = {}  # distinct, in generation order
        for _ in range(per_category * 20):  # the small-list categories run out of distinct prompts early
            pool.setdefault(rng.choice(fns)())
            if len(pool) == per_category:
                break
        pools[category] = list(pool)[::-1]  # compose pops from the end: keep generation order
    return pools


SETS = {"chat": _chat_pools, "tasks": _task_pools}


def compose(n: int, seed: int = 0, kind: str = "chat") -> list[dict]:
    """`n` distinct prompts of set `kind`, categories in turn (so any prefix stays balanced while every
    category lasts), reproducible by seed. A longer set keeps a shorter one as its prefix: answers keyed
    by row stay valid when it grows."""
    pools = SETS[kind](random.Random(seed))
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
    ap.add_argument("--out", help="default: data/prompts/general-<set>.jsonl")
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", choices=sorted(SETS), default="chat",
                    help="chat: writing, role-play, explanation, advice, comparison, planning; "
                         "tasks: extraction, rewriting, reasoning, science, history")
    args = ap.parse_args(argv)
    rows = compose(args.n, args.seed, args.set)
    out = Path(args.out or f"data/prompts/general-{args.set}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {out}: {len(rows)} prompts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
