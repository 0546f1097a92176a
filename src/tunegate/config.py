"""The project file (`tunegate.yaml`): one pydantic model per section, unknown keys are errors.

`load_project(path, overrides)` reads the YAML, applies `key=value` overrides (dotted paths, list indices
allowed: `data.sources.0.path=/data/train.csv`), validates, and resolves relative paths against the
project file's folder. Settings of TRL, PEFT and transformers are passed through as plain dicts
(`train.trl` -> the method's TRL config, e.g. `trl.SFTConfig(**...)`, `train.lora` -> `peft.LoraConfig(**...)`) and checked by
`tunegate.recipes.defaults.check_passthrough`, which builds those config objects without loading a model
(that module also holds tunegate's defaults for them). Metric and suite names come from `tunegate.catalog`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_serializer, model_validator

from tunegate import TunegateError
from tunegate.catalog import (
    ABSTAIN_METRICS,
    ALL_METRICS,
    IFEVAL_FILE,
    IFEVAL_METRICS,
    JUDGE_METRICS,
    LM_EVAL_PREFIX,
    LOWER_IS_BETTER,
    MULTILABEL_METRICS,
    SAFETY_FILES,
    SAFETY_JUDGE_METRICS,
    SAFETY_METRICS,
    SAFETY_SOURCES,
    SAMPLE_FIELDS,
    SAFETY_WITH_SAFE_PROMPTS,
)
from tunegate.core.paths import check_identifier, identifier_problem, inside
from tunegate.core.text import normalize_answer


class _Section(BaseModel):
    # extra keys are typos; NaN and infinity are never a setting (a gate threshold of .nan would pass every check)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


MAX_ROW_BYTES = 8 * 2**20  # data.sources[].max_row_bytes default


# `data.sources[].feedback` kind -> (file name under <project>/feedback/, the format of its rows)
FEEDBACK_FILES = {"sft": ("sft.jsonl", "chat"), "preference": ("preference.jsonl", "preference"), "kto": ("kto.jsonl", "kto")}


class HoldoutConfig(_Section):
    """A split of a source by row id (tunegate.data.records.held_out): a row is held out when the sha256 of
    "<seed>:<id>" falls in the first `fraction` of its range, so the same ids are held out by every source with
    the same fraction and seed, whatever the rows' order or the file's other rows. `part: held_out` keeps those
    rows (a golden set), `part: rest` the others (training): a golden set and a training source read from one
    file then never share a row (BFCL is one such file: ../shared/data/bfcl/SOURCE.md)."""

    fraction: float = Field(gt=0, lt=1)
    seed: int = 0
    part: Literal["held_out", "rest"]


class SourceConfig(_Section):
    """One raw data source (tunegate.data.records). `format` is the shape of a row:

    chat: OpenAI `messages` (content may be a list of text parts).
    prompt_completion: `prompt` and `completion` strings (plain text, no chat template).
    alpaca: Stanford Alpaca's `instruction`, optional `input`, `output` (and optional `system`).
    sharegpt: `conversations` of {"from": human|gpt|system, "value": ...} turns.
    openai_log: production request/response logs in OpenAI chat format: `request` ({"messages": ...}, or a
        batch-API line's `body`) with `response` (a chat.completion, or a batch-API line's `{status_code, body}`).
    csv: a user and an assistant turn from two named columns (`prompt_column`, `completion_column`).
    preference: pairs for DPO/ORPO: `prompt` (string or messages) with `chosen` and `rejected` (strings or
        messages), or `chosen`/`rejected` only (whole conversations sharing their prompt, including Anthropic
        HH-RLHF "\n\nHuman: ... \n\nAssistant: ..." transcripts).
    kto: unpaired feedback: `prompt`, `completion` and a boolean `label` (thumbs up = true).
    text: raw text for continued pretraining, in the `text_column` field.
    bfcl: the Berkeley Function Calling Leaderboard's single-turn rows (tool calling; `path` a question file or
        BFCL's data folder, ground truth read from `possible_answer/` beside them; tunegate.data.records._bfcl_row).
    A chat row may carry OpenAI's `tools` with `tool_calls` and `tool` turns (tunegate.data.records.normalize_tools).

    The file type comes from `path`: .jsonl, .json (JSON lines or one JSON array), .csv, .tsv, .parquet, or a
    folder (a `datasets` save_to_disk folder, or a folder of .parquet files); `hub` reads a Hugging Face Hub
    dataset instead (needs the network). Any format reads from any file type; `columns` renames a row's
    fields first, e.g. {prompt: question, completion: answer}.
    """

    path: Path | None = None
    hub: str | None = None  # a Hugging Face Hub dataset id (network needed); pin `revision` for a repeatable run
    # The next round from served feedback: `feedback: sft` (edited answers as chat rows), `preference` (edit =
    # chosen, served answer = rejected) or `kto` (thumbs). The source is the file `tunegate data feedback` writes
    # (feedback/<kind>.jsonl in the project folder, FEEDBACK_FILES); `tunegate run` and `tunegate data` export it
    # from the serving database first, so a new rating is in the next run. Sets `path` and `format`.
    feedback: Literal["sft", "preference", "kto"] | None = None
    revision: str | None = None  # hub: a commit, tag or branch
    split: str = "train"  # a `datasets` folder holding several splits, or hub: which split to read
    format: Literal["chat", "prompt_completion", "alpaca", "sharegpt", "openai_log", "csv", "preference", "kto", "text", "bfcl"] = "chat"
    columns: dict[str, str] = Field(default_factory=dict)  # canonical field -> the source's field/column name
    text_column: str = "text"  # text: the field holding the raw text
    prompt_column: str = "prompt"  # csv: the column that becomes the user turn
    completion_column: str = "completion"  # csv: the column that becomes the assistant turn
    instruction: str | None = None  # a system message put before every row of this source
    sample: int | None = Field(default=None, ge=1)  # keep a seeded random sample of this many rows
    seed: int = 0
    # Keep only the rows held out by id, or only the others (HoldoutConfig); before `sample`. Left out of the dump
    # when unset, so existing projects keep their fingerprints.
    holdout: HoldoutConfig | None = Field(default=None, exclude_if=lambda v: v is None)
    license: str | None = None  # travels to the data card
    # A row larger than this (bytes of its line in JSONL/CSV/TSV; UTF-8 bytes of its text in JSON arrays, Parquet
    # and `datasets`) is rejected ("row_too_large") before it is parsed or tokenized: memory and time stay bounded
    # by this, not by the largest row of a file. 8 MiB holds ~2M tokens: generous for chat rows, room for long
    # documents in continued pretraining.
    max_row_bytes: int = Field(default=MAX_ROW_BYTES, ge=1024)
    # Label answers (a `task.kind` of classification or multilabel): `drop_labels` rejects the rows whose answer is
    # one of these labels (rule `dropped_label`), `label_map` rewrites an answer label to another. Together they
    # build the standard out-of-scope protocol from a closed-label dataset: hold some intents out of training
    # (drop_labels on the training source) and label their golden rows out-of-scope (label_map: {intent: oos}).
    drop_labels: list[str] = Field(default_factory=list)
    label_map: dict[str, str] = Field(default_factory=dict)
    # Set by Project from its `task` section: how a source's answers are read as labels (tunegate.evals.labels).
    _task: Any = PrivateAttr(default=None)  # a TaskConfig

    @model_validator(mode="after")
    def _label_ops_well_formed(self):
        keys = [normalize_answer(k) for k in self.label_map]
        clash = [k for k in self.label_map if keys.count(normalize_answer(k)) > 1 or not normalize_answer(k)]
        if clash:
            raise ValueError(f"label_map keys {clash}: its labels must differ after normalisation (case, spaces, edge "
                             "punctuation) and not be empty")
        bad = [v for v in self.label_map.values() if not v.strip() or v != v.strip()]
        if bad:
            raise ValueError(f"label_map maps to {bad[0]!r}: a label is a visible word without surrounding spaces")
        both = sorted({normalize_answer(d) for d in self.drop_labels} & (set(keys) | {normalize_answer(v) for v in self.label_map.values()}))
        if both:
            raise ValueError(f"label {both[0]!r} is both dropped and mapped (drop_labels is matched on the source's own "
                             "labels, before label_map): keep it in one of them")
        return self

    @model_serializer(mode="wrap")
    def _no_empty_label_ops(self, handler):
        """The dump leaves out empty `drop_labels` and `label_map`, so the runs of projects that set neither keep
        the fingerprints they had before the settings existed."""
        out = handler(self)
        for key in ("drop_labels", "label_map"):
            if not getattr(self, key):
                out.pop(key, None)
        return out

    @model_validator(mode="before")
    @classmethod
    def _feedback_file(cls, v):
        if isinstance(v, dict) and v.get("feedback") is not None:
            kind = v["feedback"]
            if kind not in FEEDBACK_FILES:
                return v  # the field's own check names the allowed kinds
            if v.get("path") is not None or v.get("hub") is not None:
                raise ValueError("a `feedback` source reads the file `tunegate data feedback` writes: give no `path` or `hub`")
            fmt = FEEDBACK_FILES[kind][1]
            if v.get("format", fmt) != fmt:
                raise ValueError(f"feedback: {kind} rows are format {fmt}, not {v['format']}")
            v = {**v, "path": Path("feedback") / FEEDBACK_FILES[kind][0], "format": fmt}
        return v

    @model_validator(mode="after")
    def _one_location(self):
        if (self.path is None) == (self.hub is None):
            raise ValueError("a source needs exactly one of `path` (a local file or folder), `hub` (a Hub dataset id) "
                             "and `feedback` (sft | preference | kto: served feedback)")
        return self

    @property
    def name(self) -> str:
        """How reports name this source: its file path; a folder or Hub id with its split (two splits of one
        dataset are two sources), e.g. hf://owner/name:train."""
        if self.path is None:
            return f"hf://{self.hub}:{self.split}"
        return str(self.path) + (f":{self.split}" if self.path.is_dir() else "")


