"""Preflight: what `tunegate train --dry-run` checks and estimates before any training spend.

Three parts, all pure functions (torch, transformers and PEFT are imported inside the functions that need
them; `import tunegate.preflight` imports none of them):

* `anti_pattern_table(project, n_train_rows, base_is_instruct)`: the one table of configuration anti-patterns
  (small data with high rank and many epochs, a base-model learning rate on an instruct model, no golden set,
  no eval gate, no feedback capture, ...), each rule checked against the project with its level, whether it
  was found, the project's values and a fix. The preflight reports the found rules (`anti_patterns`), the
  audit page shows the whole table, the release documents list what the training's preflight found.
* `resolve_target_modules(model, target_modules)`: LoRA target modules resolved against the real module
  names of the loaded model, with PEFT's matching rules.
* `train_flops`, `measure_matmul_peak`, `estimate`: training FLOPs, this machine's matmul peak, and an
  estimate of time, peak memory and cloud cost at 7B scale from the price table (`tunegate.prices`).

`render(findings, estimate)` turns them into the plain-text report, errors first.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from tunegate import TunegateError
from tunegate.models import cuda_available

# ---------------------------------------------------------------------------------------------------------
# Thresholds of the anti-pattern table.

SMALL_DATA_ROWS = 1000  # under this many training rows counts as small data
HIGH_RANK = 64  # LoRA r at or above this counts as high rank
MANY_EPOCHS = 10  # epochs at or above this count as many
FULL_SFT_INSTRUCT_MAX_LR = 1e-4  # full SFT of an instruct model: a lr at or above this is a base-model lr
ADAPTER_INSTRUCT_MAX_LR = 5e-4  # LoRA/DoRA/QLoRA on an instruct model: a lr above this is too high
MIN_GRPO_GENERATIONS = 2  # group-relative advantages need a group
TRL_GRPO_DEFAULT_GENERATIONS = 8  # trl.GRPOConfig.num_generations default
SUITE_METRIC_PREFIXES = ("ifeval_", "harmful_refusal", "over_refusal", "lm_eval.")  # standard suites, not the golden set

# Cost at 7B scale.
SCALE_PARAMS = 7e9  # the model size the cloud-cost column is re-scaled to
ASSUMED_MFU = 0.35  # model FLOPs utilisation assumed on a cloud GPU for LoRA/full fine-tuning of a 7B model
# (PaLM reports 46% MFU for pre-training at scale, Chowdhery et al. 2022; single-GPU fine-tuning with
# small batches, padding and adapter overhead typically lands lower, so 0.35 is a round middle figure).

GIB = 2**30


@dataclass
class Finding:
    """One rule of the anti-pattern table checked against a project, or another preflight finding.

    name: a stable id ("small_data_high_rank"), for tests, suppression and the reports.
    level: "error" (the run would fail or be meaningless: refuse) or "warning" (the run works but is likely
        to disappoint).
    message: when found, what is wrong, with the project's actual values; otherwise the values the rule read.
    fix: what to change.
    found: whether the project has it (the preflight reports found ones only; the audit page shows every rule).
    rule: when the rule flags a project, with its thresholds ("" for findings outside the table).
    """

    name: str
    level: Literal["error", "warning"]
    message: str
    fix: str
    found: bool = True
    rule: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Anti-patterns


def _trl_kwargs(project) -> dict[str, Any]:
    """The TRL config arguments the train stage will use: tunegate's defaults for the method merged with the
    project's `train.trl` (recipes.defaults.trl_kwargs)."""
    from tunegate.recipes.defaults import trl_kwargs

    return trl_kwargs(project, Path("/tmp/tunegate-preflight"), False)


def effective_epochs(kw: dict[str, Any], n_train_rows: int | None) -> tuple[float, str]:
    """Epochs the trainer will run: `max_steps` > 0 overrides `num_train_epochs` (transformers' Trainer).

    With max_steps: epochs = max_steps x per_device_train_batch_size x gradient_accumulation_steps / rows
    (one device). Returns (epochs, where it came from: "num_train_epochs" or "max_steps").
    """
    max_steps = kw.get("max_steps") or -1
    if max_steps > 0 and n_train_rows:
        per_step = kw.get("per_device_train_batch_size", 8) * kw.get("gradient_accumulation_steps", 1)
        return max_steps * per_step / n_train_rows, "max_steps"
    return float(kw.get("num_train_epochs", 1)), "num_train_epochs"


def _golden_problem(path: Path) -> str | None:
    if path.is_dir():  # format bfcl: BFCL's data folder (config allows a folder for no other format)
        from tunegate.data.records import BFCL_QUESTIONS

        return None if any(path.glob(BFCL_QUESTIONS)) else f"the golden set data.golden.path {path} holds no BFCL question files"
    if not path.is_file():
        return f"the golden set data.golden.path {path} does not exist"
    with open(path, encoding="utf-8", errors="replace") as f:
        if not any(line.strip() for line in f):
            return f"the golden set data.golden.path {path} is empty"
    return None


def instruct_tuned(tokenizer) -> bool:
    """Whether the base model is instruction-tuned, as the anti-pattern table reads it: its tokenizer has a chat
    template (instruct releases ship one; base releases do not). tokenizer: a transformers tokenizer."""
    return tokenizer.chat_template is not None


