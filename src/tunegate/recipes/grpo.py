"""GRPO: reinforcement fine-tuning against a verifier, through TRL's GRPOTrainer.

Shao et al. 2024 ("DeepSeekMath", Group Relative Policy Optimization): for each prompt the policy samples
`num_generations` answers; each answer's advantage is its reward minus the group's mean (scaled by the
group's std). The reward is a verifier (tunegate.verifiers) scoring the answer against the row's reference
(its final assistant turn; for a row with tools, its expected calls: records.reference_answer).

Case C18 in docs/cases.md is checked three ways:
- before anything loads: `num_generations` >= 2 (one generation has no group to compare with), checked by
  TRL's GRPOConfig through `recipes.defaults.check_passthrough` and by the preflight;
- a smoke batch before training: `grpo.smoke_prompts` prompts, `num_generations` samples each, scored by
  the verifier; when every group's reward is constant, every advantage is 0 and training would learn nothing,
  so the run stops before it starts (TunegateError);
- at run time: TRL logs `frac_reward_zero_std`; above `grpo.max_zero_variance_fraction` for `grpo.patience`
  logged steps in a row, the run warns (and stops with `grpo.stop_on_zero_variance`).
Held-out reward (greedy answers to the validation rows, scored by the verifier) is measured before and
after training: `heldout_reward_before`, `heldout_reward_after`.
"""

from __future__ import annotations

import json
from typing import Any

from tunegate import TunegateError
from tunegate.core.console import console
from tunegate.recipes.common import Built, Context, load_policy


def prompts(rows: list[dict[str, Any]], tokenizer) -> list:
    """Each row's prompt: its messages without the answer (TRL renders them through the chat template), or, when
    any row carries `tools` (tool calling), every prompt as the text `format.generation_prompt` renders, since TRL's
    rendering knows no per-row function schemas (its `tools` are callables it runs)."""
    from tunegate.data.format import generation_prompt

    if any("tools" in r for r in rows):
        return [generation_prompt(tokenizer, r) for r in rows]
    return [r["messages"][:-1] for r in rows]


def columns(rows: list[dict[str, Any]], tokenizer=None) -> dict[str, list]:
    """Chat records -> GRPO columns: prompt (`prompts`; messages without the answer when no tokenizer is given),
    reference (records.reference_answer: the final assistant turn, or a tool row's expected calls), row_json."""
    from tunegate.data.records import reference_answer

    return {
        "prompt": prompts(rows, tokenizer) if tokenizer is not None else [r["messages"][:-1] for r in rows],
        "reference": [reference_answer(r) for r in rows],
        "row_json": [json.dumps(r, ensure_ascii=False) for r in rows],
    }


