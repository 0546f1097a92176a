"""PII redaction (case C21: phone numbers of several regions), modes, pseudonym keys and the re-scan gate.

The analyzers are loaded once per setting and process (tunegate.data.pii caches them), so the module takes
seconds, not minutes. The spaCy model comes from its installed package; nothing is downloaded.
"""

import re

import pytest

from tunegate import TunegateError
from tunegate.config import PiiConfig, load_project
from tunegate.data.pii import DROP, RESCAN, Redactor, redactor_from_config

# case C21's input (docs/cases.md#c21), copied: UK, French, US and German numbers, national and
# international formats. Presidio's old default region list ("UK", "FE" typos) missed the national ones.
C21_LINES = [
    "Please call me on 020 7946 0958 after five.",
    "My mobile is 07700 900123.",
    "Reach the Paris office at 01 42 68 53 00.",
    "Contact: +33 1 42 68 53 00",
    "US support line (212) 555-0147, or +1 212 555 0147.",
    "Berlin desk: 030 901820, international +49 30 901820.",
    "UK international: +44 20 7946 0958",
]
C21_NUMBERS_PER_LINE = [1, 1, 1, 1, 2, 2, 1]
DIGIT_RUN = re.compile(r"\d[\d ()./-]{4,}\d")  # anything number-shaped that is left
ENTITIES = ["EMAIL_ADDRESS", "PHONE_NUMBER", "PERSON", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS"]
KEY_A, KEY_B = b"a-test-key-of-32-bytes-000000000", b"another-test-key-of-32-bytes-111"


@pytest.fixture(scope="module")
def mask():
    return Redactor(mode="mask", entities=ENTITIES)


def chat_row(rid, *contents):
    roles = ["system", "user", "assistant"] if len(contents) == 3 else ["user", "assistant"]
    return {"id": rid, "source": "t", "messages": [{"role": r, "content": c} for r, c in zip(roles, contents)],
            "meta": {"file": "train.jsonl", "line": 1}}


@pytest.mark.parametrize("phone_match", ["valid", "possible"])
def test_c21_every_phone_number_of_the_configured_regions_is_redacted(phone_match):
    r = Redactor(mode="mask", entities=["PHONE_NUMBER"], regions=["US", "GB", "FR", "DE"], phone_match=phone_match)
    out = r.redact_texts(C21_LINES)
    for line, tr, n in zip(C21_LINES, out, C21_NUMBERS_PER_LINE):
        assert tr.text.count("<PHONE_NUMBER>") == n, (line, tr.text)
        assert not DIGIT_RUN.search(tr.text), (line, tr.text)
        assert tr.found == {"PHONE_NUMBER": n} and not tr.rescan


def test_c21_national_numbers_need_their_region():
    """The failure the case reports: with US alone, the GB, FR and DE national formats are left in."""
    r = Redactor(mode="mask", entities=["PHONE_NUMBER"], regions=["US"], phone_match="valid")
    left = [tr.text for tr in r.redact_texts(C21_LINES) if DIGIT_RUN.search(tr.text)]
    assert left == [C21_LINES[0], C21_LINES[1], C21_LINES[2], "Berlin desk: 030 901820, international <PHONE_NUMBER>."]


def test_unknown_region_is_refused_at_config_time(tmp_path):
    (tmp_path / "tunegate.yaml").write_text(
        "name: p\ndata:\n  sources: [{path: train.jsonl}]\n  golden: {path: golden.jsonl}\n"
        "  pii: {regions: [US, UK, FR]}\n"
    )
    with pytest.raises(TunegateError) as exc:
        load_project(tmp_path / "tunegate.yaml")
    msg = str(exc.value)
    assert "data.pii.regions" in msg and "'UK'" in msg and "the United Kingdom is GB" in msg
    assert "allowed: AC, AD, AE" in msg and ", GB, " in msg and ", US, " in msg
    with pytest.raises(TunegateError, match=r"unknown phone region\(s\) \['XX'\]"):
        Redactor(regions=["US", "XX"])  # built directly, the same check
    assert PiiConfig(regions=["us", "gb"]).regions == ["US", "GB"]


def test_unknown_entity_type_is_refused_with_the_known_ones():
    with pytest.raises(TunegateError, match=r"unknown entity type\(s\) \['PHONE'\].*PHONE_NUMBER"):
        Redactor(entities=["PHONE"])


def test_pseudonym_mode_needs_a_key_from_the_environment():
    with pytest.raises(TunegateError, match="environment variable TUNEGATE_PII_KEY is not set"):
        redactor_from_config(PiiConfig(mode="pseudonym"), env={})
    with pytest.raises(TunegateError, match="MY_KEY is 5 characters; at least 16"):
        redactor_from_config(PiiConfig(mode="pseudonym", key_env="MY_KEY"), env={"MY_KEY": "short"})


def test_pseudonyms_are_consistent_across_rows_and_change_with_the_key():
    rows = [
        chat_row("r1", "Write to jane.roe@example.com or call +44 20 7946 0958.", "Noted."),
        chat_row("r2", "Is JANE.ROE@example.com still right? Her number is 020 7946 0958.", "Yes."),
        chat_row("r3", "And bob@example.org?", "No."),
    ]
    a = redactor_from_config(PiiConfig(mode="pseudonym", entities=ENTITIES), env={"TUNEGATE_PII_KEY": KEY_A.decode()})
    b = Redactor(mode="pseudonym", entities=ENTITIES, key=KEY_B)
    kept_a, drops, report = a.redact_records(rows)
    kept_b, _, _ = b.redact_records(rows)
    assert not drops and report["found_by_type"] == {"EMAIL_ADDRESS": 3, "PHONE_NUMBER": 2}
    assert report["key_id"] == a.key_id and len(a.key_id) == 12 and a.key_id != b.key_id

    def tokens(kept, kind):
        return [re.findall(rf"<{kind}_[a-z]{{10}}>", r["messages"][0]["content"]) for r in kept]

    emails, phones = tokens(kept_a, "EMAIL_ADDRESS"), tokens(kept_a, "PHONE_NUMBER")
    assert emails[0] == emails[1] != emails[2]  # one address (case-folded) in two rows; another address
    assert phones[0] == phones[1] and len(phones[0]) == 1  # national and +44 forms: one E.164 number
    assert tokens(kept_b, "EMAIL_ADDRESS")[0] != emails[0] and tokens(kept_b, "PHONE_NUMBER")[0] != phones[0]
    text = " ".join(m["content"] for r in kept_a for m in r["messages"])
    assert "jane" not in text.lower() and "7946" not in text and "bob" not in text
    assert rows[0]["messages"][0]["content"].startswith("Write to jane.roe@")  # inputs are not modified


def test_mask_mode_tags_every_turn_and_prompt_completion(mask):
    rows = [
        chat_row("c1", "You are the assistant of Dr. John Smith, phone 020 7946 0958.",
                 "Send the invoice to billing@example.com", "Done: it went to billing@example.com from 10.0.0.12."),
        {"id": "p1", "source": "t", "prompt": "Card 4111 1111 1111 1111 was declined.",
         "completion": "Please check IBAN GB82 WEST 1234 5698 7654 32.", "meta": {"file": "t.jsonl", "line": 2}},
        chat_row("c2", "What is the capital of France?", "Paris."),
    ]
    kept, drops, report = mask.redact_records(rows)
    assert not drops and [r["id"] for r in kept] == ["c1", "p1", "c2"]
    system, user, assistant = (m["content"] for m in kept[0]["messages"])
    assert system == "You are the assistant of Dr. <PERSON>, phone <PHONE_NUMBER>."
    assert user == "Send the invoice to <EMAIL_ADDRESS>"
    assert assistant == "Done: it went to <EMAIL_ADDRESS> from <IP_ADDRESS>."
    assert kept[1]["prompt"] == "Card <CREDIT_CARD> was declined."
    assert kept[1]["completion"] == "Please check IBAN <IBAN_CODE>."
    assert kept[2] == rows[2]
    assert report["rows_with_pii"] == 2 and report["found_by_type"] == {
        "CREDIT_CARD": 1, "EMAIL_ADDRESS": 2, "IBAN_CODE": 1, "IP_ADDRESS": 1, "PERSON": 1, "PHONE_NUMBER": 1}
    assert report["rescan_by_type"] == {} and report["rows_dropped_rescan"] == 0


def test_drop_mode_drops_rows_with_pii_and_never_logs_the_values():
    r = Redactor(mode="drop", entities=ENTITIES)
    rows = [chat_row("a", "Mail me at ann@example.com", "OK"), chat_row("b", "How are you?", "Fine."),
            chat_row("c", "Hi", "Call 020 7946 0958 or 020 7946 0959")]
    kept, drops, report = r.redact_records(rows)
    assert [x["id"] for x in kept] == ["b"] and kept[0] == rows[1]
    assert [(d.id, d.rule) for d in drops] == [("a", DROP), ("c", DROP)]
    assert drops[1].detail == "contains PHONE_NUMBER x2 (values not logged)"
    assert "ann@" not in drops[0].detail and report["rows_dropped_pii"] == 2


def test_rescan_gate_catches_what_the_first_pass_was_set_to_skip():
    """Redaction counts only findings scored >= 0.9, so a bare phone number (score 0.4) is left in; the
    gate re-scans at 0.3 and rejects those rows, whether the redaction changed the text or not."""
    r = Redactor(mode="mask", entities=ENTITIES, score_threshold=0.9, rescan_score_threshold=0.3)
    rows = [
        chat_row("changed", "Mail ann@example.com, or 020 7946 0958.", "OK"),  # e-mail masked, phone left
        chat_row("unchanged", "Here: 020 7946 0958", "OK"),  # nothing masked, phone left
        chat_row("clean", "Mail ann@example.com please.", "OK"),
    ]
    kept, drops, report = r.redact_records(rows)
    assert [x["id"] for x in kept] == ["clean"] and kept[0]["messages"][0]["content"] == "Mail <EMAIL_ADDRESS> please."
    assert [(d.id, d.rule) for d in drops] == [("changed", RESCAN), ("unchanged", RESCAN)]
    assert drops[0].detail == "re-scan after mask still finds PHONE_NUMBER x1 (values not logged)"
    assert report["rows_dropped_rescan"] == 2 and report["rescan_by_type"] == {"PHONE_NUMBER": 2}
    # the tags the redaction inserted are never findings of the re-scan
    assert r.redact_texts(["Mail ann@example.com please."])[0].rescan == {}


def test_batched_analysis_equals_per_text_analysis(mask):
    texts = C21_LINES + ["Dr. John Smith wrote to billing@example.com", "Nothing here.", "Nothing here."]
    batched = mask.analyze(texts)
    single = [mask.analyze([t])[0] for t in texts]
    key = lambda res: sorted((x.entity_type, x.start, x.end, x.score) for x in res)
    assert [key(b) for b in batched] == [key(s) for s in single]


def test_a_text_longer_than_the_scanner_takes_drops_its_row_and_the_others_are_redacted():
    """spaCy refuses a text over nlp.max_length (1,000,000 characters) with a ValueError that stopped the data
    stage; such a row cannot be said to hold no PII, so it is rejected (pii_unscannable) and the rest go on."""
    from tunegate.data.pii import UNSCANNED, Redactor

    r = Redactor(entities=["EMAIL_ADDRESS"])
    assert r.max_chars == 1_000_000
    long_row = {"id": "long", "source": "s", "meta": {},
                "messages": [{"role": "user", "content": "write to a@b.co " * 70_000}, {"role": "assistant", "content": "ok"}]}
    short = {"id": "short", "source": "s", "meta": {},
             "messages": [{"role": "user", "content": "mail x@y.org"}, {"role": "assistant", "content": "ok"}]}
    kept, drops, report = r.redact_records([long_row, short])
    assert [k["id"] for k in kept] == ["short"] and kept[0]["messages"][0]["content"] == "mail <EMAIL_ADDRESS>"
    assert [(d.id, d.rule) for d in drops] == [("long", UNSCANNED)] and "1,120,000 characters" in drops[0].detail
    assert report["rows_dropped_unscannable"] == 1


# ---- issue 20: letter case and neighbouring symbols ----------------------------------------------------------

@pytest.mark.parametrize("text", [
    "Please forward the invoice to John Smith before Friday.",
    "please forward the invoice to john smith before friday.",
    "PLEASE FORWARD THE INVOICE TO JOHN SMITH BEFORE FRIDAY.",
    "Please forward the invoice to \U0001F642John Smith before Friday.",  # an emoji touching the name
    "Please forward the invoice to \U0001F469\u200d\U0001F4BBJohn Smith before Friday.",  # a ZWJ sequence
])
def test_a_name_is_masked_whatever_its_case_and_neighbouring_symbols(text):
    """On main the lower-case, upper-case and emoji-adjacent copies of this sentence kept the name."""
    from tunegate.data.pii import Redactor

    [out] = Redactor(entities=["PERSON"]).redact_texts([text])
    assert "john" not in out.text.lower() and "smith" not in out.text.lower(), out.text
    assert out.found["PERSON"] >= 1


def test_views_keep_offsets_and_only_touch_what_they_should():
    from tunegate.data.pii import case_degenerate, case_view, symbol_view

    text = "hi \U0001F469\u200d\U0001F4BBJohn, mail \U0001F642a@b.co \U0001F642 ok"
    view, spans = symbol_view(text)
    assert view == "hi John, mail a@b.co  ok"  # an emoji between spaces goes; the spaces are the text's own
    start = view.index("a@b.co")
    assert text[spans[start][0]:spans[start + 5][1]] == "a@b.co"
    assert symbol_view("plain ascii") == ("plain ascii", None)
    assert case_view("MY NAME IS JOHN O'NEIL") == "my name is John O'neil"  # "name" is a stop word in spaCy's list
    assert len(case_view("straße STRASSE")) == len("straße STRASSE")
    assert case_degenerate("please call john smith tomorrow") and case_degenerate("PLEASE CALL JOHN SMITH")
    assert not case_degenerate("Please call John Smith tomorrow") and not case_degenerate("I think so. Yes it is")
    assert case_degenerate("i think so, call john")


def test_the_rescan_reads_differently_and_finds_what_the_first_pass_missed(monkeypatch):
    """The re-scan reads every text through the case view: a capitalised name the first view did not take for
    a name (here: the first pass is made to miss it) is found, and the row is not passed as clean."""
    from tunegate.data import pii
    from tunegate.data.pii import Redactor

    r = Redactor(entities=["PERSON"])
    real = r._analyze_views
    calls = []

    def first_view_blind(views, thr, entities=None):
        calls.append(views)
        return [[] for _ in views] if len(calls) == 1 else real(views, thr, entities)

    monkeypatch.setattr(r, "_analyze_views", first_view_blind)
    [out] = r.redact_texts(["The parcel was signed for by Margaret Thompson at the door."])
    assert out.found == {} and out.rescan.get("PERSON") == 1
    assert pii.case_view("the parcel was signed for by margaret thompson").count("Margaret") == 1


def test_marks_inside_a_word_are_kept_so_a_decomposed_name_is_masked_whole():
    """Found in review: combining marks were read as spaces, so a name in NFD ("Mu" + U+0308 + "ller") was cut in
    two and half of it stayed after masking."""
    import unicodedata

    from tunegate.data.pii import Redactor, symbol_view

    assert symbol_view("Mül\u00adler") == ("Mül\u00adler", None)
    text = unicodedata.normalize("NFD", "Please call Zoë Müller tomorrow about the invoice.")
    view, spans = symbol_view(text)
    assert view == unicodedata.normalize("NFC", text) and text[spans[12][0]:spans[14][1]] == "Zoe\u0308"
    [out] = Redactor(entities=["PERSON"]).redact_texts([text])
    assert "ller" not in out.text and "<PERSON>" in out.text, out.text
    view, _ = symbol_view("hi \U0001F44D\U0001F3FD\ufe0fJohn")  # a thumbs-up with a skin tone and VS16
    assert view == "hi John"


@pytest.mark.parametrize("mark", ["\u2192", "\u2022", "1\ufe0f\u20e3", "\u00ab"])
def test_arrows_bullets_keycaps_and_quotes_before_a_name_are_word_boundaries(mark):
    """Found by trying it: '→Jennifer Garcia' and '•Jennifer Garcia' kept 'Jennifer' after masking."""
    from tunegate.data.pii import Redactor

    [out] = Redactor(entities=["PERSON"]).redact_texts([f"Ticket opened by {mark}Jennifer Garcia yesterday."])
    assert "Jennifer" not in out.text and "Garcia" not in out.text, out.text


def test_a_json_answer_is_not_read_as_lower_case_text():
    """Found by trying it: with PII on, the quickstart's JSON answers ('"bike": null, "day": "Thursday"') were read
    as all-lower-case text, 'Null' became a PERSON, and 113 of 360 answers were no longer JSON."""
    from tunegate.data.pii import Redactor, case_degenerate, case_view

    answer = '{"queue": "other", "bike": null, "part": "chain", "day": "Thursday"}'
    assert not case_degenerate(answer)
    assert "null" in case_view('{"bike": null, "ok": true}')
    [out] = Redactor(entities=["PERSON", "LOCATION"]).redact_texts([answer])
    assert out.text == answer