def anti_pattern_table(project, n_train_rows: int, base_is_instruct: bool, answers: dict[str, str] | None = None, *,
                       cuda: bool | None = None) -> list[Finding]:
    """Every rule of the anti-pattern table checked against the project, in table order, found or not.

    The one table of these rules: the preflight reports the found ones (`anti_patterns`), the audit page shows
    them all (audit.json `anti_patterns`), the release documents list what the training's preflight found.

    project: a `tunegate.config.Project`. n_train_rows: rows in the training split. base_is_instruct: the base
    model is instruction-tuned (`instruct_tuned(tokenizer)`). answers: decision-tree answers (question id ->
    option); None: the project's `audit.answers` (the audit passes what it measured as well). cuda: whether a
    CUDA GPU is present; None asks torch.

    Rules (thresholds are the module constants; `message` holds the project's values either way):
      changing_knowledge        warning  the answers depend on information that changes (answer changing_knowledge: yes)
      no_golden_set             error    data.golden.path missing or empty: the eval gate has nothing to score
      no_eval_gate              warning  no gate rule bounds a metric against a bar or the baseline (min,
                                         min_delta_ci_low, max_regression)
      gate_not_on_golden        warning  no gate rule on a golden-set metric (only suite metrics, or no rules)
      small_data_high_rank      warning  an adapter, rows < 1000, LoRA r >= 64 and epochs >= 10 (epochs from
                                         max_steps when it is set)
      instruct_high_lr          warning  method sft on an instruct base: learning_rate >= 1e-4 for a full
                                         fine-tune, > 5e-4 for an adapter
      preference_on_base        warning  method dpo/kto, no train.init_adapter, base model not instruct-tuned
      grpo_too_few_generations  error    method grpo with num_generations < 2 (train.trl, else tunegate's GRPO
                                         default, else TRL's 8)
      qlora_needs_cuda          error    adapter qlora on a machine without a CUDA GPU
      no_feedback_capture       warning  no feedback capture configured: no `serve` section and no `feedback:` data
                                         source, or serve.feedback false
    """
    from tunegate.catalog import JUDGE_METRICS
    from tunegate.recipes.defaults import adapter_kind, lora_kwargs

    train = project.train
    method, adapter = train.method, adapter_kind(project)
    kw = _trl_kwargs(project)
    answers = dict(project.audit.answers) if answers is None else answers
    out: list[Finding] = []

    def add(name: str, level: str, rule: str, found: Any, message: str, fix: str) -> None:
        out.append(Finding(name, level, message, fix, found=bool(found), rule=rule))

    # Facts that change belong in retrieval: fine-tuning freezes them at training time.
    given = answers.get("changing_knowledge", "not answered")
    add("changing_knowledge", "warning",
        "the answers depend on information that changes (policies, prices, catalogues, docs)",
        given == "yes",
        f"changing_knowledge: {given}" + (": facts trained into the weights go stale and cannot be cited" if given == "yes" else ""),
        "retrieve the changing facts at request time (audit.corpus scores the RAG candidates) and fine-tune, if at all, "
        "for form and behaviour only")

    # No frozen golden set: the eval gate would be skipped.
    golden = project.data.golden
    problem = _golden_problem(Path(golden.path))
    add("no_golden_set", "error", "data.golden.path is missing or empty: no golden set of the project's own task",
        problem,
        f"{problem}: the eval gate has nothing to score, so any adapter would be promoted unchecked" if problem else
        f"golden set {Path(golden.path).name}" + (f", a seeded sample of {golden.sample} rows" if golden.sample else ""),
        "put held-out rows (never trained on) in data.golden.path and freeze them: tunegate golden freeze PROJECT")

    # A gate must compare the candidate with a bar or with the baseline.
    bounded = [r.metric for r in project.eval.gate if r.min is not None or r.min_delta_ci_low is not None or r.max_regression is not None]
    add("no_eval_gate", "warning",
        "no gate rule compares the candidate with a bar or with the baseline (min, min_delta_ci_low, max_regression)",
        not bounded, f"bounded metrics: {', '.join(bounded) or 'none'}",
        f"add a gate rule, e.g. {{metric: {project.eval.metrics[0]}, min_delta_ci_low: 0.0}}")

    # The gate must hold a metric on the domain golden set (the business metric), not only standard suites.
    golden_metrics = set(project.eval.metrics) | set(JUDGE_METRICS)
    gated = [r.metric for r in project.eval.gate]
    on_golden = [m for m in gated if m in golden_metrics]
    if gated:
        suites = [m for m in gated if m.startswith(SUITE_METRIC_PREFIXES)]
        what = f"eval.gate only holds suite metrics ({', '.join(dict.fromkeys(suites or gated))})"
    else:
        what = "eval.gate has no rules"
    add("gate_not_on_golden", "warning", "no gate rule on a golden-set metric (only suite metrics, or no rules)",
        not on_golden,
        f"{what} and no rule on a golden-set metric ({', '.join(project.eval.metrics)}): a candidate can pass "
        "by improving a benchmark that is not tied to the business metric" if not on_golden else
        f"gate rules on golden-set metrics: {', '.join(dict.fromkeys(on_golden))}",
        f"add a gate rule on the golden set, e.g. {{metric: {project.eval.metrics[0]}, min_delta_ci_low: 0.0}}")

    # Small data, high rank, many epochs: memorisation of a few hundred rows.
    if adapter == "full":
        found, message = False, "does not apply: adapter full has no LoRA rank"
    else:
        r = lora_kwargs(project).get("r", 8)
        epochs, source = effective_epochs(kw, n_train_rows)
        how = f"{epochs:g} epochs" + (f" (max_steps {kw['max_steps']})" if source == "max_steps" else "")
        found = n_train_rows < SMALL_DATA_ROWS and r >= HIGH_RANK and epochs >= MANY_EPOCHS
        message = (f"{n_train_rows} training rows (< {SMALL_DATA_ROWS}) with LoRA r={r} (>= {HIGH_RANK}) and {how} "
                   f"(>= {MANY_EPOCHS}): the adapter has the capacity and the passes to memorise the training rows" if found else
                   f"{n_train_rows} training rows, LoRA r={r}, {how}")
    add("small_data_high_rank", "warning",
        f"under {SMALL_DATA_ROWS:,} training rows with LoRA rank >= {HIGH_RANK} and >= {MANY_EPOCHS} epochs (memorises the rows)",
        found, message, "set train.lora.r: 16 and train.trl.num_train_epochs: 1-3 (or collect more rows)")

    # SFT on an instruct model with a base-model learning rate.
    lr = float(kw.get("learning_rate", 2e-4))
    src = "train.trl.learning_rate" if "learning_rate" in train.trl else f"tunegate's default learning_rate for {adapter}"
    full = adapter == "full"
    limit_text = f">= {FULL_SFT_INSTRUCT_MAX_LR:g}" if full else f"> {ADAPTER_INSTRUCT_MAX_LR:g}"
    found = method == "sft" and base_is_instruct and (lr >= FULL_SFT_INSTRUCT_MAX_LR if full else lr > ADAPTER_INSTRUCT_MAX_LR)
    if found and full:
        message = (f"full SFT of the instruct model {project.base_model} at {src} {lr:g} ({limit_text}): "
                   "a pre-training-scale rate on every weight erases the instruction tuning (formatting, refusals, chat)")
    elif found:
        message = (f"{adapter} on the instruct model {project.base_model} at {src} {lr:g} ({limit_text}): "
                   "adapter updates this large overwrite the instruction tuning and often diverge")
    else:
        message = f"{adapter} at {src} {lr:g} (flagged {limit_text})"
        message += "" if method == "sft" else f"; does not apply: method {method}"
        message += "" if base_is_instruct else f"; the base model {project.base_model} is not instruction-tuned"
    fix = ("set train.trl.learning_rate to 1e-5 (1e-6..2e-5), or train a LoRA/DoRA adapter instead (adapter: dora)" if full else
           "set train.trl.learning_rate to 2e-4 (1e-4..3e-4 for LoRA/DoRA)")
    add("instruct_high_lr", "warning",
        f"SFT of an instruct base model at a base-model learning rate: >= {FULL_SFT_INSTRUCT_MAX_LR:g} for a full fine-tune, "
        f"> {ADAPTER_INSTRUCT_MAX_LR:g} for an adapter (erases the instruction tuning)",
        found, message, fix)

    # Preference optimisation straight on a base (not instruct-tuned) model.
    found = method in ("dpo", "kto") and train.init_adapter is None and not base_is_instruct
    if found:
        message = (f"method {method} on the base model {project.base_model}, which is not instruction-tuned, with no "
                   "train.init_adapter: DPO on a base model with no SFT first; the reference policy cannot follow "
                   "instructions, so the preference signal has little to sharpen")
    elif method not in ("dpo", "kto"):
        message = f"does not apply: method {method}"
    elif train.init_adapter is not None:
        message = f"starts from train.init_adapter {train.init_adapter}"
    else:
        message = f"the base model {project.base_model} is instruction-tuned"
    add("preference_on_base", "warning",
        "DPO/KTO on a base model that is not instruction-tuned, with no SFT adapter to start from (train.init_adapter)",
        found, message, "run SFT first and set train.init_adapter to its adapter, or start from an instruct model")

    # GRPO needs a group of generations per prompt.
    n_gen = kw.get("num_generations", TRL_GRPO_DEFAULT_GENERATIONS)
    found = method == "grpo" and (not isinstance(n_gen, int) or n_gen < MIN_GRPO_GENERATIONS)
    add("grpo_too_few_generations", "error", f"method grpo with fewer than {MIN_GRPO_GENERATIONS} generations per prompt",
        found,
        f"method grpo with train.trl.num_generations {n_gen!r}: GRPO's advantage is the reward minus its "
        "group's mean over the group's std, so with one generation every advantage is 0 (or NaN) and nothing trains" if found else
        (f"num_generations {n_gen!r}" if method == "grpo" else f"does not apply: method {method}"),
        f"set train.trl.num_generations to {MIN_GRPO_GENERATIONS} or more (TRL's default is "
        f"{TRL_GRPO_DEFAULT_GENERATIONS}; generation_batch_size must be divisible by it)")

    # QLoRA: bitsandbytes' 4-bit kernels need a CUDA GPU.
    found = adapter == "qlora" and not (cuda_available() if cuda is None else cuda)
    add("qlora_needs_cuda", "error", "adapter qlora on a machine without a CUDA GPU", found,
        "adapter qlora on a machine without a CUDA GPU: QLoRA loads the base in 4-bit with bitsandbytes, "
        "whose 4-bit (NF4) matmul kernels run on CUDA GPUs only" if found else
        ("a CUDA GPU is present" if adapter == "qlora" else f"does not apply: adapter {adapter}"),
        "use adapter: dora (or lora) here, or run on a CUDA GPU")

    # No feedback capture: production signals (thumbs, corrections) are never collected for the next round.
    # `tunegate serve` collects them (POST /v1/feedback) when the project has a serve section with feedback on.
    # A `data.sources[].feedback` source reads what `tunegate serve` collects (it takes feedback unless
    # serve.feedback is false), so it counts as capture too.
    serve = project.serve
    feedback_sources = [f"{{feedback: {s.feedback}}}" for s in project.data.sources if s.feedback is not None]
    found = (serve is not None and not serve.feedback) or (serve is None and not feedback_sources)
    add("no_feedback_capture", "warning",
        "no feedback capture: production answers and corrections never reach the next training round",
        found,
        ("no feedback capture is configured (serve.feedback)" if serve is None else "serve.feedback is false")
        + ": production thumbs and corrections are lost, and the next training round has only the data it has now" if found else
        (f"data.sources reads served feedback ({', '.join(feedback_sources)})" if feedback_sources else
         "serve.feedback: true (`tunegate serve` takes thumbs and edited answers at POST /v1/feedback)"),
        "add `serve: {feedback: true}` and serve with `tunegate serve` (POST /v1/feedback), and list a source "
        "`{feedback: sft}` (or preference, kto) under data.sources: each `tunegate run` trains on the edits and thumbs so far; "
        "or log them with request ids where the adapter is served and bring them back the same way")
    return out


