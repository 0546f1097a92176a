"""Training recipes, one module per objective, each reading top to bottom (TRL + PEFT underneath).

    sft.py           demonstrations (LoRA, DoRA, QLoRA, full): TRL's SFTTrainer, tunegate's loss mask
    cpt.py           continued pretraining on raw text, packed into max_length blocks; held-out perplexity
    preference.py    DPO (pairs), ORPO (pairs, no reference), KTO (unpaired thumbs)
    grpo.py          GRPO against a verifier (tunegate.verifiers), with the reward-variance checks (C18 in docs/cases.md)
    distill.py       distillation: sequence-level (teacher answers, then SFT) or logit-level (GKD)
    classify.py      a sequence-classification head + LoRA/DoRA (PEFT SEQ_CLS), transformers' Trainer: one label
                     of a closed set per forward pass, abstention by probability threshold

Every recipe is `build(ctx: common.Context) -> common.Built`: it returns the trainer (TRL's; classify: transformers'), facts for the
summary, and what to do after training; `tunegate.recipes.run.run_training` (the train stage's body and the
audit's probe) runs it, resumes, and saves.
"""

RECIPES = {
    "sft": "sft",
    "cpt": "cpt",
    "dpo": "preference",
    "kto": "preference",
    "orpo": "preference",
    "grpo": "grpo",
    "distillation": "distill",
    "classify": "classify",
}


def recipe(method: str):
    """The module whose `build(ctx)` trains `method`."""
    import importlib

    return importlib.import_module(f"tunegate.recipes.{RECIPES[method]}")
