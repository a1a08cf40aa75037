"""Writes the demo's small sentiment dataset (examples/data/sentiment_*.jsonl).

Sentences are built from templates and word lists written for this project, so the data is
reproducible from the seed and carries no third-party text.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = ["the film", "this movie", "the story", "the acting", "the soundtrack", "the ending", "the script",
            "the director's new work", "the cast", "the plot", "the cinematography", "the sequel", "the dialogue",
            "the pacing", "this documentary", "the lead performance", "the animation", "the final act"]
POSITIVE = ["wonderful", "moving", "delightful", "brilliant", "charming", "gripping", "beautifully made", "funny",
            "heartfelt", "clever", "memorable", "stunning", "a real pleasure", "warm and generous", "superb",
            "thoughtful", "inventive", "touching", "great fun", "sharp and witty"]
NEGATIVE = ["dull", "tedious", "clumsy", "boring", "lifeless", "a mess", "painfully slow", "predictable", "flat",
            "forgettable", "poorly written", "shallow", "tiresome", "awkward", "a waste of time", "bland",
            "confusing", "overlong", "joyless", "cheap and lazy"]
TEMPLATES = ["{s} is {w}.", "honestly, {s} was {w}.", "i thought {s} was {w}.", "{s} felt {w} from start to finish.",
             "overall {s} is {w}.", "for me {s} was simply {w}.", "{s}? {w}.", "everyone agreed {s} was {w}.",
             "{s} turned out to be {w}.", "what can i say, {s} is {w}."]
CONTRASTS = ["although {s} starts slow, it ends up {w}.", "despite some flaws, {s} is {w}.",
             "i expected more, but {s} was {w}.", "{s} tries hard, yet it is {w}."]


def sentence(rng: random.Random, label: int) -> str:
    words = POSITIVE if label == 1 else NEGATIVE
    template = rng.choice(CONTRASTS if rng.random() < 0.25 else TEMPLATES)
    text = template.format(s=rng.choice(SUBJECTS), w=rng.choice(words))
    return text[0].upper() + text[1:]


def make(n: int, seed: int) -> list[dict[str, object]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        rows.append({"text": sentence(rng, label), "label": "positive" if label else "negative"})
    rng.shuffle(rows)
    return rows


def main() -> None:
    out = Path(__file__).parent / "data"
    out.mkdir(exist_ok=True)
    for name, n, seed in (("train", 800, 1), ("validation", 200, 2)):
        path = out / f"sentiment_{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in make(n, seed)), encoding="utf-8")
        print(f"wrote {n} examples to {path}")


if __name__ == "__main__":
    main()