def anti_patterns(project, n_train_rows: int, base_is_instruct: bool, answers: dict[str, str] | None = None, *,
                  cuda: bool | None = None) -> list[Finding]:
    """The rules of `anti_pattern_table` this project breaks, errors first (the preflight's findings).

    Arguments as `anti_pattern_table`."""
    found = [f for f in anti_pattern_table(project, n_train_rows, base_is_instruct, answers, cuda=cuda) if f.found]
    return sorted(found, key=lambda f: f.level != "error")


MIN_ROWS_PER_LABEL = 8  # method classify: a label with fewer training rows than this is warned about


def classify_findings(project, rows: list[dict[str, Any]]) -> tuple[list[Finding], dict[str, int] | None]:
    """For train.method classify (tunegate.recipes.classify): the label set the head will have and how many training
    rows each label has. Errors: fewer than 2 labels, or a training answer outside task.labels
    (`classify_labels`); warning: a label with fewer than MIN_ROWS_PER_LABEL rows (`classify_few_rows`).

    Returns (findings, rows per label; None when the method is not classify)."""
    from collections import Counter

    from tunegate.data.records import reference_answer
    from tunegate.recipes.classify import label_key, label_set

    if project.train.method != "classify":
        return [], None
    counts = Counter(label_key(reference_answer(r)) for r in rows)
    try:
        labels = label_set(project.task, rows)
    except TunegateError as exc:
        return [Finding("classify_labels", "error", str(exc), "fix task.labels or the training answers")], dict(counts)
    per_label = {label: counts.get(label_key(label), 0) for label in labels}
    few = {label: n for label, n in per_label.items() if n < MIN_ROWS_PER_LABEL}
    findings = []
    if few:
        shown = ", ".join(f"{label} {n}" for label, n in sorted(few.items(), key=lambda x: x[1])[:10])
        findings.append(Finding("classify_few_rows", "warning",
                                f"method classify: {len(few)} of {len(labels)} labels have fewer than {MIN_ROWS_PER_LABEL} "
                                f"training rows ({shown}{', ...' if len(few) > 10 else ''}): the head sees too few "
                                "examples of them to score them well", "add training rows for those labels"))
    return findings, per_label