TASK_KINDS = ("generation", "classification", "multilabel", "tool_call")


class TaskConfig(_Section):
    """What the answers are, and so how they are measured (tunegate.evals.labels). Without a `task` section a
    project is `generation`: free text, scored by `eval.metrics`.

    classification: every answer is one label of a closed set (`labels`, or every label of the training and golden
        answers). With `abstain_label` (e.g. `oos`, CLINC150's out-of-scope label, Larson et al. 2019) the metrics
        in_scope_accuracy, oos_recall and oos_precision are measured, and the audit's kNN classifier abstains
        below a similarity threshold tuned on dev rows.
    multilabel: an answer is a set of labels written `label<separator>label` (order never matters; the empty set
        is `none_label`). A source's answer may also be a JSON list of labels. Answers are stored in canonical
        form: sorted, each label once, joined by `separator`. Metrics: set_match, jaccard, label_micro_f1,
        label_macro_f1, label_micro_precision, label_micro_recall, and a per-label table on the eval page.
    tool_call: answers are function calls, scored by BFCL's AST rules against the allowed values
        (tunegate.evals.toolcall; rows with `tools`, or `format: bfcl`).

    Each kind brings its own default `eval.metrics` when the project gives none (the first is the headline):
    classification: exact_match, macro_f1 (+ in_scope_accuracy, oos_recall, oos_precision with abstain_label);
    multilabel: set_match, label_micro_f1, label_macro_f1, jaccard; tool_call: tool_call.
    """

    kind: Literal["generation", "classification", "multilabel", "tool_call"] = "generation"
    labels: list[str] | None = None  # classification / multilabel: the closed label set (None: read from the data)
    abstain_label: str | None = None  # classification: the answer for an out-of-scope query, e.g. oos
    separator: str = ", "  # multilabel: written between the labels of an answer (read: split on it, spaces trimmed)
    none_label: str = "none"  # multilabel: how the empty set is written

    @model_validator(mode="after")
    def _fits_kind(self):
        if self.abstain_label is not None and self.kind != "classification":
            raise ValueError(f"task.abstain_label is for task.kind classification, not {self.kind}")
        if self.abstain_label is not None and (not self.abstain_label.strip() or self.abstain_label != self.abstain_label.strip()):
            raise ValueError(f"task.abstain_label {self.abstain_label!r}: a visible label without surrounding spaces, e.g. oos")
        spelling = sorted({"separator", "none_label"} & self.model_fields_set)
        if spelling and self.kind != "multilabel":
            raise ValueError(f"task.{spelling[0]} is for task.kind multilabel, not {self.kind}")
        if self.labels is not None and self.kind not in ("classification", "multilabel"):
            raise ValueError(f"task.labels is for task.kind classification or multilabel, not {self.kind}")
        if self.kind == "multilabel" and not self.separator.strip():
            raise ValueError("task.separator must hold a visible character (e.g. ', '): answers are split on it")
        if self.kind == "multilabel" and (not self.none_label.strip() or self.separator.strip() in self.none_label):
            raise ValueError(f"task.none_label {self.none_label!r}: a visible word without the separator {self.separator.strip()!r}")
        if self.labels is not None:
            if len(set(self.labels)) != len(self.labels) or not all(label.strip() for label in self.labels):
                raise ValueError("task.labels: each label once, none empty")
            if self.kind == "multilabel" and any(self.separator.strip() in label for label in self.labels):
                raise ValueError(f"task.labels: a label holds the separator {self.separator.strip()!r}")
            if self.kind == "multilabel" and normalize_answer(self.none_label) in {normalize_answer(x) for x in self.labels}:
                raise ValueError(f"task.labels holds the none label {self.none_label!r} (the empty set): give task.none_label another word")
            # labels the metrics would read as one (they compare answers without edge punctuation: 'C' and 'C++')
            seen: dict[str, str] = {}
            for label in [*self.labels, *([self.abstain_label] if self.abstain_label else [])]:
                other = seen.setdefault(normalize_answer(label), label)
                if other != label:
                    raise ValueError(f"task.labels: {other!r} and {label!r} are one label once case, spaces and edge "
                                     "punctuation are ignored, as the metrics compare answers; rename one")
        return self

    def reading(self) -> dict[str, Any] | None:
        """The settings that change how rows are read (the data stage's fingerprint): kind, labels, and the
        multi-label spelling; None for a generation task. Changing the metrics or abstain_label reruns no data stage."""
        if self.kind not in ("classification", "multilabel"):
            return None
        out: dict[str, Any] = {"kind": self.kind, "labels": self.labels}
        if self.kind == "multilabel":
            out |= {"separator": self.separator, "none_label": self.none_label}
        if self.kind == "classification" and self.labels is not None:
            out["abstain_label"] = self.abstain_label  # an allowed answer beside the labels (unknown_label rule)
        return out

    def default_metrics(self) -> list[str] | None:
        """The eval.metrics of this kind when the project sets none (None: the generation default)."""
        if self.kind == "classification":
            return ["exact_match", "macro_f1", *(ABSTAIN_METRICS if self.abstain_label else ())]
        if self.kind == "multilabel":
            return ["set_match", "label_micro_f1", "label_macro_f1", "jaccard"]
        if self.kind == "tool_call":
            return ["tool_call"]
        return None


class GateRule(_Section):
    """One promotion rule on one metric; every bound that is set must hold. Differences are candidate - baseline.

    min / max: bounds on the candidate's score. max_regression: how far the candidate may fall behind the
    baseline (point estimate; for `lower_is_better` metrics, how far it may rise). min_delta_ci_low: the lower
    end of the paired-bootstrap 95% CI of the difference must be above this ("lower bound above -0.01");
    max_delta_ci_high: its upper end must be below this (for metrics where lower is better).
    """

    metric: str
    min: float | None = None
    max: float | None = None
    max_regression: float | None = Field(default=None, ge=0)
    min_delta_ci_low: float | None = None
    max_delta_ci_high: float | None = None
    lower_is_better: bool = False

    @model_validator(mode="after")
    def _has_a_bound(self):
        if all(getattr(self, k) is None for k in ("min", "max", "max_regression", "min_delta_ci_low", "max_delta_ci_high")):
            raise ValueError(f"gate rule on {self.metric} sets no bound (min, max, max_regression, min_delta_ci_low, max_delta_ci_high)")
        return self


class SemanticDedupConfig(_Section):
    """SemDeDup (Abbas et al. 2023, tunegate.data.dedup.semantic_dedup): MiniLM embeddings of each row's text,
    seeded k-means, and within each cluster a row whose cosine to an already-kept row is >= threshold is dropped.
    The kept row is the one with the highest `meta.quality`, then the first seen."""

    threshold: float = Field(default=0.95, gt=0, le=1)  # cosine similarity of unit-normalised MiniLM embeddings
    clusters: int | None = Field(default=None, ge=1)  # k-means k; None: round(sqrt(rows))
    seed: int = 0  # k-means seed


class DedupConfig(_Section):
    """Duplicate removal (tunegate.data.dedup): exact after normalisation, then MinHash LSH near-duplicates,
    then (when `semantic` is set) SemDeDup over MiniLM embeddings."""

    near: bool = True
    threshold: float = Field(default=0.8, gt=0, le=1)  # Jaccard similarity of word shingles
    num_perm: int = Field(default=128, ge=16)
    shingle_words: int = Field(default=5, ge=1)  # for texts of 4x as many words or more; shorter: single words
    # texts of 6-40 words that differ in exactly one word (a number, a place) are near duplicates; false keeps them
    one_word_variants: bool = True
    semantic: SemanticDedupConfig | None = None  # off unless set, e.g. `semantic: {threshold: 0.95}`


class DecontaminateConfig(_Section):
    """Removal of training rows any turn of which (answers included) holds a golden prompt or golden answer (case
    C23 in docs/cases.md; tunegate.data.golden.ngram_overlap; the eval gate applies the same rule). Words are
    compared lower-cased, punctuation stripped, whitespace collapsed. A golden text of `ngram` words or more
    matches by any shared `ngram`-word n-gram; one of `min_words` to ngram-1 words matches when a training turn
    contains it whole; a shorter golden prompt matches an equal training prompt only, and a shorter golden
    answer (a label) is not looked for."""

    ngram: int = Field(default=13, ge=1)  # words; 13 is the GPT-3 / Llama 2 decontamination convention
    # shorter golden texts: whole-prompt equality only. 5 on banking77: padded and quoted copies found 0.97, clean
    # training rows flagged 0.44% (6: 0.925 and 0.24%; 4: 0.995 and 0.85%; bench/decontamination.py)
    min_words: int = Field(default=5, ge=1)


def region_problem(regions: Sequence[str]) -> str | None:
    """Why a list of phone regions is not valid, or None. Regions are the `phonenumbers` library's codes."""
    import phonenumbers

    allowed = phonenumbers.SUPPORTED_REGIONS
    bad = [r for r in regions if not isinstance(r, str) or r.upper() not in allowed]
    if not bad:
        return None
    hint = " (the United Kingdom is GB)" if any(isinstance(r, str) and r.upper() == "UK" for r in bad) else ""
    return f"unknown phone region(s) {bad}{hint}; allowed: {', '.join(sorted(allowed))}"


