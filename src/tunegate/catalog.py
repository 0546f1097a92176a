"""The names of what tunegate measures, in one place: golden-set metrics, standard suites and their files,
judge metrics, and the metrics where lower is better.

Plain data: the project file is validated against these names (tunegate.config), and the eval modules that
compute the scores (tunegate.evals.metrics, .ifeval, .safety, .suites) read them from here.
"""

from __future__ import annotations

# Golden-set metrics. Row metrics give one score per golden row (tunegate.evals.metrics.ROW_METRICS maps each
# name to its function); corpus metrics need every row at once; json_schema needs eval.json_schema.
ROW_METRICS = ("exact_match", "token_f1", "numeric_match", "json_valid", "rouge_l", "chrf", "refusal", "tool_call")
CORPUS_METRICS = ("macro_f1",)
# Label metrics of a `task` (tunegate.evals.labels): classification with an abstain label (CLINC150's in-scope
# accuracy and out-of-scope recall, Larson et al. 2019, with oos precision), and multilabel answers (label sets).
ABSTAIN_METRICS = ("in_scope_accuracy", "oos_recall", "oos_precision")
MULTILABEL_ROW_METRICS = ("set_match", "jaccard")
MULTILABEL_METRICS = (*MULTILABEL_ROW_METRICS, "label_micro_f1", "label_macro_f1", "label_micro_precision", "label_micro_recall")
# Per-system fields of the eval stage's samples.jsonl that are no metric (candidate_output, candidate_stopped,
# candidate_probability, candidate_confidence, candidate_generated): no custom metric may take these names.
SAMPLE_FIELDS = ("output", "stopped", "probability", "confidence", "generated")
ALL_METRICS = (*ROW_METRICS, *CORPUS_METRICS, "json_schema", *ABSTAIN_METRICS, *MULTILABEL_METRICS)

# The LLM judge's golden-set metrics (eval.judge.grade): a 1-10 rating / 10, and the pairwise win rate.
JUDGE_METRICS = ("judge_score", "judge_win_rate")

# IFEval (tunegate.evals.ifeval): its prompt file under the suite data root, as Google publishes it.
IFEVAL_FILE = "ifeval/input_data.jsonl"
IFEVAL_METRICS = ("ifeval_prompt_strict", "ifeval_inst_strict", "ifeval_prompt_loose", "ifeval_inst_loose")

# The safety suite (tunegate.evals.safety): its prompt sources and their upstream files under the data root.
SAFETY_SOURCES = ("harmbench", "jbb", "xstest")
SAFETY_WITH_SAFE_PROMPTS = ("jbb", "xstest")  # sources that also have safe prompts (over-refusal)
SAFETY_FILES = {
    "harmbench": ("harmbench/harmbench_behaviors_text_all.csv",),
    "jbb": ("jbb_behaviors/harmful-behaviors.csv", "jbb_behaviors/benign-behaviors.csv"),
    "xstest": ("xstest/xstest_prompts.csv",),
}
SAFETY_METRICS = ("harmful_refusal", "over_refusal")  # by string match
SAFETY_JUDGE_METRICS = ("harmful_refusal_judge", "over_refusal_judge")  # by eval.judge

# eval.suites.lm_eval (tunegate.evals.harness): lm_eval.<task>.<metric>[.<filter>], one per task metric scored per row
LM_EVAL_PREFIX = "lm_eval."

# Metrics where a rise is the regression (over-refusal rates); a gate rule on one compares downwards.
LOWER_IS_BETTER = frozenset({"over_refusal", "over_refusal_judge"})
