"""The honest decision tree: at most five questions, thirteen methods, one table of data.

The table (`TREE`) is the single source for the terminal wizard (`tunegate decide`), `tunegate decide
--explain`, and the docs. The first question sends everything that is really a knowledge problem to RAG,
which filters out most would-be fine-tunes. Each leaf carries why it fits and why the alternatives met on
the way were rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

METHODS = (
    "rag", "prompt_optimization", "lora", "dora", "qlora", "full_sft", "cpt", "dpo", "kto", "orpo", "grpo", "distillation",
    "classify",
)
TRAINS = {m: m not in ("rag", "prompt_optimization") for m in METHODS}


@dataclass(frozen=True)
class Option:
    key: str  # the answer's name in flags and answer files
    label: str  # what the wizard shows
    next: str  # a question id or "leaf:<method>"
    rejects: str = ""  # why the methods this answer rules out were ruled out


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    help: str
    options: tuple[Option, ...]


@dataclass(frozen=True)
class Leaf:
    method: str
    why: str
    next_step: str


def _yes_no(qid, text, help_, yes_next, no_next, yes_rejects="", no_rejects=""):
    return Question(qid, text, help_, (Option("yes", "yes", yes_next, yes_rejects), Option("no", "no", no_next, no_rejects)))


TREE: dict[str, Question] = {q.id: q for q in (
    _yes_no(
        "changing_knowledge",
        "Does the model need information that changes (policies, prices, catalogues, docs)?",
        "Fine-tuning bakes facts in at training time; they go stale and cannot be cited. Retrieval reads them at request time.",
        "leaf:rag", "prompt_meets_bar",
        yes_rejects="every training method: facts that change must be retrieved, not trained in",
    ),
    _yes_no(
        "prompt_meets_bar",
        "Does a prompt-optimized baseline already meet the bar on your golden set?",
        "Instruction search plus few-shot selection, scored on the frozen golden set (measure it before answering).",
        "leaf:prompt_optimization", "verifier",
        yes_rejects="every training method: a prompt that meets the bar costs nothing to train and little to change",
        no_rejects="prompt optimization: it does not meet the bar on the golden set",
    ),
    _yes_no(
        "verifier",
        "Can a program check whether an answer is correct (math, code that runs, valid JSON, tool calls, extraction)?",
        "A verifier turns correctness into a reward, so the model can learn from its own sampled answers.",
        "leaf:grpo", "preference",
        no_rejects="GRPO: there is no programmatic reward to optimise",
    ),
    Question(
        "preference",
        "What preference signals do you have?",
        "Pairs: the same prompt with a better and a worse answer. Thumbs: single answers marked good or bad.",
        (
            Option("pairs", "preference pairs (chosen vs rejected), starting from a model that already does the task", "leaf:dpo",
                   "SFT-only methods: pairs carry signal that demonstrations do not"),
            Option("pairs_no_sft", "preference pairs, and no fine-tuned starting model yet (SFT and preference in one pass)", "leaf:orpo",
                   "DPO: it needs a separately fine-tuned reference model first"),
            Option("thumbs", "unpaired thumbs up / down", "leaf:kto", "DPO and ORPO: they need paired answers"),
            Option("none", "none: I have demonstrations (prompts with good answers)", "demonstrations",
                   "DPO, KTO, ORPO: no preference signal"),
        ),
    ),
    Question(
        "demonstrations",
        "Which best describes your situation?",
        "LoRA rank 16 with DoRA is the default; the other answers name the one constraint that changes it.",
        (
            Option("default", "none of the below: learn a behaviour or format from demonstrations", "leaf:dora"),
            Option("closed_label_set", "every answer is one label of a closed set (intents, categories; abstaining allowed)",
                   "leaf:classify", "generating the label (SFT): a head scores every label in one forward pass, gives "
                   "a probability to abstain on, and cannot answer outside the set"),
            Option("unmerged_serving", "the adapter must be served unmerged by an engine without DoRA (e.g. vLLM multi-LoRA)", "leaf:lora",
                   "DoRA: its magnitude vectors cannot be served unmerged by vLLM"),
            Option("memory_tight", "GPU memory is too tight for the base model in 16-bit", "leaf:qlora",
                   "LoRA/DoRA in 16-bit: the base model does not fit"),
            Option("foreign_vocabulary", "the domain's vocabulary is foreign to the base model (raw domain text available)", "leaf:cpt",
                   "SFT first: the model cannot use words it has not learned; adapt on raw text before instructions"),
            Option("small_student", "the goal is a small, fast student of a larger teacher model", "leaf:distillation",
                   "SFT on human data alone: the teacher's outputs or logits are the cheaper, denser signal"),
            Option("lora_fell_short", "a benchmark showed LoRA/DoRA falls short on the golden set", "leaf:full_sft",
                   "LoRA/DoRA: measured to fall short (keep that benchmark in the audit)"),
        ),
    ),
)}

LEAVES: dict[str, Leaf] = {leaf.method: leaf for leaf in (
    Leaf("rag", "The answers depend on information that changes; retrieval keeps them current and citable.",
         "Index the document corpus; measure retrieval recall and answer quality on the golden set."),
    Leaf("prompt_optimization", "A tuned prompt already meets the bar on the golden set: no training spend needed.",
         "Freeze the optimised prompt and few-shot set; keep the golden set as a regression gate."),
    Leaf("grpo", "A verifier can score answers, so reinforcement fine-tuning (GRPO) optimises correctness directly.",
         "Pick or write a verifier; check that rewards vary within groups of >= 2 generations before training."),
    Leaf("dpo", "Preference pairs on top of a model that already does the task: DPO learns the preference directly.",
         "Use the current fine-tuned model as the frozen reference; expect loss ln 2 = 0.693 at step 0."),
    Leaf("orpo", "Preference pairs and no SFT model yet: ORPO does SFT and preference in one pass, no reference model.",
         "Check chosen != rejected for every pair; train with the pairs directly."),
    Leaf("kto", "Unpaired thumbs up/down: KTO learns from single labelled answers.",
         "Balance desirable and undesirable rows or set their weights; use a frozen reference."),
    Leaf("dora", "Demonstrations of a behaviour or format: LoRA rank 16 with DoRA, the default.",
         "Run `tunegate run`; the eval gate compares it with the base model on the golden set."),
    Leaf("lora", "Demonstrations, served unmerged by an engine without DoRA support: plain LoRA rank 16.",
         "Keep ranks within the engine's max LoRA rank; no modules_to_save."),
    Leaf("qlora", "Demonstrations, with the base model too large for memory in 16-bit: QLoRA (4-bit base, LoRA on top).",
         "Needs a CUDA GPU with bitsandbytes; merge into a 16-bit base for serving."),
    Leaf("cpt", "The domain's vocabulary is foreign: continued pretraining on raw domain text first, then SFT.",
         "Collect raw domain text; measure held-out perplexity before and after."),
    Leaf("distillation", "A small fast student of a larger teacher: learn from the teacher's outputs (or logits).",
         "Generate teacher answers for your prompts; use logits when the tokenizers match."),
    Leaf("full_sft", "A benchmark showed LoRA falls short: full fine-tuning, with the benchmark kept as evidence.",
         "Budget for full optimizer state; compare against the LoRA run on the same golden set."),
    Leaf("classify", "Demonstrations whose answers are labels of a closed set: a classification head with a LoRA/DoRA "
         "adapter predicts the label in one forward pass, and abstains under a probability threshold.",
         "Set task.kind classification (task.abstain_label for out of scope) and train.method classify; serve it "
         "with `tunegate serve` (vLLM's multi-LoRA does not serve the head)."),
)}

START = "changing_knowledge"
# How each training leaf is written in a project file (train.method and train.adapter; tunegate.recipes).
TRAIN_SETTINGS: dict[str, dict[str, str]] = {
    "lora": {"method": "sft", "adapter": "lora"},
    "dora": {"method": "sft", "adapter": "dora"},
    "qlora": {"method": "sft", "adapter": "qlora"},
    "full_sft": {"method": "sft", "adapter": "full"},
    "cpt": {"method": "cpt"},
    "dpo": {"method": "dpo"},
    "kto": {"method": "kto"},
    "orpo": {"method": "orpo"},
    "grpo": {"method": "grpo"},
    "distillation": {"method": "distillation"},
    "classify": {"method": "classify"},
}


@dataclass
class Decision:
    method: str
    trains: bool
    why: str
    next_step: str
    path: list[dict[str, str]] = field(default_factory=list)  # [{question, answer}]
    rejected: list[str] = field(default_factory=list)  # each: "<method(s)>: <reason>"

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "trains": self.trains, "why": self.why, "next_step": self.next_step,
                "path": self.path, "rejected": self.rejected}


class DecisionError(ValueError):
    """An answer that is not one of the question's options, or answers that cannot be read."""