# ---------------------------------------------------------------------------------------------------------
# The vocabulary and the pass-through settings

VOCAB_FIX = ("use the tokenizer saved with the model, or resize the model's embeddings to the tokenizer "
             "(model.resize_token_embeddings(len(tokenizer))) and save both before training")


def vocabulary_problem(n_tokens: int, embedding_rows: int | None) -> str | None:
    """Why a tokenizer of `n_tokens` tokens (len(tokenizer): its vocabulary and added tokens) cannot train a model
    whose input embedding has `embedding_rows` rows (config vocab_size), or None. Fewer tokens than rows is
    normal (embeddings padded to a multiple of 64 or 128); more means token ids past the last row, which index
    past the embedding: an IndexError mid-training (or a CUDA device-side assert), after data and preflight."""
    if embedding_rows is None or n_tokens <= embedding_rows:
        return None
    return (f"base_model: the tokenizer has {n_tokens} tokens but the model's embedding has {embedding_rows} rows "
            f"(vocab_size): token ids {embedding_rows}..{n_tokens - 1} would index past it mid-training")


def _config_vocab_size(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "vocab_size", None)
    return int(size) if isinstance(size, int) else None


def check_vocabulary(project) -> list[str]:
    """`tunegate validate`'s vocabulary check, without weights: len(tokenizer) against config.json's vocab_size,
    and `train.added_tokens` against the tokenizer (a token it already has: `models.added_token_problem`).

    Returns one line per problem, naming the numbers (or tokens) and the fix, or []. Skipped ([]) when the base model is not on this
    machine: a hub id not in the local Hugging Face cache (nothing is downloaded), or the embedded model before
    its one-time conversion (its tokenizer and model agree); the preflight checks it again on the loaded model.
    """
    from tunegate.models import EMBEDDED, added_token_problem, cache_dir, resolve_base_model

    name = project.base_model
    if name in EMBEDDED and not (cache_dir() / "models" / name / "config.json").is_file():
        return []
    try:
        from transformers import AutoConfig, AutoTokenizer

        base = str(resolve_base_model(name, progress=False))
        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
        config = AutoConfig.from_pretrained(base, local_files_only=True)
    except (TunegateError, OSError, ValueError):
        return []  # not on this machine, or not a transformers folder: loading it later says why
    problem = vocabulary_problem(len(tokenizer), _config_vocab_size(config))
    added = added_token_problem(tokenizer, project.train.added_tokens) if project.train.added_tokens else None
    return ([f"{problem}; {VOCAB_FIX}"] if problem else []) + ([added] if added else [])


# ---------------------------------------------------------------------------------------------------------
# LoRA target modules (case C12 in docs/cases.md)