class PiiConfig(_Section):
    """PII redaction (tunegate.data.pii): Presidio analyzer + anonymizer with the offline spaCy small model.

    Every message content (or prompt and completion) is analysed; then, per `mode`:
      mask      - each finding becomes its entity type in angle brackets, `<PHONE_NUMBER>`
      pseudonym - each value becomes a keyed token of its type, `<PERSON_kqzmwbtexa>`: HMAC-SHA256 of the
                  value under the secret in the environment variable `key_env`, so the same value maps to
                  the same token across the whole dataset and cannot be reversed without the key
      drop      - a row with any finding is rejected (rule `pii`)
    The redacted text is scanned again; a row where a configured type is still found is rejected (rule
    `pii_rescan`).
    """

    mode: Literal["mask", "pseudonym", "drop"] = "mask"
    # Presidio entity types; PERSON and LOCATION come from the spaCy NER (see bench/pii_eval.py for recall).
    entities: list[str] = Field(
        default_factory=lambda: ["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN", "PERSON"],
        min_length=1,
    )
    # Phone regions (ISO 3166-1 alpha-2, as the `phonenumbers` library names them: GB, not UK) whose
    # national formats are recognised; international `+CC` numbers are found whatever the list (case C21).
    regions: list[str] = Field(default_factory=lambda: ["US", "GB", "FR", "DE"], min_length=1)
    # Which phone numbers count:
    #   valid    - valid in a listed region's numbering plan, or +CC valid in its country (Presidio's own)
    #   context  - also a 7+ digit number of possible length with a phone word (phone, mobile, fax, call,
    #              ...) at most four words before it: made-up numbers, unlisted regions
    #   possible - also any 7+ digit number of possible length: the most recall, and more digit runs
    #              that are not phones get masked too (house numbers with post codes, order numbers)
    phone_match: Literal["valid", "context", "possible"] = "possible"
    key_env: str = "TUNEGATE_PII_KEY"  # pseudonym mode: the environment variable holding the secret key
    score_threshold: float = Field(default=0.35, ge=0.0, le=1.0)  # a finding counts from this Presidio score
    # The re-scan's threshold; lower it below score_threshold to make the gate stricter than the redaction.
    rescan_score_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    batch_size: int = Field(default=64, ge=1)  # texts per spaCy nlp.pipe batch

    @field_validator("regions")
    @classmethod
    def _known_regions(cls, v: list[str]) -> list[str]:
        problem = region_problem(v)
        if problem:
            raise ValueError(problem)
        return [r.upper() for r in v]

    @field_validator("entities")
    @classmethod
    def _entity_names(cls, v: list[str]) -> list[str]:
        bad = [e for e in v if not re.fullmatch(r"[A-Z][A-Z0-9_]*", e)]
        if bad:
            raise ValueError(f"entity types are upper-case Presidio names like PHONE_NUMBER, got {bad}")
        return list(dict.fromkeys(v))


class SelectConfig(_Section):
    """Quality scoring and diversity-aware selection (tunegate.data.quality), after dedup and decontamination.

    In the spirit of DEITA (Liu et al. 2023): each row gets a quality score (cheap heuristics on the answer)
    and, with `complexity: ifd`, a complexity score, the instruction-following difficulty of Li et al. 2023
    (the base model's loss on the answer given the instruction over its loss on the answer alone). Rows are
    visited best score first and kept while their MiniLM cosine to every kept row stays under
    `diversity_threshold`, until `budget_rows` or `budget_tokens` is reached. Unselected rows are rejected
    with `too_similar` or `over_budget`; `max_ifd` rejects rows the instruction does not help (`ifd_above_max`).
    """

    complexity: Literal["ifd", "none"] = "ifd"  # "none": quality heuristics only (no model is loaded)
    diversity_threshold: float = Field(default=0.9, gt=0, le=1)  # cosine at or above which a row is too similar
    budget_rows: int | None = Field(default=None, ge=1)
    budget_tokens: int | None = Field(default=None, ge=1)  # tokens after the chat template
    max_ifd: float | None = Field(default=None, gt=0)  # e.g. 1.0 (Li et al. drop IFD > 1); None keeps every row
    batch_size: int = Field(default=8, ge=1)  # rows per forward pass when scoring IFD


class DataConfig(_Section):
    sources: list[SourceConfig] = Field(min_length=1)
    golden: SourceConfig  # the frozen golden set: evaluation only, never trained on
    golden_lock: Path = Path("golden.lock.json")  # written on first freeze; a changed golden set is refused
    val_fraction: float = Field(default=0.05, ge=0.0, lt=1.0)
    seed: int = 0
    max_length: int = Field(default=512, ge=8)  # tokens, after the chat template
    # What to do with a row longer than max_length (case C10/C11):
    #   drop             - reject the row (counted in rejected.jsonl)
    #   truncate_end     - cut the assistant answer, keeping its end-of-turn token supervised
    #   cut_context_left - drop tokens from the start of the conversation, keeping the whole answer
    overlength: Literal["drop", "truncate_end", "cut_context_left"] = "drop"
    # A system message with a template that has no system role (case C04):
    #   auto   - keep it when the template renders system turns, otherwise merge it into the first user turn
    #   merge  - always merge it into the first user turn;  reject - reject such rows
    system_role: Literal["auto", "merge", "reject"] = "auto"
    # Invalid rows (a rule of the readers, the template, PII scanning) over this fraction of the rows read stop the
    # stage: the input is broken. Rows the quality gates remove on purpose (duplicates, golden-set overlap, PII in
    # drop mode or found again on re-scan) are counted apart, against max_removed_fraction: a clean dataset with many
    # paraphrases is not bad input. Selection (data.select) has its own budget and no limit.
    max_rejected_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    max_removed_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    dedup: DedupConfig | None = None  # off unless set, e.g. `dedup: {}` for the defaults
    # n-gram decontamination against the golden set, after the exact-overlap removal; on by default (it only
    # removes rows that overlap the golden set). `decontaminate: null` keeps the exact-overlap removal only.
    decontaminate: DecontaminateConfig | None = Field(default_factory=DecontaminateConfig)
    pii: PiiConfig | None = None  # off unless set, e.g. `pii: {mode: mask}`
    # Where the row steps (PII, chat template and loss mask) run (tunegate.data.engine): `local` on num_proc
    # processes of this machine (None = every core it may use), or `ray` on the cluster ray.init() finds.
    # The outputs are the same on every engine.
    engine: Literal["local", "ray"] = "local"
    num_proc: int | None = Field(default=None, ge=1)
    select: SelectConfig | None = None  # quality scoring and diversity-aware selection (DEITA); off unless set


class GrpoConfig(_Section):
    """GRPO (reinforcement fine-tuning, DeepSeekMath, Shao et al. 2024) against a verifier (tunegate.verifiers).

    `verifier`: a built-in (numeric, exact_label, json_schema, regex, ifeval, tool_call) or a function in a file of the
    project, "verifiers/reward.py:score" (path relative to the project file; its sha256 goes in the manifest).
    The verifier scores a completion against the row's reference answer (its final assistant turn; a tool row's
    expected calls), 0..1.
    TRL's GRPOConfig settings (num_generations, max_completion_length, beta, ...) go in `train.trl`.
    """

    verifier: str = "exact_label"
    json_schema: Path | None = None  # verifier json_schema: a JSON Schema file the completion must validate against
    pattern: str | None = None  # regex: the completion must match (re.search)
    tolerance: float = Field(default=1e-6, ge=0)  # numeric: |answer - reference| allowed
    smoke_prompts: int = Field(default=8, ge=1)  # preflight: prompts whose generations must give varying rewards (C18)
    # Run time (C18): when more than this fraction of groups has zero reward variance for `patience` logged
    # steps in a row, the run warns, and stops when `stop_on_zero_variance` is set.
    max_zero_variance_fraction: float = Field(default=0.9, ge=0, le=1)
    patience: int = Field(default=5, ge=1)
    stop_on_zero_variance: bool = False


class DistillationConfig(_Section):
    """Distillation: a small student learns from a teacher. `sequence` (Kim & Rush 2016): the teacher answers
    every training prompt and the student is trained on those answers with SFT. `logits` (GKD, Agarwal et al.
    2024, TRL's GKDTrainer): the student matches the teacher's token distributions; tokenizers must match."""

    teacher: str  # a base model name, a local folder or a Hugging Face id (offline cache)
    mode: Literal["sequence", "logits"] = "sequence"
    max_new_tokens: int = Field(default=256, ge=1)
    batch_size: int = Field(default=8, ge=1)


_DEMOS = ("chat", "prompt_completion", "alpaca", "sharegpt", "openai_log", "csv", "bfcl")
# Which source formats each training method reads (the data stage's record kinds, tunegate.data.records).
METHOD_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": _DEMOS,
    "cpt": ("text",),
    "dpo": ("preference",),
    "orpo": ("preference",),
    "kto": ("kto", "preference"),  # a pair gives one desirable and one undesirable row
    "grpo": ("chat", "alpaca", "sharegpt", "openai_log", "csv", "bfcl"),  # the final assistant turn is the reference answer the verifier checks against
    "distillation": ("chat", "alpaca", "sharegpt", "openai_log", "csv"),  # the teacher answers the prompts; the final turn is replaced
    "classify": tuple(f for f in _DEMOS if f != "bfcl"),  # the final answer is the row's label (task.kind classification)
}