def decide(answers: dict[str, str] | Callable[[Question], str]) -> Decision:
    """Walk the tree. `answers` maps question id -> option key, or is a function asked each question.

    Raises:
        DecisionError: a missing answer, or one that is not an option of its question (the message lists them).
    """
    ask = answers if callable(answers) else (lambda q: _lookup(answers, q))
    node, path, rejected = START, [], []
    for _ in range(len(TREE) + 1):
        q = TREE[node]
        key = ask(q)
        opt = next((o for o in q.options if o.key == key), None)
        if opt is None:
            raise DecisionError(f"question '{q.id}': answer {key!r} is not one of {', '.join(o.key for o in q.options)}")
        path.append({"question": q.text, "answer": opt.label})
        if opt.rejects:
            rejected.append(opt.rejects)
        if opt.next.startswith("leaf:"):
            leaf = LEAVES[opt.next[5:]]
            return Decision(leaf.method, TRAINS[leaf.method], leaf.why, leaf.next_step, path, rejected)
        node = opt.next
    raise AssertionError("the decision tree has a cycle")


def answer_key(value: Any) -> str:
    """An answer as written in YAML or on the command line -> an option key (YAML reads `yes` as true)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value).strip().lower()


def read_answers(answers_file: Path | None = None, answers: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """Answers given ahead of the questions: a YAML/JSON file mapping question id -> option, then `question=option`
    strings (as `tunegate decide -a` takes them), the later winning. Option keys are normalised by `answer_key`.

    Raises DecisionError for a missing file, a string without `=`, or a question id the tree does not ask.
    """
    given: dict[str, str] = {}
    if answers_file is not None:
        import yaml

        if not answers_file.is_file():
            raise DecisionError(f"{answers_file}: answers file not found")
        given.update({str(k): answer_key(v) for k, v in (yaml.safe_load(answers_file.read_text()) or {}).items()})
    for item in answers:
        key, sep, value = item.partition("=")
        if not sep:
            raise DecisionError(f"--answer {item!r}: expected question=option")
        given[key.strip()] = value.strip()
    unknown = set(given) - set(TREE)
    if unknown:
        raise DecisionError(f"unknown question(s) {', '.join(sorted(unknown))}; questions: {', '.join(TREE)}")
    return given


def _lookup(answers: dict[str, str], q: Question) -> str:
    if q.id not in answers:
        raise DecisionError(f"question '{q.id}' is not answered: {q.text} (one of: {', '.join(o.key for o in q.options)})")
    return answer_key(answers[q.id])


def paths_to_leaves() -> dict[str, dict[str, str]]:
    """For every method, one answer set that reaches it (used by tests and the docs)."""
    found: dict[str, dict[str, str]] = {}

    def walk(node: str, answers: dict[str, str]) -> None:
        for opt in TREE[node].options:
            a = {**answers, node: opt.key}
            if opt.next.startswith("leaf:"):
                found.setdefault(opt.next[5:], a)
            else:
                walk(opt.next, a)

    walk(START, {})
    return found


def explain() -> str:
    """The tree as text: every question, its options, and where each leads (the `--explain` output and docs)."""
    lines = ["tunegate decision tree (at most five questions)", ""]
    for i, q in enumerate(TREE.values(), start=1):
        lines.append(f"{i}. [{q.id}] {q.text}")
        lines.append(f"   {q.help}")
        for o in q.options:
            target = o.next[5:].upper() if o.next.startswith("leaf:") else f"-> question '{o.next}'"
            lines.append(f"   - {o.key}: {o.label}  =>  {target}")
        lines.append("")
    lines.append("Methods: " + ", ".join(METHODS))
    return "\n".join(lines)



def explain_markdown() -> str:
    """The tree as Markdown (docs/decision_tree.md is this text; a test keeps the two identical)."""
    lines = ["# The decision tree", "", "Generated from `tunegate.decide.TREE` by `tunegate decide --explain --markdown`; "
             "do not edit by hand.", "", "At most five questions; the first sends knowledge problems to retrieval.", ""]
    for i, q in enumerate(TREE.values(), start=1):
        lines += [f"## {i}. {q.text}", "", f"`{q.id}`: {q.help}", "", "| answer | leads to | rules out |", "|---|---|---|"]
        for o in q.options:
            target = f"**{o.next[5:].upper()}**" if o.next.startswith("leaf:") else f"question `{o.next}`"
            lines.append(f"| `{o.key}`: {o.label} | {target} | {o.rejects} |")
        lines.append("")
    lines += ["## The thirteen methods", "", "| method | trains | why it fits | next step |", "|---|---|---|---|"]
    for m in METHODS:
        leaf = LEAVES[m]
        lines.append(f"| **{m.upper()}** | {'yes' if TRAINS[m] else 'no'} | {leaf.why} | {leaf.next_step} |")
    return "\n".join(lines) + "\n"

# --- the audit's recommendation: measured numbers answer the questions they can ---------------------------

RETRIEVAL_CANDIDATES = ("rag_bm25", "rag_dense", "rag_hybrid", "lora_probe+rag")
PROMPTING_CANDIDATES = ("zero_shot", "prompt_optimization", "knn_fewshot", "knn_classifier", "knn_classifier_abstain")
DEFAULT_ANSWERS = {"verifier": "no", "preference": "none", "demonstrations": "default"}  # assumed when not given


def recommend(candidates: list[dict[str, Any]], bar: float | None, min_gain: float, given: dict[str, str],
              n_samples: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Turn the audit's measurements into one named method, through the same tree as `tunegate decide`.

    candidates: dicts with `name`, `trains` (bool), `mean` and `rows` (per-golden-row scores of the headline
    metric, the same rows in the same order for every candidate).
    bar: the quality bar on that metric (None: "meets the bar" means fine-tuning does not measurably beat it).
    min_gain: fine-tuning pays when the lower end of the 95% CI of its gain is above this.
    given: the user's answers (question id -> option key); measured answers overrule them, and say so.

    Returns {verdict: TRAIN | NO_TRAIN, decision, best_no_training, best_training, gap, measured, overruled,
    assumed, notes}. `gap` is the paired-bootstrap 95% CI of (best fine-tune - best no-training candidate).
    """
    from tunegate.evals.bootstrap import paired_bootstrap

    def diff(a, b):  # CI of b - a on the same rows
        return paired_bootstrap(a["rows"], b["rows"], n_samples, seed).as_dict()

    no_train = [c for c in candidates if not c["trains"]]
    trains = [c for c in candidates if c["trains"]]
    if not no_train:
        raise ValueError("the audit needs at least one candidate that does not train")
    best_nt = max(no_train, key=lambda c: c["mean"])
    best_ft = max(trains, key=lambda c: c["mean"]) if trains else None
    gap = diff(best_nt, best_ft) if best_ft else None
    measured: dict[str, dict[str, str]] = {}
    notes: list[str] = []

    retrieval = [c for c in candidates if c["name"] in RETRIEVAL_CANDIDATES]
    closed_book = [c for c in candidates if c["name"] not in RETRIEVAL_CANDIDATES]
    if retrieval and closed_book:
        best_rag = max(retrieval, key=lambda c: c["mean"])
        best_cb = max(closed_book, key=lambda c: c["mean"])
        d = diff(best_cb, best_rag)
        if d["ci_low"] > min_gain:
            measured["changing_knowledge"] = {
                "answer": "yes",
                "why": f"{best_rag['name']} scored {best_rag['mean']:.3f} against {best_cb['mean']:.3f} for the best "
                       f"closed-book candidate ({best_cb['name']}), difference {d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]: "
                       "the answers live in the documents, so retrieval is the method",
            }
    prompting = [c for c in candidates if c["name"] in PROMPTING_CANDIDATES]
    if prompting:
        best_p = max(prompting, key=lambda c: c["mean"])
        if bar is not None:
            meets = best_p["mean"] >= bar
            why = f"{best_p['name']} scored {best_p['mean']:.3f} against a bar of {bar:.3f}"
        elif best_ft is not None:
            d = diff(best_p, best_ft)
            meets = not d["ci_low"] > min_gain
            why = (f"no bar is set, and the best fine-tune estimate ({best_ft['name']} {best_ft['mean']:.3f}) "
                   f"{'does not beat' if meets else 'beats'} {best_p['name']} ({best_p['mean']:.3f}): "
                   f"difference {d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]")
        else:
            meets, why = None, ""
        if meets is not None:
            measured["prompt_meets_bar"] = {"answer": "yes" if meets else "no", "why": why}

    if given.get("changing_knowledge") == "yes":
        # information that changes is a fact about the world; a measurement cannot say it does not
        measured.pop("changing_knowledge", None)
    overruled = [{"question": q, "given": given[q], "measured": m["answer"], "why": m["why"]}
                 for q, m in measured.items() if q in given and given[q] != m["answer"]]
    answers = {**given, **{q: m["answer"] for q, m in measured.items()}}
    assumed: dict[str, str] = {}

    def ask(q: Question) -> str:
        if q.id in answers:
            return answers[q.id]
        if q.id in ("changing_knowledge", "prompt_meets_bar"):
            assumed[q.id] = "no"
            return "no"
        assumed[q.id] = DEFAULT_ANSWERS[q.id]
        return assumed[q.id]

    decision = decide(ask)
    # A leaf reached by a measured answer says which measurement: "a tuned prompt meets the bar" alone would hide
    # that the option meeting it is, say, an embedding classifier.
    for qid, m in measured.items():
        if any(o.key == m["answer"] and o.next == f"leaf:{decision.method}" for o in TREE[qid].options):
            decision.why = f"{decision.why} Measured: {m['why']}."
    if decision.method == "prompt_optimization" and best_nt["name"].startswith("knn_classifier"):
        notes.append(f"the best option without training, {best_nt['name']}, is not a prompt: a similarity-weighted kNN vote over "
                     "MiniLM embeddings of the labelled training rows, no LLM; using it means serving that classifier")
    if decision.trains and best_ft is not None and gap is not None and not gap["ci_low"] > min_gain:
        notes.append(
            f"the quick probe ({best_ft['name']} {best_ft['mean']:.3f}) did not beat {best_nt['name']} ({best_nt['mean']:.3f}) yet; "
            "a probe is a lower bound of a full run, so training goes ahead, and the eval gate decides"
        )
    if not decision.trains and best_ft is not None and gap is not None and gap["ci_low"] > min_gain:
        beats = f"{best_ft['name']} beats {best_nt['name']} by {gap['mean']:+.3f} [{gap['ci_low']:+.3f}, {gap['ci_high']:+.3f}]"
        if decision.method == "rag" and best_ft["name"] in RETRIEVAL_CANDIDATES:
            notes.append(f"the best system combines both: {beats}; fine-tune on top of retrieval (for the answer's form), "
                         "never to store the facts")
        else:
            notes.append(f"fine-tuning measurably helps ({beats}), but the cheaper option already meets the bar")
    return {
        "verdict": "TRAIN" if decision.trains else "NO_TRAIN",
        "decision": decision.to_json(),
        "best_no_training": {k: best_nt[k] for k in ("name", "mean")},
        "best_training": {k: best_ft[k] for k in ("name", "mean")} if best_ft else None,
        "gap": gap,
        "measured": measured,
        "overruled": overruled,
        "assumed": assumed,
        "notes": notes,
    }
