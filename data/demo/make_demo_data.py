"""Regenerate the shipped demo data set (deterministic): python data/demo/make_demo_data.py

A closed-answer task a tiny LoRA model learns on a CPU in minutes while the random base cannot:
label a templated product review "positive" or "negative" from its adjectives. The held-out
prompts (eval_prompts.yaml) use products and sentence templates never seen in training.

The preference pairs (preference.jsonl, and preference_val.jsonl on the held-out products and
templates) teach a style on top of that label, for `finetune-dpo`: both answers give the right
label, the chosen one follows it with the matching smiley ("positive :)", "negative :("), the
rejected one with the other smiley. The SFT model never saw a smiley, and the swap makes any
label-blind taste for one smiley count for chosen in half the pairs and for rejected in the other
half, so it starts near 50% preference accuracy; DPO has to learn the label-to-smiley link.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SYSTEM = "Label the sentiment of the review as positive or negative."
POSITIVE = ["great", "excellent", "wonderful", "lovely", "superb", "fantastic", "delightful", "brilliant",
            "reliable", "comfortable", "sturdy", "amazing", "pleasant", "perfect", "solid", "charming"]
NEGATIVE = ["terrible", "awful", "horrible", "broken", "flimsy", "useless", "disappointing", "poor",
            "noisy", "cheap", "dreadful", "faulty", "ugly", "slow", "fragile", "annoying"]
TRAIN_PRODUCTS = ["phone", "kettle", "jacket", "lamp", "chair", "backpack", "blender", "watch", "printer",
                  "tent", "guitar", "sofa", "camera", "bicycle", "toaster", "mattress", "keyboard", "mug"]
HELD_OUT_PRODUCTS = ["laptop", "umbrella", "helmet", "speaker", "oven", "scarf"]
TRAIN_TEMPLATES = [
    "The {p} was {a} and {b}.",
    "I bought this {p} last week. It is {a}, honestly {b}.",
    "My new {p} feels {a}. Also {b}.",
    "Overall a {a} {p}, and quite {b} too.",
    "This {p} is {a}. Would say {b}.",
]
HELD_OUT_TEMPLATES = ["Review of the {p}: {a}, {b}.", "A {a} and {b} {p}, in my opinion."]


def review(rng, products, templates):
    label = rng.choice(["positive", "negative"])
    words = POSITIVE if label == "positive" else NEGATIVE
    a, b = rng.sample(words, 2)
    return rng.choice(templates).format(p=rng.choice(products), a=a, b=b), label


def main() -> None:
    rng = random.Random(1234)
    rows, seen = [], set()
    while len(rows) < 800:
        text, label = review(rng, TRAIN_PRODUCTS, TRAIN_TEMPLATES)
        if text in seen:
            continue
        seen.add(text)
        rows.append({"messages": [{"role": "system", "content": SYSTEM},
                                  {"role": "user", "content": text},
                                  {"role": "assistant", "content": label}]})
    with open(HERE / "sentiment.jsonl", "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    checks = []
    for i in range(20):
        text, label = review(rng, HELD_OUT_PRODUCTS, HELD_OUT_TEMPLATES)
        checks.append({"name": f"held-out-{i:02d}", "system": SYSTEM, "prompt": text, "expect": {"exact": label}})
    with open(HERE / "eval_prompts.json", "w", encoding="utf-8") as fh:
        json.dump({"checks": checks}, fh, indent=1)



def smiley_pair(label: str) -> tuple[str, str]:
    """(chosen, rejected) answer of a preference pair: the label and the matching / other smiley."""
    good, bad = (":)", ":(") if label == "positive" else (":(", ":)")
    return f"{label} {good}", f"{label} {bad}"


def preference_pairs(rng, count: int, products, templates) -> list[dict]:
    pairs, seen = [], set()
    while len(pairs) < count:
        text, label = review(rng, products, templates)
        if text in seen:
            continue
        seen.add(text)
        chosen, rejected = smiley_pair(label)
        pairs.append({"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
                      "chosen": [{"role": "assistant", "content": chosen}],
                      "rejected": [{"role": "assistant", "content": rejected}]})
    return pairs


def preference() -> None:
    """preference.jsonl (training products and templates) and preference_val.jsonl (held-out ones)."""
    rng = random.Random(4321)  # its own generator: sentiment.jsonl and eval_prompts.json stay as they are
    for name, count, products, templates in (("preference.jsonl", PREFERENCE_PAIRS, TRAIN_PRODUCTS, TRAIN_TEMPLATES),
                                             ("preference_val.jsonl", 60, HELD_OUT_PRODUCTS, HELD_OUT_TEMPLATES)):
        with open(HERE / name, "w", encoding="utf-8") as fh:
            for pair in preference_pairs(rng, count, products, templates):
                fh.write(json.dumps(pair) + "\n")


PREFERENCE_PAIRS = 400

if __name__ == "__main__":
    main()
    preference()