class ClassifyConfig(_Section):
    """Method classify (tunegate.recipes.classify): the base model with a sequence-classification head (one score per
    label, on the last prompt token) and a LoRA/DoRA adapter; it answers in one forward pass, no generation.

    Abstention (task.abstain_label): when the training rows hold the abstain label it is one more class. When they
    hold none (held-out intents), the head answers the abstain label when its largest softmax probability is under
    a threshold (the maximum-softmax-probability baseline, Hendrycks & Gimpel 2017): `abstain_threshold` when set,
    else tuned on the validation rows (data stage's val.jsonl) after training, as the `val_abstain_rate` quantile of
    their largest probabilities: that share of in-scope validation rows would abstain.
    """

    abstain_threshold: float | None = Field(default=None, ge=0, lt=1)  # fixed; None: tuned on the validation rows
    val_abstain_rate: float = Field(default=0.05, ge=0, lt=1)  # the share of in-scope validation rows let abstain




class TrainConfig(_Section):
    """What to train and how. `method` is the objective, `adapter` the parameterisation.

    method: sft (demonstrations), cpt (continued pretraining on raw text, packed), dpo (preference pairs,
    Rafailov et al. 2023), kto (unpaired thumbs, Ethayarajh et al. 2024), orpo (SFT + preference in one pass,
    Hong et al. 2024), grpo (a verifier's reward), distillation (a teacher's answers or logits), classify (a
    sequence-classification head and an adapter for a closed label set: task.kind classification).
    adapter: dora (default: LoRA r=16 with DoRA), lora, qlora (4-bit base via bitsandbytes: CUDA only),
    full (every weight trains; no adapter).
    """

    method: Literal["sft", "cpt", "dpo", "kto", "orpo", "grpo", "distillation", "classify"] = "sft"
    adapter: Literal["dora", "lora", "qlora", "full"] = "dora"
    # Passed as-is to peft.LoraConfig; tunegate's defaults are LoRA r=16, alpha=32, DoRA, all linear layers.
    lora: dict[str, Any] = Field(default_factory=dict)
    # Passed as-is to the method's TRL config (SFTConfig, DPOConfig, KTOConfig, ORPOConfig, GRPOConfig, ...).
    trl: dict[str, Any] = Field(default_factory=dict)
    # Start from this adapter (e.g. the SFT run before DPO): training continues that adapter (its own rank and
    # modules; `adapter` and `lora` do not apply), and DPO/KTO/GRPO keep a frozen copy of it as the reference,
    # so the reference is the starting policy (case C19).
    init_adapter: Path | None = None
    grpo: GrpoConfig | None = None  # method grpo: required
    distillation: DistillationConfig | None = None  # method distillation: required
    # method classify: optional (abstention settings); left out of the dump when unset, so the train stages of
    # projects that never set it keep the fingerprints they had before it existed
    classify: ClassifyConfig | None = Field(default=None, exclude_if=lambda v: v is None)
    budget_minutes: float | None = Field(default=None, gt=0)  # stop training (and save) after this long
    seed: int = 0
    # Tokens added to the base tokenizer (e.g. ["<ticket>"]), as plain, non-special tokens: they may appear in the
    # data, and each becomes one new token id. The embedding grows by one row per token; the new rows train and
    # are saved with the adapter (tunegate.models.load_tokenizer, recipes.common.load_policy). A token the base
    # tokenizer already has is refused by `tunegate validate` and the preflight.
    added_tokens: list[str] = Field(default_factory=list)

    @field_validator("added_tokens")
    @classmethod
    def _added_tokens_distinct(cls, v: list[str]) -> list[str]:
        for i, tok in enumerate(v):
            if not tok.strip():
                raise ValueError(f"added_tokens[{i}]: an empty or blank token")
            if tok != tok.strip():
                raise ValueError(f"added_tokens[{i}]: {tok!r} begins or ends with whitespace")
        dup = sorted({t for t in v if v.count(t) > 1})
        if dup:
            raise ValueError(f"added_tokens: {', '.join(map(repr, dup))} listed twice")
        return v

    @model_validator(mode="after")
    def _method_settings(self) -> "TrainConfig":
        if self.method == "grpo" and self.grpo is None:
            raise ValueError("method grpo needs `grpo: {verifier: ...}` (which verifier scores the answers)")
        if self.method == "distillation" and self.distillation is None:
            raise ValueError("method distillation needs `distillation: {teacher: ...}`")
        if self.method != "grpo" and self.grpo is not None:
            raise ValueError(f"`grpo` is set but method is {self.method}")
        if self.method != "distillation" and self.distillation is not None:
            raise ValueError(f"`distillation` is set but method is {self.method}")
        if self.method != "classify" and self.classify is not None:
            raise ValueError(f"`classify` is set but method is {self.method}")
        if self.method == "classify":
            for setting, problem in (("adapter", self.adapter in ("full", "qlora") and f"adapter {self.adapter}"),
                                     ("init_adapter", self.init_adapter is not None and "init_adapter"),
                                     ("added_tokens", bool(self.added_tokens) and "added_tokens")):
                if problem:
                    raise ValueError(f"method classify with {problem}: not supported (train.{setting}); rule: a classify "
                                     "run trains a new LoRA/DoRA adapter (adapter lora or dora) with its head on the "
                                     "base model's own vocabulary")
        if self.adapter == "full" and self.lora:
            raise ValueError("adapter full trains every weight: remove `lora`")
        if self.init_adapter is not None and self.lora:
            raise ValueError("init_adapter continues that adapter with its own settings: remove `lora`")
        return self


def _default_gate() -> list[GateRule]:
    return [GateRule(metric="exact_match", min_delta_ci_low=0.0)]


class LmEvalConfig(_Section):
    """lm-evaluation-harness tasks scored for the base model and the candidate (tunegate.evals.harness), with
    tunegate's own model loading: the models the golden set is scored with, adapter off for the base model.

    tasks: task or group names as lm-eval knows them (`arc_easy`, `hellaswag`, `gsm8k`, `mmlu_pro`...; those read
    their data from the Hugging Face Hub, so they run where it or a local datasets cache is reachable) or
    defined by a YAML file in `include`. include: a folder of the project with task YAML files (lm-eval's task
    format; relative `data_files` are read from that folder). Its files are project code (a YAML may name a
    `!function`), so it must lie inside the project, and their sha256 is part of the eval stage's fingerprint.
    Each task's per-row scores give metrics `lm_eval.<task>.<metric>` (with `.<filter>` when the task's filter is
    not lm-eval's "none"), with the same paired-bootstrap CIs and gate rules as golden-set metrics; a group's
    rows are pooled (the micro average).
    """

    tasks: list[str] = Field(min_length=1)
    include: Path | None = None
    num_fewshot: int | None = Field(default=None, ge=0)  # None: each task's own setting
    limit: int | None = Field(default=None, ge=1)  # first N rows of each task, for quick runs
    chat_template: bool = False  # render prompts through the tokenizer's chat template (lm-eval's apply_chat_template)
    batch_size: int = Field(default=8, ge=1)

    @field_validator("tasks")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if not t or "/" in t or t != t.strip()]
        if bad:
            raise ValueError(f"task name(s) {bad}: give lm-eval task or group names (files go in `include`)")
        if len(set(v)) != len(v):
            raise ValueError(f"task names repeat: {v}")
        return v

    def files(self) -> dict[str, Path]:
        """Every file under `include` (task YAMLs, local data, `!function` modules), keyed `lm_eval:<relative path>`."""
        if self.include is None or not self.include.is_dir():
            return {}
        return {f"lm_eval:{p.relative_to(self.include).as_posix()}": p for p in sorted(self.include.rglob("*"))
                if p.is_file() and "__pycache__" not in p.parts}

    def measures(self, metric: str) -> bool:
        """Whether `metric` names one of these tasks (its metric part is checked when lm-eval loads the task)."""
        return any(metric.startswith(f"{LM_EVAL_PREFIX}{t}.") and len(metric) > len(LM_EVAL_PREFIX + t) + 1 for t in self.tasks)


class SuitesConfig(_Section):
    """Standard suites scored for the base model and the candidate beside the golden set (tunegate.evals.suites).

    `data_root` holds the upstream files as published: ifeval/input_data.jsonl, harmbench/, jbb_behaviors/,
    xstest/ (the repository's ../shared/data); IFEval and the safety suites need it. Metrics they add, usable in
    gate rules: ifeval_prompt_strict, ifeval_inst_strict, ifeval_prompt_loose, ifeval_inst_loose; harmful_refusal,
    over_refusal (and the `_judge` variants with `safety_judge`); `lm_eval.<task>.<metric>` (LmEvalConfig).
    """

    data_root: Path | None = None
    ifeval: bool = False
    ifeval_max_new_tokens: int = Field(default=512, ge=1)
    safety: list[Literal[SAFETY_SOURCES]] = Field(default_factory=list)
    safety_max_new_tokens: int = Field(default=64, ge=1)  # refusals show in the opening words
    safety_judge: bool = False  # also classify refusals with eval.judge
    limit: int | None = Field(default=None, ge=1)  # first N prompts per suite source (and kind), for quick runs
    lm_eval: LmEvalConfig | None = None

    @model_validator(mode="after")
    def _data_root_when_read(self):
        if self.data_root is None and (self.ifeval or self.safety):
            raise ValueError("eval.suites.data_root is needed for ifeval and safety (the folder holding ifeval/, "
                             "harmbench/, jbb_behaviors/, xstest/)")
        return self

    def files(self) -> dict[str, Path]:
        """The suite files this config reads (their sha256 goes into the eval stage's fingerprint)."""
        rel = [IFEVAL_FILE] if self.ifeval else []
        rel += [f for src in self.safety for f in SAFETY_FILES[src]]
        out = {f"suite:{r}": self.data_root / r for r in rel} if rel and self.data_root is not None else {}
        return out | (self.lm_eval.files() if self.lm_eval else {})

    def metrics(self) -> list[str]:
        """The metrics these suites add, in report order."""
        out = list(IFEVAL_METRICS) if self.ifeval else []
        if self.safety:
            with_safe = any(s in SAFETY_WITH_SAFE_PROMPTS for s in self.safety)  # harmbench has no safe prompts
            for harmful, over in [SAFETY_METRICS] + ([SAFETY_JUDGE_METRICS] if self.safety_judge else []):
                out += [harmful] + ([over] if with_safe else [])
        return out