def sample(model, tokenizer, prompts: list, n: int, max_new_tokens: int, temperature: float) -> list[list[str]]:
    """`n` sampled answers per prompt, chat messages or rendered text (the policy's own sampling, as GRPO does).
    Returns one list per prompt."""
    import torch

    from tunegate.data.format import stop_token_ids

    tokenizer.padding_side = "left"
    texts = [p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    with torch.inference_mode():
        out = model.generate(**batch, do_sample=True, temperature=temperature, top_p=1.0, top_k=0, num_return_sequences=n,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=stop_token_ids(tokenizer))
    new = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [new[i * n : (i + 1) * n] for i in range(len(prompts))]


def heldout_reward(model, tokenizer, verifier, rows: list[dict[str, Any]], max_new_tokens: int) -> float | None:
    """Mean verifier score of greedy answers to `rows` (None without rows)."""
    if not rows:
        return None
    from tunegate.data.format import generation_prompt
    from tunegate.evals.generate import generate

    answers = generate(model, tokenizer, [generation_prompt(tokenizer, r) for r in rows], max_new_tokens, 16, "held-out reward")
    from tunegate.data.records import reference_answer

    return sum(verifier.score(a, reference_answer(r), r) for a, r in zip(answers, rows)) / len(rows)


def zero_variance_watch(cfg):
    """A TrainerCallback for case C18 at run time (see the module docstring)."""
    from transformers import TrainerCallback

    class ZeroVarianceWatch(TrainerCallback):
        def __init__(self):
            self.streak = 0
            self.warned_at: list[int] = []

        def on_log(self, args, state, control, logs=None, **kw):
            frac = (logs or {}).get("frac_reward_zero_std")
            if frac is None:
                return
            self.streak = self.streak + 1 if frac > cfg.max_zero_variance_fraction else 0
            if self.streak >= cfg.patience:
                self.warned_at.append(state.global_step)
                console.print(f"[yellow]GRPO: {frac:.0%} of groups had zero reward variance for {self.streak} logged steps "
                              f"(> {cfg.max_zero_variance_fraction:.0%}): those prompts give no gradient. Make the task "
                              f"easier or the verifier give partial credit, or raise num_generations / temperature[/yellow]")
                self.streak = 0
                if cfg.stop_on_zero_variance:
                    control.should_training_stop = True

    return ZeroVarianceWatch()


def build(ctx: Context) -> Built:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from tunegate.verifiers import build_verifier, reward_function, reward_variance_smoke

    project, gcfg = ctx.project, ctx.project.train.grpo
    verifier = build_verifier(gcfg, project.root)
    kwargs = ctx.trl_args(evaluate=False)  # held-out reward is measured here, greedy; GRPO's eval would sample
    kwargs.pop("include_num_input_tokens_seen", None)
    model, peft = load_policy(project, ctx.base, ctx.tokenizer, ctx.base_weights)
    from tunegate.data.format import stop_token_ids
    from tunegate.models import device_name

    # TRL's GRPOTrainer ends each sampled completion at the policy's generation_config eos ids: with an eos
    # that is not the end-of-turn token, completions would run past the answer to max_completion_length.
    model.generation_config.eos_token_id = stop_token_ids(ctx.tokenizer)

    if project.train.adapter != "qlora":  # a 4-bit model is placed on the GPU when it loads
        model = model.to(device_name())  # the smoke batch and held-out reward generate on the GPU when there is one

    # C18 smoke batch: does the reward vary within groups at all, on the starting policy?
    n, max_new = int(kwargs["num_generations"]), int(kwargs["max_completion_length"])
    smoke_rows = ctx.train_rows[: gcfg.smoke_prompts]
    from tunegate.data.records import reference_answer

    groups = sample(model, ctx.tokenizer, prompts(smoke_rows, ctx.tokenizer), n, max_new, float(kwargs.get("temperature", 1.0)))
    scores = [[verifier.score(a, reference_answer(r), r) for a in g] for g, r in zip(groups, smoke_rows)]
    smoke = reward_variance_smoke(scores)
    smoke["mean_reward"] = sum(map(sum, scores)) / sum(map(len, scores))
    console.print(f"GRPO smoke batch: {smoke['groups']} prompts x {n} samples, mean reward {smoke['mean_reward']:.3f}, "
                  f"{smoke['zero_variance_groups']} group(s) with zero reward variance")
    if smoke["fraction"] == 1.0:
        raise TunegateError(
            f"GRPO smoke batch: the verifier {verifier.name!r} gave the same reward to every answer within each of "
            f"{smoke['groups']} groups (mean {smoke['mean_reward']:.3f}); every advantage would be 0 and training would "
            "learn nothing (case C18). Check the verifier against real answers, make the task easier (SFT first), or "
            "raise num_generations / temperature."
        )

    before = heldout_reward(model, ctx.tokenizer, verifier, ctx.val_rows, max_new)
    watch = zero_variance_watch(gcfg)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_function(verifier),
        args=GRPOConfig(**kwargs),
        train_dataset=Dataset.from_dict(columns(ctx.train_rows, ctx.tokenizer)),
        processing_class=ctx.tokenizer,
        peft_config=peft,
        callbacks=[*ctx.callbacks, watch],
    )

    def after(trainer) -> dict[str, Any]:
        ctx.tokenizer.padding_side = "left"
        rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
        return {
            "verifier": verifier.info(),
            "smoke": smoke,
            "first_reward": rewards[0] if rewards else None,
            "last_reward": rewards[-1] if rewards else None,
            "zero_variance_warnings_at_steps": watch.warned_at,
            "heldout_reward_before": before,
            "heldout_reward_after": heldout_reward(trainer.model, ctx.tokenizer, verifier, ctx.val_rows, max_new),
        }

    return Built(trainer, {"train_rows": len(ctx.train_rows), "verifier": verifier.name}, after, trl_kwargs=kwargs)
