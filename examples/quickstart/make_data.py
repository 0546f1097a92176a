"""Writes the quickstart data: a bicycle shop's support messages turned into tickets (JSON).

Each answer routes the message to one of six queues and copies the bike, part and day it mentions (null
when it mentions none): {"queue": "repair_booking", "bike": "e-bike", "part": "brakes", "day": "Tuesday"}.
Routing alone is easy for an embedding kNN classifier (the audit measures it: 1.0 on the routing-only
version of this data), so the ticket also asks for extraction, which no retrieved neighbour can copy and a
small adapter learns in a few minutes on a CPU. Deterministic (seeded), so the committed files can be
regenerated:

    python examples/quickstart/make_data.py
"""

import itertools
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
INSTRUCTION = "Turn the customer message into a ticket: JSON with queue, bike, part and day (null when absent)."

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
        "Can I rent a {bike} for the weekend, picking it up {day}?",
        "Do you buy used bikes? I want to sell my {bike}.",
        "I found a {part} near your door on {day}, did someone lose it?",
        "Do you run a cycling course for beginners on a {bike}?",
    ],
}


def rows():
    out = []
    for label, templates in TEMPLATES.items():
        for t in templates:
            for bike, part, day in itertools.product(BIKES, PARTS, DAYS):
                bike2 = BIKES[(BIKES.index(bike) + 3) % len(BIKES)]
                ticket = {"queue": label, "bike": bike if "{bike}" in t else None,
                          "part": part if "{part}" in t else None, "day": day if "{day}" in t else None}
                out.append((t.format(bike=bike, part=part, day=day, bike2=bike2), json.dumps(ticket)))
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
    for text, ticket in all_rows:
        by_label.setdefault(json.loads(ticket)["queue"], []).append((text, ticket))
    train, golden = [], []
    for label, items in sorted(by_label.items()):
        n_golden = min(20, len(items) // 4)  # a queue with few distinct messages keeps most of them for training
        golden += items[:n_golden]
        train += items[n_golden : n_golden + 60]
    rng.shuffle(train)
    rng.shuffle(golden)

    def dump(path, items, prefix):
        with open(path, "w", encoding="utf-8") as f:
            for i, (text, ticket) in enumerate(items):
                row = {"id": f"{prefix}{i:04d}", "messages": [
                    {"role": "system", "content": INSTRUCTION},
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": ticket},
                ]}
                f.write(json.dumps(row) + "\n")

    dump(HERE / "data" / "train.jsonl", train, "t")
    dump(HERE / "data" / "golden.jsonl", golden, "g")
    print(f"{len(train)} train rows, {len(golden)} golden rows, {len(by_label)} labels")


if __name__ == "__main__":
    main()