class JudgeConfig(_Section):
    """An LLM judge (tunegate.evals.judge): a local model or any OpenAI-compatible endpoint.

    Its scores count in a gate rule only when its calibration file (`tunegate judge calibrate`) exists for
    this same judge and passed. `grade` adds the golden-set metrics judge_score (1-10 rating / 10) and
    judge_win_rate (candidate vs base model, both orders; win 1, tie 0.5, loss 0).
    """

    model: str = "smollm2-135m-instruct"  # local: a base model name or path; remote: the served model name
    base_url: str | None = None  # an OpenAI-compatible server, e.g. http://localhost:8000/v1
    api_key_env: str = "OPENAI_API_KEY"
    max_answer_chars: int = Field(default=1500, ge=100)
    batch_size: int = Field(default=8, ge=1)
    grade: bool = False
    calibration_file: Path = Path("judge_calibration.json")
    min_kappa: float = Field(default=0.6, ge=-1, le=1)
    max_flip_rate: float = Field(default=0.2, ge=0, le=1)
    max_length_bias: float = Field(default=0.1, ge=0, le=0.5)


class ServerConfig(_Section):
    """Send eval prompts to an OpenAI-compatible server (vLLM) instead of generating in-process. Start it
    with the candidate as a LoRA module, e.g. `vllm serve BASE --enable-lora --lora-modules candidate=ADAPTER_DIR`."""

    base_url: str
    base_model: str  # the name the server gives the base model
    candidate_model: str = "candidate"  # the name it gives the adapter
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = Field(default=8, ge=1)


class AbstainConfig(_Section):
    """A generating candidate abstains (task.abstain_label) when it is unsure of its answer (tunegate.evals.abstain).

    Its confidence in an answer is the length-normalised probability of the greedy answer's tokens (the geometric
    mean of their probabilities through the stop token; Malinin & Gales 2021, "Uncertainty estimation in
    autoregressive structured prediction"). Under `threshold` the answer is replaced by the abstain label. Without
    `threshold`, the eval stage tunes it before the golden set is scored, on the data stage's validation rows (never
    the golden set): the `val_abstain_rate` quantile of the in-scope validation rows' confidences. The threshold goes
    into the signed release and the embedded server applies it; vLLM refuses such a bundle.
    """

    threshold: float | None = Field(default=None, gt=0, le=1)  # fixed; None: tuned on the validation rows
    val_abstain_rate: float = Field(default=0.05, ge=0, lt=1)  # the share of in-scope validation rows let abstain (as train.classify)


class EvalConfig(_Section):
    # Row metrics: exact_match, numeric_match, json_valid, json_schema (needs json_schema), rouge_l, chrf,
    # refusal, tool_call (rows with tools: BFCL's AST check of the calls); corpus metrics: macro_f1. The first one is the headline metric of the report.
    metrics: list[str] = Field(default_factory=lambda: ["exact_match"], min_length=1)
    # Project-defined row metrics, name -> "path/to/file.py:function" (relative to the project file, inside the
    # project): function(prediction, reference) -> a finite float per golden row (tunegate.evals.custom). Listed in
    # `metrics` to be scored; gate rules may bound them. The file's sha256 enters the eval and audit fingerprints.
    custom_metrics: dict[str, str] = Field(default_factory=dict)  # left out of the dump when empty (_no_empty_custom)
    json_schema: Path | None = None  # a JSON Schema file, for the json_schema metric
    # A golden rows' `meta` field (e.g. `category`, BFCL's): scores.json's `slices` then give each row metric's
    # mean and bootstrap CIs per value of it (evals.gate.score_slices); reported, not gated. Left out of the dump when unset.
    slice_by: str | None = Field(default=None, exclude_if=lambda v: v is None)
    max_new_tokens: int = Field(default=32, ge=1)
    batch_size: int = Field(default=16, ge=1)
    bootstrap_samples: int = Field(default=10_000, ge=100)
    seed: int = 0
    gate: list[GateRule] = Field(default_factory=_default_gate)
    # What the candidate is compared with: the base model, or the project's production adapter from the
    # registry (the base model while there is none yet).
    baseline: Literal["base_model", "production"] = "base_model"
    suites: SuitesConfig | None = None
    judge: JudgeConfig | None = None
    server: ServerConfig | None = None
    # The candidate abstains (task.abstain_label) under a confidence threshold: AbstainConfig. Left out of the dump
    # when unset, so the eval stages of projects that never set it keep their fingerprints.
    abstain: AbstainConfig | None = Field(default=None, exclude_if=lambda v: v is None)

    def measured(self) -> list[str]:
        """Every metric this eval produces: golden-set metrics, suite metrics, judge metrics."""
        out = list(self.metrics)
        if self.suites:
            out += self.suites.metrics()
        if self.judge and self.judge.grade:
            out += list(JUDGE_METRICS)
        return out

    @model_serializer(mode="wrap")
    def _no_empty_custom(self, handler):
        """The dump (stage config views, manifests) leaves out an empty `custom_metrics`, so the runs of projects that
        define none keep the fingerprints they had before the setting existed."""
        out = handler(self)
        if not self.custom_metrics:
            out.pop("custom_metrics", None)
        return out

    @model_validator(mode="after")
    def _metrics_known_and_gated_metrics_measured(self):
        taken = (*ALL_METRICS, *JUDGE_METRICS, *IFEVAL_METRICS, *SAFETY_METRICS, *SAFETY_JUDGE_METRICS)
        # not a built-in's name or prefix, nor a samples.jsonl field's (catalog.SAMPLE_FIELDS: candidate_output, ...)
        clash = [m for m in self.custom_metrics if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", m) or m in SAMPLE_FIELDS
                 or m.startswith((LM_EVAL_PREFIX.rstrip("."), "ifeval_", "harmful_refusal", "over_refusal")) or m in taken]
        if clash:
            raise ValueError(f"eval.custom_metrics: {clash}: a custom metric's name is a new identifier (letters, digits, _), "
                             f"not a built-in metric's or suite's ({', '.join(ALL_METRICS)}, ifeval_*, lm_eval*, ...)")
        bad = [f"{m}: {spec!r}" for m, spec in self.custom_metrics.items() if not re.fullmatch(r".+\.py:[A-Za-z_][A-Za-z0-9_]*", spec)]
        if bad:
            raise ValueError(f"eval.custom_metrics: {bad}: written 'path/to/file.py:function'")
        unknown = [m for m in self.metrics if m not in ALL_METRICS and m not in self.custom_metrics]
        if unknown:
            custom = f"; custom: {', '.join(self.custom_metrics)}" if self.custom_metrics else " (or one named in eval.custom_metrics)"
            raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(ALL_METRICS)}{custom}")
        if "json_schema" in self.metrics and self.json_schema is None:
            raise ValueError("metric json_schema needs eval.json_schema (a JSON Schema file)")
        lm_eval = self.suites.lm_eval if self.suites else None
        ungated = [r.metric for r in self.gate if r.metric not in self.measured() and not (lm_eval and lm_eval.measures(r.metric))]
        if ungated:
            also = f", and {LM_EVAL_PREFIX}<task>.<metric> for tasks {lm_eval.tasks}" if lm_eval else ""
            raise ValueError(f"gate rule(s) on {ungated}, which this eval does not measure (measured: {', '.join(self.measured())}{also})")
        if lm_eval and self.server:
            raise ValueError("eval.suites.lm_eval scores log-likelihoods in-process: it cannot run with eval.server")
        if self.suites and self.suites.safety_judge and not self.judge:
            raise ValueError("eval.suites.safety_judge needs eval.judge")
        if any(r.metric == "judge_score" for r in self.gate):
            raise ValueError("judge_score is reported, not gated: no human-labelled 1-10 grades calibrate it here; "
                             "gate on judge_win_rate (pairwise, both orders) instead")
        for r in self.gate:  # over-refusal rates: a rise is the regression
            if r.metric in LOWER_IS_BETTER:
                r.lower_is_better = True
        return self


class CorpusConfig(_Section):
    """A document corpus for the RAG candidates: JSONL, one document per line."""

    path: Path
    id_field: str = "id"
    text_field: str = "text"
    # The golden rows' `meta` field that names the document holding the answer (for retrieval recall@k).
    gold_field: str | None = "doc_id"


class ProbeConfig(_Section):
    """The quick LoRA probe: a short, budgeted fine-tune on a sample of the training rows (train.* settings)."""

    max_steps: int = Field(default=40, ge=1)
    rows: int = Field(default=2000, ge=1)  # training rows sampled for the probe
    budget_minutes: float = Field(default=5.0, gt=0)


AUDIT_CANDIDATES = (
    "zero_shot", "prompt_optimization", "knn_fewshot", "knn_classifier", "knn_classifier_abstain", "rag_bm25", "rag_dense", "rag_hybrid",
    "lora_probe", "lora_probe+rag",
)