def _linear_classes():
    import torch

    classes: list[type] = [torch.nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2 style "linear" layers

        classes.append(Conv1D)
    except ImportError:  # pragma: no cover
        pass
    return tuple(classes)


def _lora_supported_classes():
    import torch

    return (*_linear_classes(), torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
            torch.nn.MultiheadAttention)


def resolve_target_modules(model, target_modules) -> dict[str, Any]:
    """Resolve LoRA `target_modules` against the module names of a loaded model, as PEFT does (case C12).

    model: a torch.nn.Module (a transformers model). target_modules, with PEFT's semantics:
      "all-linear" (any case): every nn.Linear (and transformers Conv1D) except the output layer
          (model.get_output_embeddings(), e.g. lm_head);
      another str: a regular expression that must match the whole module name (re.fullmatch);
      a list/tuple/set of str: a module matches when its name equals an entry or ends with "." + entry.

    Returns {"requested": target_modules as given, "matched": [full module names, model order],
    "matched_suffixes": sorted unique last name components of the matches,
    "available_linear_suffixes": sorted unique last components of the linear layers, output layer excluded}.

    Raises:
        TunegateError: nothing matches (the message names the request and lists the linear layers), or a
            match is a module type LoRA cannot wrap (e.g. a whole attention block matched by a loose regex).
    """
    linear = _linear_classes()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    modules = [(name, m) for name, m in model.named_modules() if name]
    linear_names = [n for n, m in modules if isinstance(m, linear) and m is not output]
    available = sorted({n.rsplit(".", 1)[-1] for n in linear_names})

    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        matched = linear_names
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise TunegateError(f"train.lora.target_modules {target_modules!r} is not a valid regular expression ({exc})") from None
        matched = [n for n, _ in modules if pattern.fullmatch(n)]
    elif isinstance(target_modules, (list, tuple, set, frozenset)) and all(isinstance(t, str) for t in target_modules):
        wanted = list(target_modules)
        matched = [n for n, _ in modules if n in wanted or any(n.endswith("." + t) for t in wanted)]
    else:
        raise TunegateError(
            f"train.lora.target_modules {target_modules!r}: expected 'all-linear', a regular expression string, "
            "or a list of module names")

    requested = list(target_modules) if isinstance(target_modules, (tuple, set, frozenset)) else target_modules
    if not matched:
        raise TunegateError(
            f"train.lora.target_modules {requested!r} match no module of this model; its linear layers are: "
            f"{', '.join(available)}")
    by_name = dict(modules)
    unsupported = [n for n in matched if not isinstance(by_name[n], _lora_supported_classes())]
    if unsupported:
        kinds = sorted({type(by_name[n]).__name__ for n in unsupported})
        shown = ", ".join(unsupported[:5]) + (f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else "")
        raise TunegateError(
            f"train.lora.target_modules {requested!r} match module(s) LoRA cannot wrap ({', '.join(kinds)}): {shown}; "
            f"target the linear layers inside them: {', '.join(available)}")
    return {
        "requested": requested,
        "matched": matched,
        "matched_suffixes": sorted({n.rsplit(".", 1)[-1] for n in matched}),
        "available_linear_suffixes": available,
    }


# ---------------------------------------------------------------------------------------------------------
# FLOPs, peak, estimates


def train_flops(n_params: int, n_trainable: int, tokens: int, full: bool) -> float:
    """Training FLOPs (multiply-adds count 2) of a decoder over `tokens` tokens, forward and backward.

    full=True (every weight trains): 6·N·D (Kaplan et al. 2020, "Scaling Laws for Neural Language Models";
    Hoffmann et al. 2022, "Training Compute-Optimal LLMs"): forward 2·N·D, backward 4·N·D (gradients with
    respect to activations and to weights, 2·N·D each). `n_trainable` is ignored.

    full=False (LoRA, DoRA, QLoRA): 4·N·D + 6·N_a·D. The frozen base weights run the forward (2·N·D) and
    pass activation gradients backward (2·N·D), but need no weight-gradient matmul; the adapter's N_a
    weights cost the full 6·N_a·D.

    N = n_params (parameters of the base model, adapter excluded), N_a = n_trainable, D = tokens. Not
    counted: attention-score FLOPs (12·L·h·s per token, small at short sequence lengths), activation
    recomputation under gradient checkpointing (MFU does not count it, Chowdhery et al. 2022), DoRA's
    weight-norm and QLoRA's dequantisation overheads.
    """
    if full:
        return 6.0 * n_params * tokens
    return 4.0 * n_params * tokens + 6.0 * n_trainable * tokens


def measure_matmul_peak(seconds: float = 2.0, n: int = 1024, dtype: str = "float32") -> float:
    """Achievable matmul throughput of this machine's CPU, in FLOP/s: torch.matmul of two n x n matrices of
    `dtype` ("float32" or "bfloat16"), 2·n³ FLOPs each, with torch's current thread count
    (torch.get_num_threads()). Repeats timed batches for about `seconds` and returns the best batch's rate;
    this is the denominator of a measured MFU (the vendor peak of a CPU is rarely reachable).
    """
    import torch

    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dt)
    b = torch.randn(n, n, generator=gen).to(dt)
    flops_per = 2.0 * n**3
    best = 0.0
    with torch.inference_mode():
        torch.matmul(a, b)  # warm-up: thread pool, packing buffers
        t_start = time.perf_counter()
        k = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(k):
                torch.matmul(a, b)
            dt_s = time.perf_counter() - t0
            best = max(best, flops_per * k / dt_s)
            if dt_s < 0.05:  # batch too short to time well: grow it
                k *= 2
            if time.perf_counter() - t_start >= seconds:
                break
    return best


def _activation_bytes(kw: dict[str, Any], seq_len: int, dims: dict[str, int] | None, bf16: bool) -> tuple[float | None, str]:
    """Activation memory of one training micro-batch (bytes) and the formula used.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"): a transformer
    layer stores about 34·s·b·h bytes of 16-bit activations without recomputation (attention scores not
    stored: SDPA/flash attention); doubled for fp32. With gradient checkpointing each layer keeps only its
    input (2·s·b·h bytes at 16 bit) and one layer at a time is recomputed in full. Plus the fp32 logits of
    the loss, 4·s·b·V bytes (an upper bound: tunegate's loss runs the LM head on supervised positions only).
    """
    if not dims:
        return None, "activations not estimated (model dimensions unknown)"
    b = int(kw.get("per_device_train_batch_size", 8))
    h, L, V = int(dims["hidden_size"]), int(dims["num_hidden_layers"]), int(dims.get("vocab_size", 0))
    scale = 1 if bf16 else 2
    per_layer = 34 * seq_len * b * h * scale
    if kw.get("gradient_checkpointing"):
        layers = L * 2 * seq_len * b * h * scale + per_layer
        form = f"checkpointed: L·2·s·b·h·{scale} + 34·s·b·h·{scale} + 4·s·b·V"
    else:
        layers = L * per_layer
        form = f"L·34·s·b·h·{scale} + 4·s·b·V (Korthikanti et al. 2022)"
    return (float(layers + 4 * seq_len * b * V),
            f"{form} with s={seq_len} (data.max_length: an upper bound), b={b}, h={h}, L={L}, V={V}")


