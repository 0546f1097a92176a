"""Merge a trained adapter into its base model, published only when the merge reproduces the adapter (case C13).

vLLM refuses DoRA magnitude vectors (docs/design.md#vllm; case C16 in docs/cases.md), so a DoRA adapter is merged before vLLM
serves it. A merge can silently change outputs (a wrong scaling, a tied embedding, a DoRA norm taken on the
wrong weight), so `merge_adapter` measures it: in fp32, the same prompts go through the PeftModel (adapter
unmerged) and through the model after `merge_and_unload()`, comparing every position's logits and the greedy
completions. Only a merge within tolerance is renamed into the output folder, with `merge_check.json`
beside the weights; a merge outside it raises and leaves the output folder as it was.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from tunegate import TunegateError
from tunegate.core.io import atomic_write_json, check_replaceable, clean_stale, publish_dir, read_jsonl, staging_dir
from tunegate.core.manifest import sha256_file

# fp32 merge error is rounding only: W x + s B (A x) versus (W + s B A) x differ by reassociation, ~1e-7
# relative per matmul, growing with depth and logit scale. Measured on the tiny 2-layer test model (fp32, CPU,
# torch 2.13 / peft 0.21.2): 6e-7 (LoRA) and 5e-7 (DoRA) after 4 training steps, 1.9e-6 for both with random,
# large B matrices. A 30-layer model with logits of ~10-30 has more rounding (still well under 1e-4 by the same
# estimate); a real wrong merge (a scale off by alpha/r, a dropped magnitude vector) moves logits by 1e-2 and
# more. 1e-3 sits between the two with an order of magnitude or more either side.
DEFAULT_ATOL = 1e-3
MERGE_CHECK = "merge_check.json"


def adapter_digests(adapter_dir: Path) -> dict[str, str]:
    """sha256 of the adapter's weights and config, keyed by file name."""
    return {
        name: sha256_file(adapter_dir / name)
        for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
        if (adapter_dir / name).is_file()
    }


