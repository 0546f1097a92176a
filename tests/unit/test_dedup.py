"""Duplicate removal (case C20 in docs/cases.md: short texts), exact after normalisation, near by verified Jaccard."""

from tunegate.data.dedup import dedup, shingles


def rows(texts):
    return [{"id": f"s{i}", "text": t} for i, t in enumerate(texts)]


def test_c20_distinct_short_texts_survive_real_duplicates_go_empty_is_fine():
    texts = ["cat", "dog", "cat", "a short line", "", "Road 1506 is located in Lamar County",
             "Road 1507 is located in Lamar County"]
    kept, dropped = dedup(rows(texts), lambda r: r["text"])
    assert [r["id"] for r in kept] == ["s0", "s1", "s3", "s4", "s5", "s6"]
    assert [(d.id, d.duplicate_of, d.kind) for d in dropped] == [("s2", "s0", "exact")]


LONG = ("my card payment was declined at the supermarket this morning and I do not know why because there is "
        "plenty of money in the account and the card worked yesterday at the petrol station without any problem at all")


def test_exact_after_normalisation_and_near_duplicates_verified():
    base = LONG
    texts = [base, base.upper().replace(" ", "  "), base.replace("at all", "at all, thanks"),
             "how do I order a new physical card for my account please"]
    kept, dropped = dedup(rows(texts), lambda r: r["text"], threshold=0.7)
    assert [r["id"] for r in kept] == ["s0", "s3"]
    got = {d.id: (d.duplicate_of, d.kind) for d in dropped}
    assert got == {"s1": ("s0", "exact"), "s2": ("s0", "near")}
    near = next(d for d in dropped if d.kind == "near")
    a, b = shingles(texts[0], 5), shingles(texts[2], 5)
    assert near.jaccard == round(len(a & b) / len(a | b), 4) and near.jaccard >= 0.7


def test_near_off_keeps_near_duplicates():
    kept, dropped = dedup(rows([LONG, LONG.replace("morning", "evening")]), lambda r: r["text"], near=False)
    assert len(kept) == 2 and dropped == []


def test_shingles_of_a_text_shorter_than_the_shingle_size_are_empty():
    assert shingles("a short line", 5) == set()
    assert shingles("one two three four five six", 5) == {"one two three four five", "two three four five six"}