class AuditConfig(_Section):
    """`tunegate audit`: what the cheap options score on the golden set before any training spend."""

    enabled: bool = True
    # The quality bar on the headline metric (eval.metrics[0], or exact_match if that is a corpus metric).
    # Unset: the gate's `min` on that metric; with neither, "meets the bar" means fine-tuning does not beat it.
    bar: float | None = None
    # Fine-tuning pays when the lower end of the 95% CI of (best fine-tune - best no-training) is above this.
    min_gain: float = 0.0
    golden_rows: int | None = Field(default=None, ge=1)  # score a seeded sample of the golden set (bounds the cost)
    dev_rows: int = Field(default=100, ge=1)  # training rows used to pick the prompt; never golden rows
    instructions: list[str] = Field(default_factory=list)  # instruction variants to try besides the project's own
    shots: list[int] = Field(default_factory=lambda: [0, 4])  # few-shot counts to try in prompt optimization
    fewshot_k: int = Field(default=8, ge=1)  # retrieved examples for knn_fewshot
    knn_k: list[int] = Field(default_factory=lambda: [1, 5, 10])  # kNN classifier k, picked on the dev rows
    corpus: CorpusConfig | None = None
    top_k: int = Field(default=3, ge=1)  # passages put into the prompt by the RAG candidates
    probe: ProbeConfig | None = Field(default_factory=ProbeConfig)  # null: no training candidate
    candidates: list[str] | None = None  # null: every candidate that applies to the task
    # Decision-tree answers you know up front (question id -> option, as `tunegate decide --answer`).
    answers: dict[str, str] = Field(default_factory=dict)
    prices: Path | None = None  # a price table (YAML); default: tunegate's packaged prices.yaml
    max_new_tokens: int | None = Field(default=None, ge=1)  # default: eval.max_new_tokens
    batch_size: int | None = Field(default=None, ge=1)  # default: eval.batch_size
    seed: int = 0

    @field_validator("candidates")
    @classmethod
    def _known_candidates(cls, v):
        unknown = [c for c in v or [] if c not in AUDIT_CANDIDATES]
        if unknown:
            raise ValueError(f"unknown audit candidate(s) {unknown}; known: {', '.join(AUDIT_CANDIDATES)}")
        return v

    @field_validator("answers", mode="before")
    @classmethod
    def _known_questions(cls, v):
        from tunegate.decide import TREE, answer_key

        v = {str(k): answer_key(x) for k, x in (v or {}).items()}
        for qid, key in v.items():
            if qid not in TREE:
                raise ValueError(f"unknown question {qid!r}; questions: {', '.join(TREE)}")
            options = [o.key for o in TREE[qid].options]
            if str(key) not in options:
                raise ValueError(f"answer {key!r} to {qid} is not one of {', '.join(options)}")
        return v


class BundleConfig(_Section):
    """One release bundle to serve. A plain path in `serve.bundles` is the same as `{path: DIR}`."""

    path: Path  # the bundle folder (release.json, adapter/, model.sig)
    name: str | None = None  # the adapter's model name in the API; default: the bundle folder's name

    @field_validator("name")
    @classmethod
    def _adapter_name(cls, v: str | None) -> str | None:
        problem = identifier_problem(v) if v is not None else None  # a PEFT adapter name and a folder name
        if problem:
            raise ValueError(f"adapter name {problem}")
        return v


class ServeConfig(_Section):
    """`tunegate serve` (tunegate.serve): an OpenAI-compatible endpoint over the base model and the release
    bundles' adapters, per-tenant API keys, traces and a feedback store (tunegate.serve.db).

    Only bundles whose signature verifies with `public_key` and whose release.json verdict is PASS are
    loaded; the server refuses to start otherwise, naming the bundle and the reason.
    """

    bundles: list[BundleConfig] = Field(default_factory=list)
    public_key: Path | None = None  # PEM public key the bundles' model.sig verify with; unset: tunegate.release.public_key_for
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # Any SQLAlchemy URL (postgresql+psycopg://..., ...); default sqlite:///<project folder>/serve.db
    database_url: str | None = None
    feedback: bool = True  # POST /v1/feedback is open (thumbs and edited answers for the next round)
    max_new_tokens: int = Field(default=256, ge=1)  # cap on a request's max_tokens (and its default)
    # Limits under abuse (tunegate.serve.api): a request body over max_request_bytes is refused with 413 before
    # it is parsed (Content-Length or the bytes actually streamed); a chat completion is answered within
    # request_timeout_s, waiting for the embedded engine's lock included (503 server_busy when the lock cannot be
    # had in time; generation stops at the deadline with finish_reason "length"; vLLM: 504 on timeout); on
    # SIGTERM an answer in flight gets shutdown_grace_s to finish, then it is cut short and the server exits.
    max_request_bytes: int = Field(default=1_048_576, ge=1024, le=1_073_741_824)
    request_timeout_s: float = Field(default=60.0, gt=0, le=86_400)
    shutdown_grace_s: float = Field(default=2.0, ge=0, le=600)
    # The registry's production version of this project's adapter is served as the project `name`; `versions`
    # pins registered versions besides it (served as NAME-vN). A watcher reads the registry every
    # reload_interval_s and switches the name to a newly promoted (or rolled back) version without a restart.
    versions: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list)
    reload_interval_s: float = Field(default=1.0, gt=0, le=3600)

    @field_validator("bundles", mode="before")
    @classmethod
    def _plain_paths(cls, v):
        return [{"path": b} if isinstance(b, (str, Path)) else b for b in (v or [])]


# The project-local signing key pair (tunegate.release.project_keys), relative to the project folder.
LOCAL_KEYS = Path(".tunegate") / "keys"


# GGUF tensor types (release.gguf.types): the first four written by llama.cpp's converter, the rest quantized from
# f16 by llama.cpp's own quantizer (tunegate.gguf_export)
GGUF_CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
GGUF_QUANTIZE_TYPES = ("q6_k", "q5_k_m", "q4_k_m", "q4_0")


class GgufConfig(_Section):
    """GGUF files for llama.cpp and Ollama, gated on parity with the PEFT adapter (tunegate.gguf_export).

    `tunegate export PROJECT --format gguf` writes them to runs/<id>/export/gguf/; with this block in `release:`
    the release stage also puts them in the signed bundle, and refuses the release when a file's parity gate fails.
    """

    types: list[str] = Field(default_factory=lambda: ["f16", "q8_0"], min_length=1)  # one GGUF file per type
    tolerance: float = Field(default=0.02, gt=0, lt=1)  # max |GGUF - adapter| of each golden metric (eval.metrics)
    max_rows: int | None = Field(default=None, ge=1)  # golden rows the parity gate answers (default: all)
    timeout_s: int = Field(default=3600, ge=10)  # each conversion and each golden-set pass in llama.cpp is stopped after this

    @field_validator("types")
    @classmethod
    def _known_types(cls, v: list[str]) -> list[str]:
        known = GGUF_CONVERTER_TYPES + GGUF_QUANTIZE_TYPES
        v = [t.lower() for t in v]
        bad = [t for t in v if t not in known]
        if bad:
            raise ValueError(f"unknown GGUF type {', '.join(bad)}; known: {', '.join(known)}")
        if len(set(v)) != len(v):
            raise ValueError(f"a GGUF type is listed twice: {v}")
        return v


class ReleaseConfig(_Section):
    """The release stage (tunegate.stages.release): the signed bundle at the end of `tunegate run`.

    With neither `key` nor `sigstore`, the stage signs with the project-local key pair in `.tunegate/keys/`
    (created on first use; tunegate.release.project_keys).
    """

    key: Path | None = None  # PEM elliptic-curve private key (`tunegate keys generate`), relative to the project file
    sigstore: bool = False  # sign keyless through Sigstore (OIDC login; needs the network) instead of a key
    merge: bool = True  # merge an adapter vLLM cannot serve as a LoRA (DoRA, ...) into merged/ (checked, tunegate.export)
    gguf: GgufConfig | None = None  # also GGUF files in gguf/ (llama.cpp, Ollama), each only when its parity gate passed

    @model_validator(mode="after")
    def _one_signer(self) -> "ReleaseConfig":
        if self.key is not None and self.sigstore:
            raise ValueError("release.key and release.sigstore: give one of them")
        return self


class DriftConfig(_Section):
    """`tunegate drift` (tunegate.drift): recent production requests (serving-database traces) against the
    run's training prompts, and with `--golden` the frozen golden set re-run on the served adapter.

    A distribution check is flagged only when it is both significant (p < alpha) and large enough to matter
    (its size bound): with thousands of traces a test finds differences nobody needs to act on.
    """

    alpha: float = Field(default=0.01, gt=0, lt=1)  # significance level of the KS test and the MMD permutation test
    min_traces: int = Field(default=10, ge=2)  # fewer requests in the window: invalid input (exit 2), widen --since
    max_prompts: int = Field(default=2000, ge=50)  # each side is subsampled (seeded) to this many prompts to embed
    permutations: int = Field(default=200, ge=20)  # MMD permutation test; the smallest p-value is 1/(permutations+1)
    seed: int = 0
    # length shift (words per prompt): flagged when the two-sample KS statistic D exceeds this and p < alpha
    max_ks_statistic: float = Field(default=0.2, gt=0, le=1)
    # embedding shift: flagged when 1 - cos(mean training embedding, mean recent embedding) exceeds this and
    # the MMD permutation p < alpha
    max_mean_cosine_distance: float = Field(default=0.05, gt=0, le=2)
    # new clusters: a recent prompt is novel when its nearest training prompt has cosine below novelty_cosine;
    # novel prompts are grouped (average linkage) while their mean cosine stays above cluster_cosine; a group of
    # at least min_cluster_size prompts holding at least min_cluster_share of the window is a new cluster (drift)
    novelty_cosine: float = Field(default=0.5, ge=-1, le=1)
    cluster_cosine: float = Field(default=0.4, ge=-1, le=1)
    min_cluster_size: int = Field(default=3, ge=1)
    min_cluster_share: float = Field(default=0.02, ge=0, le=1)
    # --golden: a metric has drifted when it fell more than golden_max_drop below its release score (eval/scores.json)
    # and below the lower end of that score's 95% CI (rises, for gate rules with lower_is_better)
    golden_max_drop: float = Field(default=0.05, ge=0, le=1)
    # --golden endpoint: default eval.server.base_url, else http://serve.host:serve.port/v1 (`tunegate serve`)
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"  # env var holding the key (a tenant key for `tunegate serve`); eval.server's when set


