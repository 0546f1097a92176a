"""Distillation: a small student learns from a larger teacher.

- `sequence` (Kim & Rush 2016, "Sequence-Level Knowledge Distillation"): the teacher answers every training
  (and validation) prompt greedily; the student is trained on those answers with the SFT recipe. Works for
  any teacher, any tokenizer. The teacher's answers are written to `teacher_answers.jsonl` (and kept in the
  checkpoint folder, so a resumed run does not generate them again).
- `logits` (Agarwal et al. 2024, "On-Policy Distillation of Language Models", GKD; TRL's DistillationTrainer):
  the student samples answers and matches the teacher's next-token distributions on them (generalised JSD,
  `train.trl.beta`). Needs the same vocabulary: a teacher whose tokenizer differs is refused before training.
"""

from __future__ import annotations

from typing import Any

from tunegate import TunegateError
from tunegate.core.io import atomic_write_jsonl, read_jsonl
from tunegate.core.console import console
from tunegate.recipes.common import Built, Context, load_policy
from tunegate.recipes.sft import build as build_sft


def teacher_answers(ctx: Context, rows: list[dict[str, Any]], teacher, teacher_tokenizer) -> list[dict[str, Any]]:
    """`rows` with their final assistant turn replaced by the teacher's greedy answer (meta keeps the original).

    An empty answer is left out (nothing to learn from), and so is one that spells a control token of the
    student's tokenizer (rule `control_token` of the data stage, tunegate.data.format.control_token_problem:
    the teacher may write an added token its own decoding kept); the count is printed."""
    from tunegate.core.console import console
    from tunegate.data.format import control_token_problem, generation_prompt, special_tokens
    from tunegate.evals.generate import generate

    dcfg = ctx.project.train.distillation
    prompts = [generation_prompt(teacher_tokenizer, r) for r in rows]
    answers = generate(teacher, teacher_tokenizer, prompts, dcfg.max_new_tokens, dcfg.batch_size, "teacher answers")
    specials = special_tokens(ctx.tokenizer)
    out, forged = [], 0
    for r, a in zip(rows, answers):
        if not a.strip():
            continue
        if control_token_problem(specials, fields={"teacher answer": a}):
            forged += 1
            continue
        meta = {**r["meta"], "original_answer": r["messages"][-1]["content"]}
        out.append({**r, "messages": [*r["messages"][:-1], {"role": "assistant", "content": a.strip()}], "meta": meta})
    if forged:
        console.print(f"[yellow]{forged} teacher answer(s) spell a control token of the student's tokenizer: left out "
                      f"(rule control_token)[/yellow]")
    return out


def _main_process_first():
    import contextlib

    from tunegate.core.stage import distributed_rank

    if distributed_rank()[1] == 1:
        return contextlib.nullcontext()
    from accelerate import PartialState

    return PartialState().main_process_first()


def _load_teacher(ctx: Context):
    from tunegate.models import load_inference_model, load_tokenizer, resolve_base_model

    path = resolve_base_model(ctx.project.train.distillation.teacher)
    return load_inference_model(path), load_tokenizer(path)


def build(ctx: Context) -> Built:
    dcfg = ctx.project.train.distillation
    if dcfg.mode == "sequence":
        cache = ctx.st.checkpoint_dir / "teacher_answers.jsonl"
        with _main_process_first():  # several processes: rank 0 generates, the others read its answers
            if cache.is_file():
                rows = read_jsonl(cache)
                console.print(f"teacher answers: {len(rows)} read back from {cache}")
            else:
                teacher, teacher_tok = _load_teacher(ctx)
                rows = teacher_answers(ctx, ctx.train_rows + ctx.val_rows, teacher, teacher_tok)
                del teacher
                if not rows:
                    raise TunegateError(f"train.distillation.teacher {dcfg.teacher} gave an empty answer to all "
                                        f"{len(ctx.train_rows) + len(ctx.val_rows)} prompts: nothing to distil")
                ctx.st.checkpoint_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_jsonl(cache, rows)
        atomic_write_jsonl(ctx.st.dir / "teacher_answers.jsonl", rows)
        val_ids = {r["id"] for r in ctx.val_rows}
        n_asked = len(ctx.train_rows) + len(ctx.val_rows)
        ctx.train_rows = [r for r in rows if r["id"] not in val_ids]
        ctx.val_rows = [r for r in rows if r["id"] in val_ids]
        built = build_sft(ctx)
        built.info.update(teacher=dcfg.teacher, mode="sequence", teacher_answers=len(rows), teacher_empty_answers=n_asked - len(rows))
        return built

    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    teacher, teacher_tok = _load_teacher(ctx)
    if teacher_tok.get_vocab() != ctx.tokenizer.get_vocab():
        raise TunegateError(f"train.distillation.teacher {dcfg.teacher}: its tokenizer differs from the student's, so logits "
                            "cannot be compared token by token; use `mode: sequence` (the teacher's answers as text)")
    kwargs = ctx.trl_args(evaluate=False)
    kwargs.pop("include_num_input_tokens_seen", None)
    model, peft = load_policy(ctx.project, ctx.base, ctx.tokenizer, ctx.base_weights)
    ctx.tokenizer.padding_side = "left"  # TRL's DistillationTrainer generates with the student
    trainer = DistillationTrainer(
        model=model,
        teacher_model=teacher,
        args=DistillationConfig(**kwargs),
        train_dataset=Dataset.from_dict({"prompt": [r["messages"][:-1] for r in ctx.train_rows]}),
        processing_class=ctx.tokenizer,
        peft_config=peft,
        callbacks=ctx.callbacks,
    )
    return Built(trainer, {"train_rows": len(ctx.train_rows), "teacher": dcfg.teacher, "mode": "logits"}, trl_kwargs=kwargs)
