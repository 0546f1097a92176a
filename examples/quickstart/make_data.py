"""Writes the quickstart data: support messages of a bicycle shop, routed to one of six queues.

The base model has never seen these queue names, so it cannot answer in this label set; a small adapter
learns it in a few minutes on a CPU. Deterministic (seeded), so the committed files can be regenerated:

    python examples/quickstart/make_data.py
"""

import itertools
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
INSTRUCTION = "Route the customer message to one queue. Answer with the queue name only."

BIKES = ["road bike", "e-bike", "gravel bike", "kids' bike", "cargo bike", "mountain bike", "folding bike", "city bike"]
PARTS = ["brakes", "gears", "chain", "back wheel", "front tyre", "battery", "saddle", "pedals"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "next week", "tomorrow"]

TEMPLATES = {
    "repair_booking": [
        "The {part} on my {bike} need a look, can I bring it in on {day}?",
        "I'd like to book a service for my {bike} {day}.",
        "Can your workshop fix the {part} of my {bike}? {day} would suit me.",
        "My {bike}'s {part} are making a noise. When can a mechanic check it? Maybe {day}?",
    ],
    "order_status": [
        "Where is my order? I bought a {bike} and it still hasn't shipped.",
        "I ordered new {part} for my {bike} last week, any tracking number?",
        "Has my {bike} left the warehouse yet? I was told it would arrive {day}.",
        "The delivery of my {part} was due {day} but nothing came.",
    ],
    "return_request": [
        "I want to send back the {bike} I bought, it is too big.",
        "How do I return the {part} I ordered? They don't fit my {bike}.",
        "Can I get my money back for the {bike}? I changed my mind on {day}.",
        "The {part} arrived damaged, I'd like to return them for a refund.",
    ],
    "product_question": [
        "Does the {bike} come with {part} included?",
        "What size {bike} would you recommend for someone 1.80 m tall?",
        "Are the {part} on the {bike} compatible with a {bike2}?",
        "How much does the {bike} weigh, and is it good for hills?",
    ],
    "billing_issue": [
        "I was charged twice for my {bike}.",
        "My card was billed for {part} I never ordered.",
        "The invoice for my {bike} shows the wrong price, please fix it.",
        "Why did you take a second payment {day} for the {part}?",
    ],
    "other": [
        "Do you have a job opening for a mechanic? I can start {day}.",
        "What are your opening hours on {day}?",
        "Can I park my {bike} in front of the shop while I shop next door?",
        "Do you sponsor local cycling clubs? We ride every {day}.",
    ],
}


def rows():
    out = []
    for label, templates in TEMPLATES.items():
        for t in templates:
            for bike, part, day in itertools.product(BIKES, PARTS, DAYS):
                bike2 = BIKES[(BIKES.index(bike) + 3) % len(BIKES)]
                out.append((t.format(bike=bike, part=part, day=day, bike2=bike2), label))
    # templates that do not use every slot repeat: keep each distinct message once
    seen, unique = set(), []
    for text, label in out:
        if text not in seen:
            seen.add(text)
            unique.append((text, label))
    return unique


def main() -> None:
    rng = random.Random(7)
    all_rows = rows()
    rng.shuffle(all_rows)
    by_label = {}
    for text, label in all_rows:
        by_label.setdefault(label, []).append(text)
    train, golden = [], []
    for label, texts in sorted(by_label.items()):
        golden += [(t, label) for t in texts[:20]]
        train += [(t, label) for t in texts[20:80]]
    rng.shuffle(train)
    rng.shuffle(golden)

    def dump(path, items, prefix):
        with open(path, "w", encoding="utf-8") as f:
            for i, (text, label) in enumerate(items):
                row = {"id": f"{prefix}{i:04d}", "messages": [
                    {"role": "system", "content": INSTRUCTION},
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": label},
                ]}
                f.write(json.dumps(row) + "\n")

    dump(HERE / "data" / "train.jsonl", train, "t")
    dump(HERE / "data" / "golden.jsonl", golden, "g")
    print(f"{len(train)} train rows, {len(golden)} golden rows, {len(by_label)} labels")


if __name__ == "__main__":
    main()