def _check_adapter(adapter_dir: Path) -> None:
    if not (adapter_dir / "adapter_config.json").is_file():
        raise TunegateError(f"{adapter_dir / 'adapter_config.json'}: no adapter there (run `tunegate train` first)")
    if not any((adapter_dir / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")):
        raise TunegateError(f"{adapter_dir / 'adapter_model.safetensors'}: the adapter has a config but no weights")


def _logits(model, tokenizer, prompts: Sequence[str]) -> list:
    """Per prompt, the logits at every position, unpadded: a list of (T_i, V) float32 tensors on the CPU."""
    import torch

    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = tokenizer(p, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)  # (1, T)
            out.append(model(input_ids=ids).logits[0].float().cpu())  # (T, V)
    return out


def merge_adapter(
    base: Path | str,
    adapter_dir: Path | str,
    out_dir: Path | str,
    prompts: Sequence[str],
    atol: float = DEFAULT_ATOL,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    base_label: str | None = None,
) -> dict[str, Any]:
    """Merge `adapter_dir` (PEFT LoRA or DoRA) into `base` and publish it to `out_dir` if it is faithful.

    Tolerance: the merge is accepted when, on every prompt and position, max |logit(merged) - logit(unmerged)|
    <= `atol` (default 1e-3, fp32) and every greedy completion (`max_new_tokens`) is the identical text.
    Both are computed in float32 on the same model object (before and after `merge_and_unload()`), with TF32
    matmuls off on a GPU, so the only expected difference is rounding (measured <= 2e-6 on the tiny model).

    Args:
        base: a folder or hub id `from_pretrained` reads (see `models.resolve_base_model`).
        adapter_dir: PEFT adapter folder (adapter_config.json + adapter_model.safetensors). One trained with
            `train.added_tokens` merges onto the base grown to its recorded vocabulary (models.fit_to_adapter): the
            merged model has the grown embedding (config vocab_size), the adapter's tokenizer and its record.
        out_dir: where the merged model goes; it appears whole (safetensors, tokenizer, chat template,
            `generation_config.json` whose eos ids include the end-of-turn token, `merge_check.json`) or not at all. An existing folder is replaced only by a merge that passes.
        prompts: rendered prompts (chat template applied, generation prompt added), e.g. golden prompts.
        base_label: how `merge_check.json` names the base model (default: str(base)).

    Returns:
        The merge check (what `merge_check.json` holds).

    Raises:
        TunegateError: no adapter in `adapter_dir`, no prompts, `out_dir` exists and holds no merge_check.json (not an
            earlier merge), or the merge is outside tolerance (the message
            names the max difference, the tolerance and the first differing prompt; nothing is written).
    """
    import torch
    from peft import PeftModel

    from tunegate.data.format import stop_token_ids
    from tunegate.evals.generate import generate
    from tunegate.models import VOCAB_RECORD, device_name, fit_to_adapter, load_adapter_tokenizer, load_model, write_stop_tokens
    from tunegate.recipes.lean_adapter import use_lean_forward

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    check_replaceable(out_dir, MERGE_CHECK, "merged model")  # never another folder's files
    clean_stale(out_dir)  # what a killed export left beside the merge (core.io)
    _check_adapter(adapter_dir)
    prompts = list(prompts)
    if not prompts:
        raise TunegateError("merge check: no prompts to compare the merged model on")

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        tokenizer = load_adapter_tokenizer(adapter_dir, base)  # with the adapter's train.added_tokens, if any
        # the base model's embeddings grown first for the added tokens' rows (models.fit_to_adapter)
        model = PeftModel.from_pretrained(fit_to_adapter(load_model(base, dtype=torch.float32), adapter_dir), str(adapter_dir))
        model = model.to(device_name()).eval()
        # the forward the embedded server runs unmerged (recipes.lean_adapter: DoRA's weight norm once, not per step)
        use_lean_forward(model)
        before_logits = _logits(model, tokenizer, prompts)
        before_text = generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc="greedy, adapter unmerged")
        merged = model.merge_and_unload().eval()
        after_logits = _logits(merged, tokenizer, prompts)
        after_text = generate(merged, tokenizer, prompts, max_new_tokens, batch_size, desc="greedy, merged")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32

    diffs = [(a - b).abs().max().item() for a, b in zip(after_logits, before_logits)]
    max_diff = max(diffs)
    same = [a == b for a, b in zip(after_text, before_text)]
    check = {
        "max_abs_logit_diff": max_diff,
        "tolerance": {"max_abs_logit_diff": atol, "greedy_identical": "all prompts", "dtype": "float32"},
        "greedy_identical": sum(same),
        "n": len(prompts),
        "passed": max_diff <= atol and all(same),
        "max_new_tokens": max_new_tokens,
        "prompts": [
            {"prompt": p, "max_abs_logit_diff": d, "unmerged": u, "merged": m}
            for p, d, u, m in zip(prompts, diffs, before_text, after_text)
        ],
        "adapter": str(adapter_dir),
        "adapter_sha256": adapter_digests(adapter_dir),
        "adapter_type": "DoRA" if getattr(model.peft_config.get("default"), "use_dora", False) else "LoRA",
        "base_model": base_label or str(base),
        "peft_version": metadata.version("peft"),
        "torch_version": torch.__version__,
        "transformers_version": metadata.version("transformers"),
        "device": device_name(),
    }
    if not check["passed"]:
        bad = next(i for i, (d, s) in enumerate(zip(diffs, same)) if d > atol or not s)
        raise TunegateError(
            f"merge refused: max |logit difference| {max_diff:.3g} (tolerance {atol:g}), greedy outputs identical on "
            f"{sum(same)}/{len(prompts)} prompts; first differing prompt #{bad} "
            f"(|diff| {diffs[bad]:.3g}): {prompts[bad][-120:]!r}; merged {after_text[bad]!r} vs adapter "
            f"{before_text[bad]!r}. Nothing was written to {out_dir}"
        )

    tmp = staging_dir(out_dir)
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)  # tokenizer_config.json / chat_template.jinja carry the chat template
        write_stop_tokens(tmp, stop_token_ids(tokenizer), tokenizer.pad_token_id)  # eos and end of turn
        if (adapter_dir / VOCAB_RECORD).is_file():  # the vocabulary it was trained with (its config's vocab_size)
            shutil.copyfile(adapter_dir / VOCAB_RECORD, tmp / VOCAB_RECORD)
        atomic_write_json(tmp / MERGE_CHECK, check)
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return check