def estimate(project, n_params: int, n_trainable: int, train_tokens: int, tokens_per_s: float | None,
             prices: dict[str, Any], *, n_train_rows: int | None = None, dims: dict[str, int] | None = None,
             bf16: bool = False) -> dict[str, Any]:
    """Tokens, FLOPs, time here, peak memory, and the cost of the same run at 7B scale on cloud GPUs.

    project: the Project (epochs, batch size, gradient checkpointing from the TRL arguments: tunegate's
    defaults under `train.trl`). n_params: parameters of the base model; n_trainable: trainable parameters (the
    adapter's, or all for adapter full). train_tokens: tokens in one epoch of the training split (after the
    chat template). tokens_per_s: training tokens per second measured on this machine (e.g. the audit's
    probe); None: no time estimate. prices: a price table (prices.yaml, see tunegate.prices.load_prices):
    machines with `gpu_peak_bf16_flops` get a 7B cost. n_train_rows: rows per epoch, needed to turn
    `max_steps` into epochs. dims: {"hidden_size", "num_hidden_layers", "vocab_size"} of the base model, for
    the activation term. bf16: activations in bf16 (else fp32).

    Returns {
      "method", "adapter", "tokens_per_epoch", "epochs", "epochs_from", "train_tokens" (tokens over the run),
      "n_params", "n_trainable", "flops", "flops_formula", "tokens_per_s", "seconds_here" (None without a
      measured rate),
      "memory": {"weights_gib", "grads_gib", "optimizer_gib", "activations_gib" (None when dims unknown),
                 "total_gib", "formula", "activations_formula"},
      "at_7b": {"n_params", "n_trainable", "flops", "mfu", "gpus": {machine: {"peak_bf16_flops",
                 "usd_per_hour", "hours", "usd"}}},
      "notes": [str]}

    Memory (bytes): weights 4·N (fp32; QLoRA: 0.5·N for the 4-bit frozen base + 4·N_a) + gradients 4·N_a +
    AdamW's two fp32 moments 8·N_a + activations (see `_activation_bytes`). 7B cost: the same tokens on
    N = 7e9 with the trainable fraction N_a/N kept (an upper bound for LoRA, whose fraction shrinks with
    width); seconds = FLOPs / (ASSUMED_MFU x peak bf16 FLOP/s); USD = hours x usd_per_hour.
    """
    from tunegate.recipes.defaults import adapter_kind

    train = project.train
    method, adapter = train.method, adapter_kind(project)  # what peft builds: `lora.use_dora` decides LoRA/DoRA
    full = adapter == "full"
    kw = _trl_kwargs(project)
    epochs, epochs_from = effective_epochs(kw, n_train_rows)
    notes: list[str] = []
    if kw.get("max_steps", -1) > 0 and not n_train_rows:
        notes.append("train.trl.max_steps is set but the row count is unknown: epochs taken from num_train_epochs")
    total_tokens = round(train_tokens * epochs)
    if full:
        n_trainable = n_params

    def flops_for(n: float, n_a: float) -> float:
        f = train_flops(n, n_a, total_tokens, full)
        if method in ("dpo", "kto") and not kw.get("precompute_ref_log_probs"):
            f += 2.0 * n * total_tokens  # the frozen reference policy's forward pass
        return f

    flops = flops_for(n_params, n_trainable)
    formula = "6·N·D" if full else "4·N·D + 6·N_a·D"
    if method in ("dpo", "kto") and not kw.get("precompute_ref_log_probs"):
        formula += " + 2·N·D (reference forward)"
    if method == "grpo":
        notes.append("grpo: generation FLOPs (num_generations completions per prompt) are not counted")

    seconds_here = total_tokens / tokens_per_s if tokens_per_s else None

    weight_bytes = (0.5 * (n_params) + 4.0 * n_trainable) if adapter == "qlora" else 4.0 * n_params
    grad_bytes = 4.0 * n_trainable
    adam_bytes = 8.0 * n_trainable
    act_bytes, act_formula = _activation_bytes(kw, project.data.max_length, dims, bf16)
    total_bytes = weight_bytes + grad_bytes + adam_bytes + (act_bytes or 0.0)
    memory = {
        "weights_gib": weight_bytes / GIB,
        "grads_gib": grad_bytes / GIB,
        "optimizer_gib": adam_bytes / GIB,
        "activations_gib": None if act_bytes is None else act_bytes / GIB,
        "total_gib": total_bytes / GIB,
        "formula": ("0.5·N (4-bit base) + 4·N_a" if adapter == "qlora" else "4·N") + " weights + 4·N_a grads + 8·N_a AdamW + activations",
        "activations_formula": act_formula,
    }

    frac = n_trainable / n_params if n_params else 0.0
    n7, n7_a = SCALE_PARAMS, SCALE_PARAMS * frac
    flops7 = flops_for(n7, n7_a)
    gpus = {}
    for name, m in (prices.get("machines") or {}).items():
        peak = m.get("gpu_peak_bf16_flops")
        if not peak:
            continue
        hours = flops7 / (ASSUMED_MFU * float(peak)) / 3600.0
        gpus[name] = {"peak_bf16_flops": float(peak), "usd_per_hour": float(m["usd_per_hour"]),
                      "hours": hours, "usd": hours * float(m["usd_per_hour"])}
    return {
        "method": method,
        "adapter": adapter,
        "tokens_per_epoch": int(train_tokens),
        "epochs": epochs,
        "epochs_from": epochs_from,
        "train_tokens": total_tokens,
        "n_params": int(n_params),
        "n_trainable": int(n_trainable),
        "flops": flops,
        "flops_formula": formula,
        "tokens_per_s": tokens_per_s,
        "seconds_here": seconds_here,
        "memory": memory,
        "at_7b": {"n_params": n7, "n_trainable": n7_a, "flops": flops7, "mfu": ASSUMED_MFU, "gpus": gpus},
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------------------------
# Report


def _human(x: float, unit: str = "") -> str:
    for div, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {suffix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def render(findings: list[Finding], estimate: dict[str, Any] | None) -> str:
    """The plain-text preflight report (`tunegate train --dry-run`): findings, errors first, then the estimate."""
    lines: list[str] = []
    ordered = sorted(findings, key=lambda f: f.level != "error")
    n_err = sum(f.level == "error" for f in ordered)
    n_warn = len(ordered) - n_err
    lines.append(f"preflight: {n_err} error(s), {n_warn} warning(s)")
    for f in ordered:
        lines.append(f"  {f.level.upper()} [{f.name}] {f.message}")
        lines.append(f"      fix: {f.fix}")
    if estimate:
        e = estimate
        lines.append("")
        lines.append(f"estimate ({e['method']}, adapter {e['adapter']}):")
        lines.append(f"  tokens: {e['tokens_per_epoch']:,} per epoch x {e['epochs']:.3g} epochs ({e['epochs_from']}) "
                     f"= {e['train_tokens']:,}")
        lines.append(f"  params: {e['n_params']:,} base, {e['n_trainable']:,} trainable "
                     f"({100 * e['n_trainable'] / max(e['n_params'], 1):.2f}%)")
        lines.append(f"  compute: {_human(e['flops'], 'FLOP')} ({e['flops_formula']})")
        if e["seconds_here"] is not None:
            lines.append(f"  time here: {_duration(e['seconds_here'])} at {e['tokens_per_s']:,.0f} tokens/s (measured)")
        else:
            lines.append("  time here: not estimated (no measured tokens/s)")
        m = e["memory"]
        act = "n/a" if m["activations_gib"] is None else f"{m['activations_gib']:.2f}"
        lines.append(f"  peak memory: {m['total_gib']:.2f} GiB = weights {m['weights_gib']:.2f} + grads {m['grads_gib']:.2f} "
                     f"+ AdamW {m['optimizer_gib']:.2f} + activations {act} GiB")
        lines.append(f"    ({m['formula']}; activations: {m['activations_formula']})")
        s = e["at_7b"]
        if s["gpus"]:
            lines.append(f"  the same tokens at 7B ({_human(s['flops'], 'FLOP')}, MFU {s['mfu']:.2f} assumed):")
            for name, g in s["gpus"].items():
                lines.append(f"    {name}: {_duration(g['hours'] * 3600)}, ${g['usd']:,.2f} "
                             f"(at ${g['usd_per_hour']:.2f}/h, {_human(g['peak_bf16_flops'], 'FLOP/s')} bf16 peak)")
        for n in e["notes"]:
            lines.append(f"  note: {n}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# The whole preflight, on the data stage's output

MASK_RULES = {  # data-stage rejection rules that are loss-mask and length cases
    "prompt_not_prefix": "C03", "no_end_token": "C01", "no_supervised_tokens": "C09/C10", "overlength": "C11",
    "empty_turn": "C07", "template_error": "C04",
}


def micro_benchmark(model, tokenizer, project, rows: list[dict[str, Any]], steps: int = 2) -> dict[str, Any]:
    """Tokens/s of forward + backward on one real batch of training rows (the last of `steps` timed).

    Uses the SFT loss (`recipes.sft.supervised_only_loss`) on rows tokenized as training tokenizes them; for
    raw text, blocks as CPT packs them. Preference and RL objectives cost more per token (two sequences, or
    generation): the estimate states it.
    """
    import torch

    from tunegate.recipes.sft import supervised_only_loss, tokenize_rows

    kw = _trl_kwargs(project)
    b = int(kw.get("per_device_train_batch_size", 8))
    dcfg = project.data
    if rows and "text" in rows[0]:
        from tunegate.recipes.cpt import pack

        cols = pack(tokenizer, rows[: 4 * b], dcfg.max_length)
    else:
        cols = tokenize_rows(tokenizer, rows[:b], dcfg.max_length, dcfg.overlength)
    ids, labels = cols["input_ids"][:b], cols["labels"][:b]
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    batch = {
        "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
    }
    tokens = int(batch["attention_mask"].sum())
    model.train()
    seconds = None
    for _ in range(steps):
        t0 = time.perf_counter()
        loss, _, _ = supervised_only_loss(model, batch)
        loss.backward()
        seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return {"batch_rows": len(ids), "tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def run_checks(project, data_dir: Path, measure: bool = True) -> dict[str, Any]:
    """The preflight of `tunegate train --dry-run` (measure=True) and of every training (measure=False).

    Reads the data stage's train.jsonl and stats.json. Loads the tokenizer and the base model's architecture
    (on the meta device: no weights; real weights only with `measure`): anti-patterns, loss-mask and length rejections the data stage made (C01-C03, C07, C09-C11),
    a tokenizer with more tokens than the model's embedding rows (`vocab_mismatch`), a `train.added_tokens` token
    the tokenizer already has (`added_token_known`; otherwise the tokens are added and the model's embedding grows
    for them, as training does), TRL/PEFT settings tunegate
    cannot honour (`passthrough_unsupported`: recipes.defaults.check_passthrough),
    LoRA target modules resolved against the model's real module names (C12), and with `measure` a
    micro-benchmark and the estimate (tokens, FLOPs, time here, peak memory, 7B cloud cost).

    Method classify: its label set and rows per label (`classify_findings`).

    Returns {"findings": [Finding.to_json()], "errors": int, "rows": int, "mask_rejections": {rule: n},
    "rows_per_label": {label: n} | None,
    "target_modules": ... | None, "micro_benchmark": ... | None, "estimate": ... | None, "text": render(...)}.
    """
    import json

    from tunegate.core.io import read_jsonl
    from tunegate.models import added_token_problem, fit_embeddings, load_model, load_tokenizer, resolve_base_model
    from tunegate.recipes.common import peft_config
    from tunegate.recipes.defaults import check_passthrough, lora_kwargs

    rows = read_jsonl(data_dir / "train.jsonl")
    stats = json.loads((data_dir / "stats.json").read_text()) if (data_dir / "stats.json").is_file() else {}
    base = resolve_base_model(project.base_model)
    tokenizer = load_tokenizer(base)
    findings = anti_patterns(project, len(rows), instruct_tuned(tokenizer))
    found, rows_per_label = classify_findings(project, rows)  # method classify: its label set
    findings += found

    rejected = stats.get("rejected_by_rule", {})
    mask = {f"{rule} ({case})": rejected[rule] for rule, case in MASK_RULES.items() if rejected.get(rule)}
    if stats.get("truncated_rows"):
        mask[f"truncated by data.overlength={project.data.overlength} (C10/C11)"] = stats["truncated_rows"]

    # Module names and parameter counts need no weights: a model on the meta device costs no memory. Real
    # weights are loaded only for the micro-benchmark (--dry-run).
    model = load_model(base) if measure and rows else _meta_model(base)
    problem = vocabulary_problem(len(tokenizer), model.get_input_embeddings().num_embeddings)
    if problem:
        findings.insert(0, Finding("vocab_mismatch", "error", problem, VOCAB_FIX))
    added = list(project.train.added_tokens)
    problem = added_token_problem(tokenizer, added) if added else None
    if problem:
        findings.insert(0, Finding("added_token_known", "error", problem, "remove it from train.added_tokens"))
        added = []
    if added:  # what training tokenizes with and the embedding rows it trains (recipes.common.load_policy)
        tokenizer = load_tokenizer(base, added)
        fit_embeddings(model, tokenizer, added)
    for problem in check_passthrough(project):  # also run by validate and before every training
        findings.insert(0, Finding("passthrough_unsupported", "error", problem,
                                   "remove or change that setting in the project file (`tunegate validate` checks it)"))
    targets = None
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = n_params
    if project.train.adapter != "full":
        requested = lora_kwargs(project)["target_modules"]
        try:
            targets = resolve_target_modules(model, requested)
        except TunegateError as exc:
            findings.insert(0, Finding("target_modules_not_found", "error", str(exc),
                                       "name modules from the list above in train.lora.target_modules, or use all-linear"))
        if targets is not None:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, peft_config(project, model, tokenizer) if added else LoraConfig(**lora_kwargs(project)))
            n_trainable, n_params = model.get_nb_trainable_parameters()

    bench, est = None, None
    if measure and rows:
        from tunegate.models import bf16_supported
        from tunegate.prices import load_prices

        use_bf16 = bf16_supported()
        with _autocast(use_bf16):
            bench = micro_benchmark(model, tokenizer, project, rows)
        cfg = model.config if hasattr(model, "config") else None
        dims = {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")} if cfg else None
        train_tokens = stats.get("tokens_total") or sum(len(str(r)) // 4 for r in rows)
        train_tokens = round(train_tokens * stats.get("train_rows", len(rows)) / max(stats.get("rows_kept", len(rows)), 1))
        est = estimate(project, n_params, n_trainable, train_tokens, bench["tokens_per_s"], load_prices(project.audit.prices),
                       n_train_rows=len(rows), dims=dims, bf16=use_bf16)
        if project.train.method == "classify":
            est["notes"].append("time here is measured on the SFT loss over the answer; classify reads the same prompt "
                                "tokens and scores one position per row with its head")
        if project.train.method in ("dpo", "kto", "orpo", "grpo", "distillation"):
            est["notes"].append(f"time here is measured on the SFT loss; {project.train.method} costs more per token "
                                "(chosen and rejected sequences, a reference pass, or generation)")
    findings.sort(key=lambda f: f.level != "error")
    return {
        "findings": [f.to_json() for f in findings],
        "errors": sum(f.level == "error" for f in findings),
        "rows": len(rows),
        "mask_rejections": mask,
        "rows_per_label": rows_per_label,  # method classify: training rows of each label of the head (None otherwise)
        "target_modules": targets,
        "micro_benchmark": bench,
        "estimate": est,
        "text": render(findings, est) + _render_checks(mask, targets, bench, rows_per_label),
    }


def _meta_model(base):
    """The base model's architecture on the meta device: real module names and shapes, no weights in memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base)))


def _autocast(bf16: bool):
    import contextlib

    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 and not torch.cuda.is_available() else contextlib.nullcontext()


def _render_checks(mask: dict[str, int], targets: dict[str, Any] | None, bench: dict[str, Any] | None,
                   rows_per_label: dict[str, int] | None = None) -> str:
    lines = ["", "loss mask and length (rows the data stage rejected or cut, by rule):"]
    lines += [f"  {k}: {v}" for k, v in mask.items()] or ["  none"]
    if rows_per_label:
        counts = sorted(rows_per_label.values())
        lines.append(f"classification head: {len(counts)} labels, training rows per label min {counts[0]}, "
                     f"median {counts[len(counts) // 2]}, max {counts[-1]}")
    if targets is not None:
        lines.append(f"LoRA target modules: {len(targets['matched'])} modules ({', '.join(targets['matched_suffixes'])}) "
                     f"of this model's linear layers {', '.join(targets['available_linear_suffixes'])}")
    if bench is not None:
        lines.append(f"micro-benchmark: {bench['batch_rows']} rows, {bench['tokens']} tokens, forward+backward "
                     f"{bench['seconds']} s = {bench['tokens_per_s']} tokens/s")
    return "\n".join(lines) + "\n"