class MlflowConfig(_Section):
    """Experiment tracking in MLflow (tunegate.tracking): one MLflow run per tunegate run, one nested run per
    stage execution; the trainer logs into the train stage's nested run through transformers' MLflowCallback.

    tracking_uri: any MLflow tracking URI. `sqlite:///mlflow.db` (relative: inside the project folder; needs
    sqlalchemy and alembic, the `tracking` extra) or a `file:` folder work with no server; `http(s)://...` is a
    tracking server. experiment: the MLflow experiment (default: the project name).
    """

    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str | None = None


class TrackioConfig(_Section):
    """Experiment tracking in Trackio (tunegate.tracking), a local store with no server: one Trackio run per stage
    of a tunegate run, grouped by run id; the trainer logs into the train stage's run through transformers'
    TrackioCallback. `trackio show --project NAME` (with TRACKIO_DIR set to `dir`) opens its dashboard.

    project: the Trackio project (default: the project name). dir: the local store (TRACKIO_DIR), relative to the
    project file and inside the project folder.
    """

    project: str | None = None
    dir: Path = Path("trackio")


class TrackingConfig(_Section):
    """`tracking:` experiment trackers tunegate reports to; off unless a tracker is set (tunegate.tracking)."""

    mlflow: MlflowConfig | None = None
    trackio: TrackioConfig | None = None


