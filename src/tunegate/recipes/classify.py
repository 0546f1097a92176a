"""Classification head (`train.method: classify`): one label of a closed set, predicted in one forward pass.

The base model gets a sequence-classification head (transformers' AutoModelForSequenceClassification: for Llama a
`score` layer, hidden -> one logit per label, read at the last non-padding token) and a LoRA/DoRA adapter from
`train.lora` with PEFT's task type SEQ_CLS, which trains the new `score` layer whole and saves it with the adapter
(modules_to_save). transformers' Trainer trains it with cross-entropy over the labels (TRL has no classification
trainer); budget, logging, checkpoints and resume are those of every recipe (recipes.run).

Input: the row's prompt rendered exactly as the eval renders a generation prompt (`data.format.generation_prompt`:
the chat template up to the assistant's turn), cut to data.max_length tokens from the left (the end of the prompt,
where the question and the assistant header are, is kept). Training, eval and the embedded server encode alike
(`encode_prompts`).

Labels (`label_set`): task.labels, else the sorted distinct training answers. Abstention (task.abstain_label):
training rows that hold the abstain label make it one more class; without such rows the head answers the abstain
label when its largest softmax probability is under a threshold (Hendrycks & Gimpel 2017): train.classify.
abstain_threshold when set, else the train.classify.val_abstain_rate quantile of the validation rows' largest
probabilities (tunegate.evals.abstain.tune_threshold).

Saved beside the adapter: tunegate_classify.json (CLASSIFY_FILE: labels, abstain label and threshold, how the
threshold was chosen, max_length). `is_classifier(adapter_dir)` tells a classify adapter from a generation one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from tunegate import TunegateError
from tunegate.core.io import atomic_write_json
from tunegate.data.format import generation_prompt
from tunegate.data.records import reference_answer
from tunegate.evals.abstain import tune_threshold
from tunegate.recipes.common import Built, Context, peft_config

CLASSIFY_FILE = "tunegate_classify.json"  # in the adapter folder: labels, abstention, max_length


def label_key(label: str) -> str:
    """How the head tells labels apart: as the metrics and the data stage do (tunegate.evals.metrics.normalize_answer),
    so 'Card' and 'card' are one class, and the abstain label 'OOS' is task.abstain_label 'oos'."""
    from tunegate.evals.metrics import normalize_answer

    return normalize_answer(label)


def label_set(task, rows: Sequence[dict[str, Any]]) -> list[str]:
    """The head's labels, index = class id: task.labels (with the abstain label when training rows hold it, as one
    more class; without it when none does: it is answered by threshold, not trained), else the distinct answers of
    `rows`, one spelling per `label_key` (the first seen), sorted by it.

    Raises:
        TunegateError: a training answer outside task.labels (and the abstain label), or fewer than 2 labels.
    """
    spelled: dict[str, str] = {}
    for r in rows:
        spelled.setdefault(label_key(reference_answer(r)), reference_answer(r).strip())
    abstain = label_key(task.abstain_label) if task.abstain_label else None
    if task.labels:
        declared = {label_key(x): x for x in task.labels}
        if abstain and abstain in spelled and abstain not in declared:
            declared[abstain] = task.abstain_label
        unknown = sorted(set(spelled) - set(declared))
        if unknown:
            raise TunegateError(f"train.method classify: training answers {unknown[:5]} are not in task.labels; rule: every "
                                "answer is one label of the closed set (add them to task.labels, or relabel with label_map)")
        if abstain and abstain in declared and abstain not in spelled:
            del declared[abstain]
        labels = list(declared.values())
    else:
        labels = [spelled[k] for k in sorted(spelled)]
    if len(labels) < 2:
        raise TunegateError(f"train.method classify: {len(labels)} label(s) ({labels}); rule: a classification head "
                            "needs at least 2 labels (task.labels or the training answers)")
    return labels


def encode_prompts(tokenizer, rows: Sequence[dict[str, Any]], max_length: int) -> list[list[int]]:
    """Each row's generation prompt (the conversation without its final answer, chat template applied) as token
    ids, the last `max_length` of them (left truncation)."""
    return [tokenizer(generation_prompt(tokenizer, r), add_special_tokens=False)["input_ids"][-max_length:] for r in rows]


def load_classifier(base: Path | str, labels: Sequence[str], tokenizer):
    """The base model with a new `score` head of len(labels) outputs (fp32), padding id set (the head reads the
    last non-padding token)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from tunegate.models import quiet_loading

    quiet_loading()
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized": expected, it is the head we train
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base), num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, pad_token_id=tokenizer.pad_token_id, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