def export_run(project, run_id: str = "default", out_dir: Path | None = None, n_prompts: int = 8,
               atol: float = DEFAULT_ATOL) -> tuple[Path, dict[str, Any]]:
    """`merge_run` on run `run_id`; default output runs/<id>/export/merged. Raises TunegateError as `merge_run`,
    or for a run id that is not an identifier."""
    run_dir = project.run_dir(run_id)
    target = Path(out_dir) if out_dir is not None else run_dir / "export" / "merged"
    return target, merge_run(project, run_dir, target, n_prompts, atol)


def refuse_abstaining(run_dir: Path) -> None:
    """Raise TunegateError when the run's eval gate measured its candidate with eval.abstain: a merged or GGUF model
    would answer without that threshold. Decided by the eval manifest's outputs too, so deleting eval/abstain.json
    does not lift it."""
    from tunegate.core.manifest import read_manifest
    from tunegate.evals.abstain import ABSTAIN_FILE, read_rule

    ev = read_manifest(Path(run_dir) / "eval")
    rule = read_rule(Path(run_dir) / "eval")
    if rule is None and (ev is None or ABSTAIN_FILE not in ev.outputs):
        return
    what = (f"answers under a confidence of {rule['threshold']:g} become {rule['abstain_label']!r}" if rule
            else f"its manifest records {ABSTAIN_FILE}")
    raise TunegateError(f"{Path(run_dir) / 'eval'}: the eval gate measured this adapter with eval.abstain ({what}); rule: a "
                        "merged or GGUF model would answer without that threshold, so it is not exported; serve the release "
                        "bundle with the embedded engine (`tunegate serve`), which applies it")


def merge_run(project, run_dir: Path, out_dir: Path, n_prompts: int = 8, atol: float = DEFAULT_ATOL) -> dict[str, Any]:
    """Merge the run folder's `train/adapter` into the project's base model, checked on its first `n_prompts`
    golden prompts (`run_dir/data/golden.jsonl`), and publish it to `out_dir` (`merge_adapter`).

    Returns the merge check. Raises TunegateError naming the file that is missing, when the project's base_model is
    not the one the train manifest records, when the adapter is a classification head (train.method classify) or its
    eval gate applied an abstain threshold (eval.abstain), or when the merge is refused.
    """
    from tunegate.data.format import generation_prompt
    from tunegate.models import load_adapter_tokenizer, resolve_base_model

    from tunegate.core.manifest import read_manifest

    from tunegate.recipes.classify import is_classifier

    run_dir = Path(run_dir)
    adapter_dir = run_dir / "train" / "adapter"
    if is_classifier(adapter_dir):
        raise TunegateError(f"{adapter_dir}: a classification head (train.method classify) is not merged or exported; rule: "
                            "the merge check and GGUF export compare generations, and a head writes no text; serve the "
                            "release bundle with the embedded engine (`tunegate serve`)")
    refuse_abstaining(run_dir)
    train = read_manifest(run_dir / "train")
    trained_on = train.config.get("base_model", project.base_model) if train is not None else project.base_model
    if trained_on != project.base_model:
        raise TunegateError(
            f"{project.source_file}: base_model is {project.base_model}, but run {run_dir.name!r} was trained on "
            f"{trained_on}; rule: an adapter is merged into the base model it was trained on (set base_model back)"
        )
    if not (adapter_dir / "adapter_config.json").is_file():
        raise TunegateError(
            f"{adapter_dir / 'adapter_config.json'} not found: run {run_dir.name!r} has no trained adapter "
            f"(run `tunegate train` or `tunegate run` first)"
        )
    golden_path = run_dir / "data" / "golden.jsonl"
    if not golden_path.is_file():
        raise TunegateError(f"{golden_path} not found: the merge check needs the run's golden prompts (run `tunegate data`)")
    rows = read_jsonl(golden_path)
    if not rows:
        raise TunegateError(f"{golden_path}: no golden rows to check the merge on")
    base = resolve_base_model(project.base_model)
    tokenizer = load_adapter_tokenizer(adapter_dir, base)
    prompts = [generation_prompt(tokenizer, r) for r in rows[:n_prompts]]
    return merge_adapter(
        base, adapter_dir, out_dir, prompts, atol=atol,
        max_new_tokens=project.eval.max_new_tokens, batch_size=project.eval.batch_size, base_label=project.base_model,
    )
