"""Train stage: runs the recipe of `train.method` on the data stage's rows and saves what it trained.

The body is `tunegate.recipes.run.run_training` (shared with the audit's LoRA probe): the settings passed
through to PEFT and TRL are checked (`recipes.defaults.check_passthrough`), the preflight runs, the recipe's TRL trainer
trains (bf16 autocast where the device supports it, fp32 otherwise) and resumes from the last checkpoint in
`.train.checkpoints/` after a kill.

Writes: preflight.json (tunegate.preflight: anti-patterns, mask rejections, target modules), adapter/ (PEFT
format; `model/` instead for `adapter: full`), metrics.jsonl (every logged step), loss.png, train_summary.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunegate.core.stage import Stage, StageResult, StageSpec, config_sections
from tunegate.recipes.run import run_training


def run(st: Stage) -> StageResult:
    return StageResult(metrics=run_training(st, st.upstream_dir("data")) or {})


def inputs(project) -> dict[str, Path]:
    """Files outside the run the recipe reads: an adapter to continue from, GRPO's schema and verifier file, and
    a local teacher's weights (a retrained teacher reruns the stage)."""
    t, files = project.train, {}
    if t.init_adapter is not None:
        files["init_adapter"] = t.init_adapter / "adapter_model.safetensors"
    if t.grpo is not None:
        if t.grpo.json_schema is not None:
            files["grpo_json_schema"] = t.grpo.json_schema
        if ":" in t.grpo.verifier or t.grpo.verifier.endswith(".py"):  # a verifier file of the project
            files["grpo_verifier"] = project.root / t.grpo.verifier.split(":")[0]
    if t.distillation is not None and Path(t.distillation.teacher).is_dir():
        teacher = Path(t.distillation.teacher)
        for i, w in enumerate(sorted(teacher.glob("*.safetensors")) or [teacher / "config.json"]):
            files[f"teacher{i}"] = w
    return files


def config(project) -> dict[str, Any]:
    """base_model and train; for method classify also the task (its labels and abstain label make the head's classes
    and threshold), left out for the other methods so their fingerprints stay as they were."""
    view = config_sections("base_model", "train")(project)
    if project.train.method == "classify" and project.task is not None:
        view["task"] = project.task.model_dump(mode="json")
    return view


SPEC = StageSpec(name="train", run=run, upstream=("data",), config=config, inputs=inputs,
                 checkpoints=True, distributed=True)