def probabilities(model, input_ids: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 16, desc: str | None = None):
    """Softmax over the labels for each prompt: one forward pass per batch, no generation. Returns a float32
    numpy array (N, n_labels), in input order (rows are batched by length, right-padded)."""
    import numpy as np
    import torch

    from tunegate.core.console import progress

    order = sorted(range(len(input_ids)), key=lambda i: len(input_ids[i]))
    out = np.zeros((len(input_ids), model.config.num_labels), dtype=np.float32)
    model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode(), progress(desc or "classifying", len(input_ids)) as advance:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(input_ids[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)  # (B, T)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, :len(input_ids[i])] = torch.tensor(input_ids[i])
                mask[row, :len(input_ids[i])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, n_labels)
            out[idx] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
            advance(len(idx))
    return out


def predict_labels(probs, head: dict[str, Any]) -> tuple[list[str], list[float]]:
    """(label, its probability) per row of `probs` (N, n_labels): the most probable label, or the abstain label
    when that probability is under the head's abstain_threshold."""
    labels, threshold, abstain = head["labels"], head.get("abstain_threshold") or 0.0, head.get("abstain_label")
    answers, top = [], []
    for row in probs:
        best = int(row.argmax())
        p = float(row[best])
        answers.append(abstain if abstain and p < threshold else labels[best])
        top.append(round(p, 6))
    return answers, top


def is_classifier(adapter_dir: Path | str) -> bool:
    """Whether the adapter folder holds a classify run's adapter (its CLASSIFY_FILE)."""
    return (Path(adapter_dir) / CLASSIFY_FILE).is_file()


def read_head(adapter_dir: Path | str) -> dict[str, Any]:
    """The CLASSIFY_FILE of a classify adapter folder."""
    return json.loads((Path(adapter_dir) / CLASSIFY_FILE).read_text(encoding="utf-8"))


def load_trained(base: Path | str, adapter_dir: Path | str, tokenizer):
    """The base model with the trained head and adapter of `adapter_dir` (eval mode, on the inference device).
    Returns (PeftModel, head dict)."""
    from peft import PeftModel

    from tunegate.models import device_name

    head = read_head(adapter_dir)
    model = load_classifier(base, head["labels"], tokenizer)
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    return model.to(device_name()).eval(), head


def build(ctx: Context) -> Built:
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from tunegate.core.console import console
    from tunegate.models import fit_embeddings

    project, tok = ctx.project, ctx.tokenizer
    task, settings = project.task, project.train.classify
    labels = label_set(task, ctx.train_rows)
    index = {label_key(label): i for i, label in enumerate(labels)}
    max_length = project.data.max_length
    abstain = task.abstain_label
    abstain_is_class = bool(abstain) and label_key(abstain) in index
    in_scope_val = [r for r in ctx.val_rows if label_key(reference_answer(r)) in index]

    def columns(rows):
        return {"input_ids": encode_prompts(tok, rows, max_length), "labels": [index[label_key(reference_answer(r))] for r in rows]}

    train_cols = columns(ctx.train_rows)
    val_cols = columns(in_scope_val) if in_scope_val else None
    model = load_classifier(ctx.base, labels, tok)
    fit_embeddings(model, tok, ())  # the vocabulary record saved with the adapter (recipes.run)
    model = get_peft_model(model, peft_config(project))
    kwargs = ctx.trl_args(evaluate=bool(val_cols))
    trainer = Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=Dataset.from_dict(train_cols),
                      eval_dataset=Dataset.from_dict(val_cols) if val_cols else None, processing_class=tok,
                      data_collator=DataCollatorWithPadding(tok), callbacks=ctx.callbacks)
    head: dict[str, Any] = {"labels": labels, "abstain_label": abstain, "abstain_threshold": 0.0,
                            "threshold_rule": "no abstain label (task.abstain_label unset)", "max_length": max_length}

    def after_train(trainer) -> dict[str, Any]:
        """Validation accuracy, and the abstain threshold (fixed, tuned on the validation rows, or none)."""
        val = {}
        if val_cols:
            probs = probabilities(trainer.model, val_cols["input_ids"], tok.pad_token_id,
                                  kwargs["per_device_train_batch_size"], desc="classify: validation rows")
            top = probs.max(axis=1)
            val = {"val_rows": len(val_cols["labels"]),
                   "val_accuracy": round(float((probs.argmax(axis=1) == val_cols["labels"]).mean()), 4)}
        if abstain and settings is not None and settings.abstain_threshold is not None:
            head.update(abstain_threshold=settings.abstain_threshold, threshold_rule="train.classify.abstain_threshold")
        elif abstain_is_class:
            head["threshold_rule"] = f"{abstain} is a trained class (training rows hold it): no threshold"
        elif abstain:
            rate = settings.val_abstain_rate if settings is not None else 0.05
            if not val_cols:
                raise TunegateError("train.method classify: task.abstain_label is set, the training rows hold none, and "
                                    "there are no validation rows to tune the abstain threshold on; rule: set "
                                    "train.classify.abstain_threshold, or data.val_fraction above 0")
            head.update(abstain_threshold=round(tune_threshold(top.tolist(), rate), 6),
                        threshold_rule=f"train.classify.val_abstain_rate {rate:g}: that share of the {len(top)} in-scope "
                                       "validation rows have a largest probability under the threshold")
        console.print(f"classify: {len(labels)} labels; abstain threshold {head['abstain_threshold']:g} ({head['threshold_rule']})"
                      + (f"; validation accuracy {val['val_accuracy']:.3f}" if val else ""))
        return {"classify": {**head, **val}}

    def save(adapter_dir: Path) -> None:
        atomic_write_json(adapter_dir / CLASSIFY_FILE, head)

    info = {"train_rows": len(ctx.train_rows), "labels": len(labels),
            "train_tokens_per_epoch": sum(len(x) for x in train_cols["input_ids"])}
    return Built(trainer, info, after_train=after_train, trl_kwargs=kwargs, save=save)
