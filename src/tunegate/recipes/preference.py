"""Preference recipes: DPO, ORPO and KTO through TRL, on the data stage's preference and KTO rows.

- DPO (Rafailov et al. 2023, "Direct Preference Optimization"): pairs, against a frozen reference. With
  an adapter the reference is the policy with the adapter off (a fresh adapter leaves the base unchanged);
  from `train.init_adapter` TRL keeps a frozen copy of that adapter as the reference, so at step 0 the loss
  is ln 2 = 0.693 and reward margins are 0 (case C19 in docs/cases.md).
- ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"): SFT on
  the chosen answer plus an odds-ratio penalty on the rejected one, in one pass, no reference model.
- KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"): single answers
  labelled desirable or not; a preference pair gives one of each.

Rows are handed to TRL in its conversational format (prompt messages, assistant answers), so TRL renders
them with the same chat template, after the data stage applied the system-role policy (case C04).
"""

from __future__ import annotations

from typing import Any

from tunegate.recipes.common import Built, Context, load_policy


def pair_columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    """Preference records -> TRL's conversational pair columns: prompt, chosen, rejected."""
    return {
        "prompt": [r["messages"][:-1] for r in rows],
        "chosen": [[r["messages"][-1]] for r in rows],
        "rejected": [[{"role": "assistant", "content": r["rejected"]}] for r in rows],
    }


def unpaired_columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    """KTO rows (and pairs, split into a desirable and an undesirable row) -> prompt, completion, label."""
    cols: dict[str, list] = {"prompt": [], "completion": [], "label": []}
    for r in rows:
        prompt = r["messages"][:-1]
        answers = [(r["messages"][-1], r.get("label", True))]
        if "rejected" in r:
            answers.append(({"role": "assistant", "content": r["rejected"]}, False))
        for answer, label in answers:
            cols["prompt"].append(prompt)
            cols["completion"].append([answer])
            cols["label"].append(bool(label))
    return cols


def tokens_per_epoch(dataset, max_length: int | None = None) -> dict[str, int]:
    """Tokens the policy forwards in one epoch of TRL's tokenized preference dataset, for the compute estimate
    (EU AI Act Article 25 document, tunegate.report.release_docs).

    The pair trainers count no input tokens themselves, and a pair is two sequences: DPO (TRL 1.x columns
    prompt_ids/chosen_ids/rejected_ids) and ORPO (chosen_input_ids/rejected_input_ids) forward prompt + chosen
    and prompt + rejected; KTO (prompt_ids/completion_ids) forwards prompt + completion, plus, when TRL
    computes its KL estimate, prompt + a mismatched completion (KL_completion_ids) without gradients. Each
    sequence is capped at `max_length`, as TRL's collators truncate it.

    Returns {"train_tokens_per_epoch": int} and, for KTO with the KL term, "kl_tokens_per_epoch": int.
    Raises KeyError: none of the known column sets (a TRL version with another layout).
    """
    cap = (lambda n: min(n, max_length)) if max_length else (lambda n: n)
    cols = set(dataset.column_names)
    if {"prompt_ids", "chosen_ids", "rejected_ids"} <= cols:
        total = sum(cap(len(p) + len(c)) + cap(len(p) + len(r)) for p, c, r in
                    zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]))
        return {"train_tokens_per_epoch": total}
    if {"chosen_input_ids", "rejected_input_ids"} <= cols:
        return {"train_tokens_per_epoch": sum(cap(len(c)) + cap(len(r)) for c, r in
                                              zip(dataset["chosen_input_ids"], dataset["rejected_input_ids"]))}
    if {"prompt_ids", "completion_ids"} <= cols:
        out = {"train_tokens_per_epoch": sum(cap(len(p) + len(c)) for p, c in zip(dataset["prompt_ids"], dataset["completion_ids"]))}
        if "KL_completion_ids" in cols:
            out["kl_tokens_per_epoch"] = sum(cap(len(p) + len(c)) for p, c in zip(dataset["prompt_ids"], dataset["KL_completion_ids"]))
        return out
    raise KeyError(f"unknown tokenized preference columns: {sorted(cols)}")


def build(ctx: Context) -> Built:
    from datasets import Dataset

    method = ctx.project.train.method
    kwargs = ctx.trl_args()  # with validation rows: TRL's eval loss and reward margins on them
    kwargs.pop("include_num_input_tokens_seen", None)  # the pair trainers count no input tokens
    model, peft = load_policy(ctx.project, ctx.base, ctx.tokenizer, ctx.base_weights)

    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        train, val = unpaired_columns(ctx.train_rows), unpaired_columns(ctx.val_rows) if ctx.val_rows else None
        n_good = sum(train["label"])
        trainer_cls, args = KTOTrainer, KTOConfig(**kwargs)
        info = {"desirable_rows": n_good, "undesirable_rows": len(train["label"]) - n_good}
    else:
        train, val = pair_columns(ctx.train_rows), pair_columns(ctx.val_rows) if ctx.val_rows else None
        info = {"pairs": len(train["prompt"]), "near_identical_pairs": sum("near_identical" in r["meta"] for r in ctx.train_rows)}
        if method == "dpo":
            from trl import DPOConfig, DPOTrainer

            trainer_cls, args = DPOTrainer, DPOConfig(**kwargs)
        else:
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

            trainer_cls, args = ORPOTrainer, ORPOConfig(**kwargs)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict(train),
        eval_dataset=Dataset.from_dict(val) if val else None,
        processing_class=ctx.tokenizer,
        peft_config=peft,
        callbacks=ctx.callbacks,
    )
    info["train_rows"] = len(next(iter(train.values())))
    info.update(tokens_per_epoch(trainer.train_dataset, getattr(args, "max_length", None)))

    def after(trainer) -> dict[str, Any]:
        """The first and last logged loss and reward margin: DPO starts at ln 2 with margin 0 (case C19)."""
        logs = [r for r in trainer.state.log_history if "loss" in r]
        first, last = (logs[0], logs[-1]) if logs else ({}, {})
        return {"first_loss": first.get("loss"), "first_reward_margin": first.get("rewards/margins"),
                "last_reward_margin": last.get("rewards/margins")}

    return Built(trainer, info, after, trl_kwargs=kwargs)