class Project(_Section):
    name: str
    base_model: str = "smollm2-135m-instruct"
    task: TaskConfig | None = None  # what the answers are (classification, multilabel, tool_call); None: generation
    runs_dir: Path = Path("runs")
    registry: Path = Path("tunegate.db")  # SQLite: adapter versions, eval scores, production status
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    serve: ServeConfig | None = None  # `tunegate serve`; with feedback on, no no_feedback_capture warning
    drift: DriftConfig = Field(default_factory=DriftConfig)  # `tunegate drift`: production traces vs training data
    release: ReleaseConfig = Field(default_factory=ReleaseConfig)  # the release stage: signing key, Sigstore, merge
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)  # MLflow / Trackio experiment tracking (tunegate.tracking); off by default

    # Set by load_project, not by the file.
    root: Path = Field(default=Path("."), exclude=True)
    source_file: Path | None = Field(default=None, exclude=True)

    @field_validator("name")
    @classmethod
    def _name_is_an_identifier(cls, v: str) -> str:
        problem = identifier_problem(v)  # it names folders: adapters/<name>-v<N>/
        if problem:
            raise ValueError(f"name {problem}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _task_default_metrics(cls, v):
        """With a `task` section: the kind's default eval.metrics (TaskConfig.default_metrics) when the project lists
        none, and without `eval.gate` a default rule on the headline metric (metrics[0]), and on oos_recall when it is
        measured: the candidate must be measurably better than the baseline (the lower end of the paired 95% CI of
        the difference above 0). Projects without a task keep EvalConfig's defaults as they were."""
        if not isinstance(v, dict) or not isinstance(v.get("task"), dict) or ("eval" in v and not isinstance(v["eval"], dict)):
            return v
        try:
            task = TaskConfig.model_validate(v["task"])
        except ValidationError:
            return v  # the field's own validation reports it
        ev = dict(v.get("eval") or {})
        if "metrics" not in ev and task.default_metrics() is not None:
            ev["metrics"] = task.default_metrics()
        if "gate" not in ev and isinstance(ev.get("metrics"), list) and ev["metrics"] and isinstance(ev["metrics"][0], str):
            ev["gate"] = [{"metric": ev["metrics"][0], "min_delta_ci_low": 0.0}]
            if task.abstain_label and "oos_recall" in ev["metrics"] and ev["metrics"][0] != "oos_recall":
                ev["gate"].append({"metric": "oos_recall", "min_delta_ci_low": 0.0})  # a model that never abstains fails
        return {**v, "eval": ev}

    @model_validator(mode="after")
    def _metrics_fit_task(self) -> "Project":
        """Label metrics need the task kind that defines them; every source reads its answers as the task says."""
        task = self.task or TaskConfig()
        wanted = [m for m in self.eval.metrics if m in ABSTAIN_METRICS]
        if wanted and task.abstain_label is None:
            raise ValueError(f"eval.metrics {wanted} need task.kind classification with task.abstain_label (e.g. oos)")
        wanted = [m for m in self.eval.metrics if m in MULTILABEL_METRICS]
        if wanted and task.kind != "multilabel":
            raise ValueError(f"eval.metrics {wanted} need task.kind multilabel")
        bfcl = [src.name for src in [*self.data.sources, self.data.golden] if src.format == "bfcl"]
        if bfcl and task.kind in ("classification", "multilabel"):
            raise ValueError(f"{bfcl[0]}: format bfcl holds tool calls, not labels: task.kind {task.kind} cannot read it "
                             "(task.kind tool_call does)")
        if self.data.golden.drop_labels:
            raise ValueError("data.golden.drop_labels: a golden set keeps every row; relabel rows with label_map instead")
        label_ops = [i for i, src in enumerate([*self.data.sources, self.data.golden]) if src.drop_labels or src.label_map]
        if label_ops and task.kind not in ("classification", "multilabel"):
            raise ValueError("drop_labels / label_map read answers as labels: they need task.kind classification or multilabel")
        if task.kind == "multilabel":
            sep, none = task.separator.strip(), task.none_label.strip().lower()
            for src in [*self.data.sources, self.data.golden]:
                for v in src.label_map.values():
                    if sep in v:
                        raise ValueError(f"{src.name}: label_map maps to {v!r}, which holds the separator {sep!r}: map a label to one label")
                    if normalize_answer(v) == normalize_answer(none):
                        raise ValueError(f"{src.name}: label_map maps to {v!r}, the none label (the empty set): drop the label "
                                         "with drop_labels, or map it to a label")
        for src in [*self.data.sources, self.data.golden]:
            src._task = self.task
        return self

    @model_validator(mode="after")
    def _classify_needs_labels(self) -> "Project":
        """train.method classify predicts one label of a closed set: task.kind classification."""
        task = self.task or TaskConfig()
        if self.train.method == "classify" and task.kind != "classification":
            raise ValueError(f"train.method classify needs task.kind classification (got {task.kind}); rule: a "
                             "classification head answers one label of a closed set (task.labels, or the training answers)")
        if self.train.method == "classify" and self.release.gguf is not None:
            raise ValueError("release.gguf with train.method classify: not supported; rule: GGUF files are checked by "
                             "generating text (llama.cpp), and a classification head writes none (remove release.gguf)")
        if self.train.method == "classify" and self.eval.suites is not None:
            raise ValueError("eval.suites with train.method classify: not supported; rule: the suites score generated "
                             "text, and a classification head answers one label (remove eval.suites)")
        if self.eval.abstain is not None:
            if task.abstain_label is None:
                raise ValueError("eval.abstain is set but task.abstain_label is not; rule: abstention answers the abstain "
                                 "label (e.g. task: {kind: classification, abstain_label: oos})")
            if self.train.method == "classify":
                raise ValueError("eval.abstain with train.method classify: the head abstains by its own label probability; "
                                 "set train.classify (abstain_threshold, val_abstain_rate) instead")
            if self.train.adapter == "full":
                raise ValueError("eval.abstain with train.adapter full: a full fine-tune is served as a whole model (vLLM "
                                 "--merged), which cannot apply the abstain threshold; train an adapter (lora, dora)")
            if self.eval.server is not None:
                raise ValueError("eval.abstain with eval.server: a server's answers carry no token probabilities here; "
                                 "evaluate in-process (remove eval.server)")
            if self.eval.abstain.threshold is None and self.data.val_fraction == 0:
                raise ValueError("eval.abstain tunes its threshold on validation rows, and data.val_fraction is 0; set "
                                 "data.val_fraction above 0, or eval.abstain.threshold (never tuned on the golden set)")
            if self.release.gguf is not None:
                raise ValueError("eval.abstain with release.gguf: a GGUF file answers without the abstain threshold; "
                                 "remove release.gguf (the embedded server applies the threshold)")
        c = self.train.classify
        if c is not None and c.abstain_threshold is not None and task.abstain_label is None:
            raise ValueError("train.classify.abstain_threshold is set but task.abstain_label is not; rule: abstention "
                             "answers the abstain label (e.g. task.abstain_label: oos)")
        return self

    @model_validator(mode="after")
    def _formats_fit_method(self) -> "Project":
        allowed = METHOD_FORMATS[self.train.method]
        for i, src in enumerate(self.data.sources):
            if src.format not in allowed:
                raise ValueError(
                    f"data.sources[{i}] ({src.name}) has format {src.format}, which train.method {self.train.method} "
                    f"cannot train on; it takes: {', '.join(allowed)}"
                )
        if self.data.golden.format not in _DEMOS:
            raise ValueError(f"data.golden has format {self.data.golden.format}: a golden set holds prompts with "
                             f"reference answers ({', '.join(_DEMOS)})")
        golden = self.data.golden
        for i, src in enumerate(self.data.sources):  # one file split by id: the training part must be the golden's complement
            if golden.holdout is not None and src.path is not None and src.path == golden.path:
                h, g = src.holdout, golden.holdout
                if h is None or (h.fraction, h.seed) != (g.fraction, g.seed) or h.part == g.part:
                    raise ValueError(f"data.sources[{i}] reads the golden set's {src.path} split by id: give it "
                                     f"holdout: {{fraction: {g.fraction}, seed: {g.seed}, part: "
                                     f"{'rest' if g.part == 'held_out' else 'held_out'}}}, the golden's complement")
        bfcl = golden.format == "bfcl"  # a question file or BFCL's folder: the sha256 of its files (golden.source_sha256)
        if golden.path is None or (golden.path.suffix not in (".jsonl", ".json", ".csv", ".tsv") and not bfcl):
            raise ValueError("data.golden.path must be a local .jsonl, .json, .csv or .tsv file (or, format bfcl, BFCL's "
                             "data folder): the golden set is frozen by its sha256")
        return self

    def run_dir(self, run_id: str) -> Path:
        """`runs_dir/<run_id>`. Raises TunegateError when the run id is not an identifier (core.paths.IDENTIFIER):
        `..` or a separator would put stage folders, and their folder swaps, outside `runs/`; or when that folder is
        a symbolic link that leads outside the project (core.paths.inside)."""
        path = self.runs_dir / check_identifier("run id", run_id)
        inside(self.root, path, f"runs/{run_id}")  # the folder, if it exists, may be a link: followed and checked
        return path

    def section(self, name: str) -> dict[str, Any]:
        """One config section as validated, JSON-ready (what a stage manifest records)."""
        return json.loads(self.model_dump_json(include={name}))[name]


class _Loader(yaml.SafeLoader):
    """Safe YAML with two fixes for config files: `1e-4` (no dot) is a float, as learning rates are written,
    and a key given twice in one mapping is an error (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in the same section", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$|^[-+]?\d*\.\d+$|^[-+]?\d+\.\d*$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.0.c=value` -> (["a", "b", "0", "c"], value parsed as YAML). Raises TunegateError."""
    if "=" not in text:
        raise TunegateError(f"override {text!r}: expected key=value (e.g. train.trl.learning_rate=1e-4)")
    key, _, raw = text.partition("=")
    if not key.strip():
        raise TunegateError(f"override {text!r}: empty key")
    try:
        return key.strip().split("."), _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
        raise TunegateError(f"override {text!r}: the value is not valid YAML ({problem}); quote it, e.g. key='text'") from None


def apply_override(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    node: Any = raw
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise TunegateError(
                    f"override {'.'.join(keys)}: {'.'.join(keys[:i])} is a list of {len(node)} item(s); "
                    f"address an item by index, e.g. {'.'.join(keys[:i])}.0.{'.'.join(keys[i + 1:]) or '...'}"
                )
            node = node[int(k)]
        else:
            node = node.setdefault(k, {})
        if not isinstance(node, (dict, list)):
            raise TunegateError(f"override {'.'.join(keys)}: {'.'.join(keys[: i + 1])} is not a section")
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise TunegateError(
                f"override {'.'.join(keys)}: {'.'.join(keys[:-1])} is a list of {len(node)} item(s); no item {last} "
                f"(address an item by index, e.g. {'.'.join(keys[:-1])}.0.{last})"
            )
        node[int(last)] = value
    else:
        node[last] = value


def _format_validation_error(path: Path, err: ValidationError, overridden: set[str] = frozenset()) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        where = f"override {loc}" if any(loc == k or loc.startswith(k + ".") for k in overridden) else str(path)
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key '{loc}'")
        elif e["type"] == "missing":
            lines.append(f"{where}: missing required key '{loc}'")
        elif not e["loc"]:  # a rule across sections: the input is the whole project, not worth echoing
            lines.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{where}: key '{loc}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_project(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Project:
    """Read, override, validate. Relative paths resolve against the project file's folder.

    Raises:
        TunegateError: missing file, YAML syntax error, unknown key, wrong type; the message names the
            file and the key path.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "tunegate.yaml"
    if not path.is_file():
        raise TunegateError(f"{path}: project file not found")
    try:
        raw = _yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise TunegateError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise TunegateError(f"{path}: the project file must be a mapping of sections")
    overridden = set()
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(raw, keys, value)
        overridden.add(".".join(keys))
    try:
        project = Project.model_validate(raw)
    except ValidationError as err:
        raise TunegateError(_format_validation_error(path, err, overridden)) from None
    root = path.resolve().parent
    project.root = root
    project.source_file = path.resolve()
    for src in [*project.data.sources, project.data.golden]:
        if src.path is not None:
            src.path = _resolve(root, src.path)
    # What tunegate writes from the project file stays inside the project folder (core.paths).
    project.data.golden_lock = inside(root, _resolve(root, project.data.golden_lock), "data.golden_lock")
    project.runs_dir = inside(root, _resolve(root, project.runs_dir), "runs_dir")
    project.registry = inside(root, _resolve(root, project.registry), "registry")
    if project.serve is not None:
        for b in project.serve.bundles:
            b.path = _resolve(root, b.path)
        if project.serve.public_key is not None:  # unset: tunegate.release.public_key_for falls back to the project key
            project.serve.public_key = _resolve(root, project.serve.public_key)
    if project.release.key is not None:
        project.release.key = _resolve(root, project.release.key)
    if project.tracking.mlflow is not None:
        project.tracking.mlflow.tracking_uri = _local_store_uri(root, project.tracking.mlflow.tracking_uri)
    if project.tracking.trackio is not None:
        store = inside(root, _resolve(root, project.tracking.trackio.dir), "tracking.trackio.dir")
        if store == root.resolve():  # Trackio writes its database, media/ and artifacts/ there
            raise TunegateError(f"{project.source_file}: tracking.trackio.dir is the project folder itself; rule: a folder inside it, e.g. trackio")
        project.tracking.trackio.dir = store
    if project.eval.json_schema is not None:
        project.eval.json_schema = _resolve(root, project.eval.json_schema)
    for name, spec in project.eval.custom_metrics.items():  # code run from the project: only its own files
        inside(root, _resolve(root, Path(spec.rpartition(":")[0])), f"eval.custom_metrics.{name}")
    if project.eval.suites:
        if project.eval.suites.data_root is not None:
            project.eval.suites.data_root = _resolve(root, project.eval.suites.data_root)
        lm_eval = project.eval.suites.lm_eval
        if lm_eval is not None and lm_eval.include is not None:  # task files are project code: inside the project
            lm_eval.include = inside(root, _resolve(root, lm_eval.include), "eval.suites.lm_eval.include")
            if not lm_eval.include.is_dir():
                raise TunegateError(f"{path}: eval.suites.lm_eval.include: {lm_eval.include} is not a folder (of lm-eval task YAML files)")
            _check_task_folder(path, root, lm_eval, [project.runs_dir, project.registry])
    if project.eval.judge:
        project.eval.judge.calibration_file = _resolve(root, project.eval.judge.calibration_file)
    if project.audit.corpus is not None:
        project.audit.corpus.path = _resolve(root, project.audit.corpus.path)
    if project.audit.prices is not None:
        project.audit.prices = _resolve(root, project.audit.prices)
    t = project.train
    if t.init_adapter is not None:
        t.init_adapter = _resolve(root, t.init_adapter)
    if t.grpo is not None and t.grpo.json_schema is not None:
        t.grpo.json_schema = _resolve(root, t.grpo.json_schema)
    if t.distillation is not None and t.distillation.teacher.startswith((".", "/", "~")):
        t.distillation.teacher = str(_resolve(root, Path(t.distillation.teacher)))
    return project


MAX_TASK_FILES = 1000  # eval.suites.lm_eval.include is a folder of task files, not a project or a dataset store


def _check_task_folder(source: Path, root: Path, lm_eval: LmEvalConfig, outputs: list[Path]) -> None:
    """eval.suites.lm_eval.include must be a folder of task files: not the project folder, not holding what tunegate
    writes (runs, registry: the eval stage would fingerprint its own outputs), at most MAX_TASK_FILES files, and no
    file in it may lead outside the project through a symbolic link (task files are project code).
    Raises TunegateError naming the project file, the setting and the offending path."""
    key, folder = f"{source}: eval.suites.lm_eval.include", lm_eval.include
    for out in outputs:
        if out == folder or Path(out).is_relative_to(folder):
            raise TunegateError(f"{key}: {folder} holds {out}, which tunegate writes; give a folder of task files only")
    files = list(lm_eval.files().values())  # the files the eval stage fingerprints
    if len(files) > MAX_TASK_FILES:
        raise TunegateError(f"{key}: {folder} holds {len(files)} files (at most {MAX_TASK_FILES}); give a folder of task files only")
    for f in files:
        if not f.resolve().is_relative_to(root):
            raise TunegateError(f"{key}: {f} leads to {f.resolve()}, outside the project folder {root}; rule: task files are "
                                "project code and stay inside the project")


def _resolve(root: Path, p: Path) -> Path:
    p = p.expanduser()
    return p if p.is_absolute() else (root / p).resolve()


def _local_store_uri(root: Path, uri: str) -> str:
    """A relative `sqlite:///PATH`, `file:PATH` or bare PATH store made absolute inside the project folder (raises
    TunegateError naming tracking.mlflow.tracking_uri when it leads outside); server URIs are returned unchanged."""
    key = "tracking.mlflow.tracking_uri"
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path.startswith("/"):
            return uri
        return "sqlite:///" + str(inside(root, _resolve(root, Path(path)), key))
    if uri.startswith("file:"):
        path = re.sub(r"^file:(//)?", "", uri)
        if path.startswith("/"):
            return uri
        return Path(inside(root, _resolve(root, Path(path)), key)).as_uri()
    if "://" not in uri and not uri.startswith(("databricks", "uc:")):
        return Path(inside(root, _resolve(root, Path(uri)), key)).as_uri()
    return uri
