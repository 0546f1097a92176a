"""GGUF export with a parity gate: the run's model as GGUF files for llama.cpp and Ollama, kept only when llama.cpp
answers the frozen golden set as the PEFT adapter did.

A fine-tune that works in Python and rambles or never stops after export is the common failure of GGUF exports:
the chat template or the stop tokens did not travel (cases C01 and C16 in docs/cases.md are the same kind in
vLLM). So every file is checked before anything is published:

1. The merged model (tunegate.export, itself checked against the adapter in fp32) is converted with llama.cpp's
   own `convert_hf_to_gguf.py` (tunegate.llama_env: the converter and the runtime come from one pinned llama.cpp),
   which writes the chat template (`tokenizer.chat_template`) and the eos / end-of-turn ids into the file's
   metadata. k-quant types (q4_k_m, ...) are quantized from the f16 file by llama.cpp's quantizer.
2. Each file answers the golden prompts in llama.cpp (tunegate.llama_worker: `Llama.create_chat_completion`, greedy,
   the GGUF's own template) with eval.max_new_tokens, and the answers are compared with the PEFT adapter's answers
   the eval stage recorded (eval/samples.jsonl). The parity gate's rules, each PASS or FAIL in `verdict.json`:
   - `prompt_identical`: on every row, the prompt token ids llama.cpp fed the model are the ids training's chat
     template gives (tokenizer.apply_chat_template, then the Hugging Face tokenizer);
   - `stops`: on every row where the adapter's answer ended before max_new_tokens, llama.cpp's ended at an
     end-of-generation token (or the template's stop string), not at the length limit;
   - `metric_tolerance`: for each golden metric (eval.metrics), |mean(GGUF) - mean(adapter)| <= the tolerance
     (release.gguf.tolerance, default 0.02), with the paired bootstrap 95% CI of the difference beside it.
   The fraction of answers identical to the adapter's (with a bootstrap CI) is reported, not gated.
3. An Ollama `Modelfile`: FROM the smallest file, the chat template as an Ollama TEMPLATE when the model's template
   is ChatML (checked by rendering every golden prompt both ways; otherwise Ollama reads the GGUF's own template
   and the Modelfile says so), the project's system prompt as SYSTEM, the stop strings, and temperature 0 (the
   gate measured greedy answers).

Everything is written into a staging folder and published whole (core.io.publish_dir): runs/<id>/export/gguf/ by
`tunegate export --format gguf`, or the bundle's gguf/ folder by the release stage with `release.gguf` set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tunegate import EXIT_GATE_FAILED, TunegateError
from tunegate.config import GGUF_CONVERTER_TYPES, GgufConfig
from tunegate.core.console import console
from tunegate.core.io import atomic_write_json, atomic_write_text, check_replaceable, publish_dir, read_jsonl, staging_dir
from tunegate.core.process import child_dies_with_parent, venv_python
from tunegate.core.manifest import read_manifest, sha256_file
from tunegate.llama_env import LLAMA_CPP_PYTHON, converter, find_venv, installed_version

VERDICT = "verdict.json"
MODELFILE = "Modelfile"
WORKER = Path(__file__).with_name("llama_worker.py")
STEP_TIMEOUT_S = 3600  # default for one conversion or golden-set pass (release.gguf.timeout_s); the quickstart: 5-40 s here


def gguf_file_name(project_name: str, gguf_type: str) -> str:
    """`<project>-<type>.gguf` (project names are identifiers: core.paths.IDENTIFIER)."""
    return f"{project_name}-{gguf_type}.gguf"


# ------------------------------------------------------------------------------------------------ convert


def _run_logged(cmd: list[str], log: Path, what: str, env: dict[str, str] | None = None,
                timeout: float = STEP_TIMEOUT_S) -> None:
    """Run `cmd` with its output appended to `log`. Raises TunegateError with the log's last lines on failure."""
    with open(log, "a", encoding="utf-8") as f:
        f.write("+ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False,
                                preexec_fn=child_dies_with_parent()).returncode  # a killed tunegate takes llama.cpp with it
        except subprocess.TimeoutExpired:
            rc = None
    if rc != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-12:])
        why = f"timed out after {timeout:.0f} s" if rc is None else f"exit status {rc}"
        raise TunegateError(f"{what} failed ({why}); the last lines of {log}:\n{tail}")


def convert(model_dir: Path, out_file: Path, gguf_type: str, venv: Path, log: Path, threads: int,
            timeout_s: float = STEP_TIMEOUT_S, f16: Path | None = None) -> float:
    """Write the Hugging Face model folder `model_dir` (safetensors, tokenizer, chat template) as the GGUF file
    `out_file` of `gguf_type` (tunegate.config.GGUF_CONVERTER_TYPES by llama.cpp's converter, the others by its
    quantizer from the f16 file `f16`, or from one written first beside `out_file` and deleted). Each step is
    stopped after `timeout_s` seconds. Returns the seconds it took.

    Raises:
        TunegateError: the converter or quantizer failed or timed out (the message has the last lines of `log`).
    """
    t0 = time.perf_counter()
    if gguf_type in GGUF_CONVERTER_TYPES:
        script, env = converter(venv)
        _run_logged([sys.executable, str(script), str(model_dir), "--outtype", gguf_type, "--outfile", str(out_file)],
                    log, f"convert_hf_to_gguf.py --outtype {gguf_type}", env, timeout_s)
        return time.perf_counter() - t0
    source = f16 or out_file.with_name(out_file.name + ".f16-source.gguf")
    try:
        if f16 is None:
            convert(model_dir, source, "f16", venv, log, threads, timeout_s)
        request = {"task": "quantize", "input": str(source), "output": str(out_file), "type": gguf_type, "threads": threads}
        _worker(venv, request, out_file.with_name(out_file.name + ".quantize.jsonl"), log, f"quantize to {gguf_type}", timeout_s)
    finally:
        if f16 is None:
            source.unlink(missing_ok=True)
        out_file.with_name(out_file.name + ".quantize.jsonl").unlink(missing_ok=True)
    return time.perf_counter() - t0


def _worker(venv: Path, request: dict[str, Any], out: Path, log: Path, what: str,
            timeout_s: float = STEP_TIMEOUT_S) -> list[dict[str, Any]]:
    """Run tunegate.llama_worker in the llama.cpp environment; returns the lines it wrote to `out`."""
    req = out.with_name(out.name + ".request.json")
    atomic_write_json(req, request)
    try:
        _run_logged([str(venv_python(venv)), str(WORKER), str(req), str(out)], log, f"llama.cpp ({what})", timeout=timeout_s)
    finally:
        req.unlink(missing_ok=True)
    return read_jsonl(out)


# ------------------------------------------------------------------------------------------------ parity


def _inputs(project, run_dir: Path, max_rows: int | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(golden rows, the eval stage's samples for them): the rows the eval stage scored, in its order, checked
    against the eval manifest's sha256 of samples.jsonl, with the eval settings (`base_model`, `eval:`) the project
    has now, so llama.cpp answers as the adapter did. Raises TunegateError naming the file."""
    samples_path, golden_path = run_dir / "eval" / "samples.jsonl", run_dir / "data" / "golden.jsonl"
    manifest = read_manifest(run_dir / "eval")
    if manifest is None or "samples.jsonl" not in manifest.outputs:
        raise TunegateError(f"{run_dir / 'eval'}: no finished eval stage; the parity gate compares with its answers (run `tunegate run`)")
    from tunegate.evals.custom import check_unchanged

    check_unchanged(project, manifest)  # the project's metric code, as the eval stage ran it
    now = project.model_dump(mode="json")
    changed = [k for k in ("base_model", "eval") if manifest.config.get(k) != now[k]]
    if changed:
        raise TunegateError(f"{run_dir / 'eval' / 'manifest.json'}: the eval stage ran with other {' and '.join(changed)} settings than "
                            f"{project.source_file} has now; rule: the parity gate compares with answers made under the project's "
                            "eval settings. Rerun `tunegate eval` (or `tunegate run`)")
    if not samples_path.is_file() or sha256_file(samples_path) != manifest.outputs["samples.jsonl"]:
        raise TunegateError(f"{samples_path}: missing or changed since the eval stage wrote it; rerun `tunegate eval`")
    samples = read_jsonl(samples_path)
    golden = {r["id"]: r for r in read_jsonl(golden_path)} if golden_path.is_file() else {}
    missing = [s["id"] for s in samples if s["id"] not in golden]
    if missing:
        raise TunegateError(f"{golden_path}: no golden row {missing[0]!r} that eval/samples.jsonl scored; rerun `tunegate run`")
    samples = samples[:max_rows] if max_rows else samples
    return [golden[s["id"]] for s in samples], samples


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def parity(ecfg, tokenizer, golden: list[dict[str, Any]], samples: list[dict[str, Any]],
           answers: list[dict[str, Any]], tolerance: float, custom: dict[str, Any] | None = None, task=None) -> dict[str, Any]:
    """The parity gate on one GGUF file: its rules (PASS/FAIL each) and the comparison table.

    Args:
        ecfg: the eval settings the eval stage ran with (metrics, max_new_tokens, bootstrap samples, seed).
        tokenizer: the tokenizer training used (its chat template renders the training prompts).
        golden: golden rows (`messages` or `prompt`); samples: the eval stage's rows for them (`candidate_output`,
            `reference`); answers: llama_worker's rows for them, in the same order.
        tolerance: max |mean(GGUF) - mean(adapter)| per golden metric.
        custom: the project-defined metrics (tunegate.evals.custom.metric_functions).
        task: the project's config.TaskConfig (label metrics).

    Returns:
        {"verdict", "rules": [{rule, metric?, description, value, ci?, threshold, passed, ...}], "table": {...}}.
    """
    from tunegate.data.format import generation_prompt, stop_token_ids
    from tunegate.evals.bootstrap import bootstrap_ci
    from tunegate.evals.gate import score_metrics, verdict

    n = len(golden)
    expected = [tokenizer(generation_prompt(tokenizer, r), add_special_tokens=False)["input_ids"] for r in golden]
    same_prompt = [a["prompt_token_ids"] == e for a, e in zip(answers, expected)]
    rules: list[dict[str, Any]] = []
    bad = next((i for i, ok in enumerate(same_prompt) if not ok), None)
    rule = {"rule": "prompt_identical", "description": f"llama.cpp's prompt tokens are training's chat template's on all {n} rows",
            "value": sum(same_prompt) / n, "threshold": 1.0, "passed": all(same_prompt)}
    if bad is not None:
        got, want = answers[bad]["prompt_token_ids"] or [], expected[bad]
        at = _first_difference(got, want)
        rule["first_difference"] = {
            "id": golden[bad]["id"], "token": at,
            "llama_cpp": tokenizer.decode(got[max(0, at - 8):at + 8]), "training": tokenizer.decode(want[max(0, at - 8):at + 8]),
        }
    rules.append(rule)

    # whether the adapter's answer ended at a stop token: as the eval stage recorded it (in-process answers), else
    # (an eval on a server, or a run from before it was recorded) its text re-encoded to fewer than max_new_tokens
    recorded = all(isinstance(s.get("candidate_stopped"), bool) for s in samples)
    adapter_stopped = [s["candidate_stopped"] if recorded else
                       len(tokenizer(s["candidate_output"], add_special_tokens=False)["input_ids"]) < ecfg.max_new_tokens
                       for s in samples]
    gguf_stopped = [a["finish_reason"] == "stop" for a in answers]
    owed = [i for i, s in enumerate(adapter_stopped) if s]
    # the same text as the adapter's is never a stop failure: it is the adapter's answer, ended where the adapter's ended
    kept = [i for i in owed if gguf_stopped[i] or answers[i]["output"] == samples[i]["candidate_output"]]
    rule = {"rule": "stops", "description": f"llama.cpp stops at the end of turn wherever the adapter did ({len(owed)} rows)",
            "value": len(kept) / len(owed) if owed else 1.0, "threshold": 1.0, "passed": len(kept) == len(owed)}
    ran_on = [i for i in owed if i not in kept]
    if ran_on:
        rule["first_difference"] = {"id": golden[ran_on[0]]["id"], "llama_cpp": answers[ran_on[0]]["output"][-80:]}
    rules.append(rule)

    peft = [s["candidate_output"] for s in samples]
    gguf = [a["output"] for a in answers]
    refs = [s["reference"] for s in samples]
    summary, _ = score_metrics(ecfg.metrics, peft, gguf, refs, ecfg.bootstrap_samples, ecfg.seed, ecfg.json_schema, custom, task)
    for metric, s in summary.items():
        d = s["delta"]
        rules.append({"rule": "metric_tolerance", "metric": metric,
                      "description": f"|{metric}(GGUF) - {metric}(adapter)| <= {tolerance:g}",
                      "value": d["mean"], "ci": [d["ci_low"], d["ci_high"]], "threshold": tolerance,
                      "passed": abs(d["mean"]) <= tolerance + 1e-12})
    identical = bootstrap_ci([float(a.strip() == b.strip()) for a, b in zip(gguf, peft)], ecfg.bootstrap_samples, ecfg.seed)
    seconds = sum(a["seconds"] for a in answers)
    tokens = sum(a["completion_tokens"] for a in answers)
    table = {
        "n": n,
        "metrics": {m: {"adapter": s["baseline"], "gguf": s["candidate"], "difference": s["delta"]} for m, s in summary.items()},
        "identical_answers": identical.as_dict(),
        "stopped": {"gguf": sum(gguf_stopped) / n, "adapter": sum(adapter_stopped) / n},
        "adapter_stopped_from": "eval/samples.jsonl candidate_stopped" if recorded else "answer re-encoded < max_new_tokens",
        "stop_token_ids": stop_token_ids(tokenizer),
        "answer_s": round(seconds, 1),
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
    }
    return {"verdict": verdict(rules), "rules": rules, "table": table}


# ------------------------------------------------------------------------------------------------ Ollama

_CHATML_TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""
_SYSTEM_TURN = re.compile(r"^<\|im_start\|>system\n(.*?)<\|im_end\|>\n", re.S)


def _chatml(messages: list[dict[str, str]]) -> str:
    """ChatML as the Ollama TEMPLATE above renders it, generation prompt included."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def _template_default_system(tokenizer) -> str | None:
    """The system message the chat template inserts when a conversation has none (SmolLM2's names itself), or None."""
    from tunegate.data.format import render_chat

    m = _SYSTEM_TURN.match(render_chat(tokenizer, [{"role": "user", "content": "x"}], True))
    return m.group(1) if m else None


def ollama_modelfile(tokenizer, golden: list[dict[str, Any]], gguf_name: str, other_files: list[str],
                     header: str) -> tuple[str, list[str]]:
    """An Ollama Modelfile for `gguf_name` (beside it). Returns (its text, notes on what it could not carry).

    TEMPLATE is written only when the chat template is ChatML: every golden prompt rendered by the tokenizer's
    template equals ChatML of the same messages (with the template's default system message when the row has none).
    SYSTEM: the system message every golden row shares (the project's), else the template's default, else none.
    """
    from tunegate.data.format import render_chat, stop_token_ids

    notes: list[str] = []
    chats = [r["messages"][:-1] for r in golden if "messages" in r]
    default_system = _template_default_system(tokenizer)

    def with_default(msgs):
        if default_system is not None and (not msgs or msgs[0]["role"] != "system"):
            return [{"role": "system", "content": default_system}, *msgs]
        return msgs

    chatml = bool(chats) and all(render_chat(tokenizer, m, True) == _chatml(with_default(m)) for m in chats)
    systems = {m[0]["content"] if m and m[0]["role"] == "system" else None for m in chats}
    system = next(iter(systems)) if len(systems) == 1 and None not in systems else default_system
    lines = [f"# {header}", f"# ollama create NAME -f {MODELFILE}", f"FROM ./{gguf_name}"]
    lines += [f"# also here: ./{f}" for f in other_files]
    if chatml:
        lines += ["# the chat template as ChatML: the model's own template renders every golden prompt as this ChatML does",
                  f'TEMPLATE """{_CHATML_TEMPLATE}"""']
    else:
        notes.append("the chat template is not ChatML: no TEMPLATE written; Ollama reads the GGUF's tokenizer.chat_template")
        lines.append("# no TEMPLATE: the chat template is not ChatML; Ollama uses the GGUF's tokenizer.chat_template")
    if system is not None and '"""' in system:  # a Modelfile's triple-quoted string cannot hold three quotes
        notes.append('the system prompt contains """: no SYSTEM written; send it as the system message of each request')
        lines.append('# no SYSTEM: the system prompt contains """, which a Modelfile cannot quote')
        system = None
    if system is not None:
        why = "every golden prompt's system message" if len(systems) == 1 and None not in systems else "the chat template's default"
        lines += [f"# system prompt used when a request has none: {why}", f'SYSTEM """{system}"""']
    for tok in stop_token_ids(tokenizer):
        lines.append(f"PARAMETER stop {json.dumps(tokenizer.convert_ids_to_tokens(tok))}")
    lines += ["# the parity gate measured greedy answers", "PARAMETER temperature 0"]
    return "\n".join(lines) + "\n", notes


# ------------------------------------------------------------------------------------------------ export


def _merged_model(project, run_dir: Path) -> Path:
    """The Hugging Face model to convert: a full fine-tune's train/model, or the adapter merged into the base model
    (runs/<id>/export/merged, reused when its merge_check.json names this adapter's sha256; tunegate.export)."""
    from tunegate.export import adapter_digests, merge_run, refuse_abstaining

    refuse_abstaining(run_dir)  # eval.abstain: a GGUF file would answer without the threshold the gate measured
    if (run_dir / "train" / "model").is_dir():
        return run_dir / "train" / "model"
    merged = run_dir / "export" / "merged"
    check = merged / "merge_check.json"
    if check.is_file() and json.loads(check.read_text(encoding="utf-8")).get("adapter_sha256") == adapter_digests(run_dir / "train" / "adapter"):
        return merged
    with console.status("gguf: merging the adapter into the base model and checking the merge in fp32"):
        merge_run(project, run_dir, merged)
    return merged


def write_gguf(project, run_dir: Path, dest: Path, cfg: GgufConfig, venv: Path | None = None,
               model_dir: Path | None = None, check: bool = True) -> dict[str, Any]:
    """Convert, gate and describe the run's model as GGUF files in the new, empty folder `dest` (the caller
    publishes it). Writes `<project>-<type>.gguf` per `cfg.types`, `parity-<type>.jsonl` (llama.cpp's answers and
    prompt checks per row), `Modelfile`, `convert.log` and `verdict.json` (per type: rules, table, file size and
    sha256; overall PASS only when every type passed). `model_dir`: the merged model when the caller has one
    (the release's), else `_merged_model`. `check`: the run chain is checked first (run_chain.check_releasable;
    False when the caller just did).

    Raises:
        TunegateError: no llama.cpp environment (tunegate.llama_env), the run is not releasable (run_chain.check_releasable),
            no eval answers to compare with or ones made under other eval settings, or a conversion failed.
    """
    from tunegate.data.format import generation_prompt
    from tunegate.evals.custom import metric_functions
    from tunegate.models import load_adapter_tokenizer, resolve_base_model
    from tunegate.run_chain import check_releasable

    venv = find_venv(venv)
    run_dir = Path(run_dir)
    if check:
        check_releasable(run_dir, ("data", "train", "eval"))  # PASS, one chain, the evaluated adapter on disk
    golden, samples = _inputs(project, run_dir, cfg.max_rows)
    custom = metric_functions(project)  # loaded once, before any conversion
    trained = run_dir / "train" / "adapter"
    tokenizer = load_adapter_tokenizer(trained if trained.is_dir() else trained.parent / "model", resolve_base_model(project.base_model))
    model_dir = Path(model_dir) if model_dir is not None else _merged_model(project, run_dir)
    dest.mkdir(parents=True, exist_ok=True)
    log = dest / "convert.log"
    threads = os.cpu_count() or 1
    longest = max(len(tokenizer(generation_prompt(tokenizer, r), add_special_tokens=False)["input_ids"]) for r in golden)
    # room for the answer and for a template that renders longer prompts than training's (prompt_identical names it)
    n_ctx = 2 * longest + project.eval.max_new_tokens + 64
    # A tool row (records: `tools`) is sent as the text training rendered (its schemas in the prompt): llama.cpp's
    # chat completion would render its messages without them. Not yet run against llama.cpp (README, Tool calling).
    rows = [{"id": r["id"], **({"messages": r["messages"][:-1]} if "messages" in r and "tools" not in r else
                               {"prompt": generation_prompt(tokenizer, r) if "tools" in r else r["prompt"]})} for r in golden]

    files: dict[str, Any] = {}
    for t in cfg.types:
        name = gguf_file_name(project.name, t)
        f16 = dest / gguf_file_name(project.name, "f16")  # a k-quant is quantized from the f16 file when it is there
        console.print(f"[dim]- gguf: writing {name}[/dim]")
        with console.status(f"gguf: writing {name}"):
            seconds = convert(model_dir, dest / name, t, venv, log, threads, cfg.timeout_s, f16 if f16.is_file() else None)
        console.print(f"[dim]- gguf: {name} answers {len(rows)} golden prompts in llama.cpp[/dim]")
        with console.status(f"gguf: {name} answers {len(rows)} golden prompts in llama.cpp"):
            out = _worker(venv, {"task": "answer", "model": str(dest / name), "rows": rows, "n_ctx": n_ctx,
                                 "max_tokens": project.eval.max_new_tokens, "threads": threads},
                          dest / f"parity-{t}.jsonl", log, f"answer with {name}", cfg.timeout_s)
        header, answers = out[0], out[1:]
        if [a["id"] for a in answers] != [r["id"] for r in rows]:
            raise TunegateError(f"{dest / f'parity-{t}.jsonl'}: llama.cpp answered {len(answers)} of {len(rows)} rows")
        gate = parity(project.eval, tokenizer, golden, samples, answers, cfg.tolerance, custom, project.task)
        files[t] = {"file": name, "bytes": (dest / name).stat().st_size, "sha256": sha256_file(dest / name),
                    "convert_s": round(seconds, 1), "llama_cpp": header, **gate}
        _print_parity(name, files[t])

    # FROM the smallest file that passed (the smallest of all when none did: the verdict says FAIL then)
    passed = [f for f in files.values() if f["verdict"] == "PASS"] or list(files.values())
    smallest = min(passed, key=lambda f: f["bytes"])["file"]
    failed = [f["file"] for f in files.values() if f["verdict"] != "PASS"]
    header = f"Ollama Modelfile for {project.name}, run {run_dir.name} (written by tunegate)"
    if failed:
        header += f"\n# PARITY GATE FAILED for {', '.join(failed)}: llama.cpp does not answer as the adapter did (verdict.json)"
    modelfile, notes = ollama_modelfile(tokenizer, golden, smallest, [f["file"] for f in files.values() if f["file"] != smallest], header)
    atomic_write_text(dest / MODELFILE, modelfile)
    result = {
        "verdict": "PASS" if all(f["verdict"] == "PASS" for f in files.values()) else "FAIL",
        "project": project.name,
        "run_id": run_dir.name,
        "adapter_sha256": json.loads((model_dir / "merge_check.json").read_text(encoding="utf-8")).get("adapter_sha256")
        if (model_dir / "merge_check.json").is_file() else None,
        "tolerance": cfg.tolerance,
        "rows": len(rows),
        "llama_cpp_python": installed_version(venv),
        "converter": LLAMA_CPP_PYTHON + " vendor/llama.cpp/convert_hf_to_gguf.py",
        "types": files,
        "modelfile": {"from": smallest, "notes": notes},
    }
    atomic_write_json(dest / VERDICT, result)
    return result


class GgufGateFailed(TunegateError):
    """A GGUF file failed its parity gate inside the release stage (exit 3, as an eval gate FAIL)."""

    exit_code = EXIT_GATE_FAILED


def release_gguf(project, run_dir: Path, bundle: Path, merged: Path | None = None) -> dict[str, Any]:
    """The release stage's GGUF files (`release.gguf`): `write_gguf` into `bundle/gguf/` (the bundle being built).

    The merged model is the bundle's `merged` when it has one; otherwise the adapter is merged into a hidden folder
    inside `bundle`, deleted before the bundle is listed and signed. The caller has checked the run chain.

    Returns verdict.json's contents (PASS). Raises GgufGateFailed when a file failed its gate, after publishing the
    gated folder to runs/<id>/export/gguf/ (verdict.json with the failing rule's first difference, the answers),
    and TunegateError as `write_gguf`.
    """
    from tunegate.export import merge_run

    run_dir, bundle = Path(run_dir), Path(bundle)
    scratch = None
    if merged is None and not (run_dir / "train" / "model").is_dir():
        scratch = bundle / ".gguf-merged"
        with console.status("release: merging the adapter into the base model for GGUF and checking the merge in fp32"):
            merge_run(project, run_dir, scratch)
    try:
        result = write_gguf(project, run_dir, bundle / "gguf", project.release.gguf, model_dir=merged or scratch, check=False)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if result["verdict"] == "PASS":
        return result
    target = run_dir / "export" / "gguf"
    check_replaceable(target, VERDICT, "GGUF export", keys=("types", "converter"))
    staged = staging_dir(target)
    staged.rmdir()
    (bundle / "gguf").rename(staged)
    publish_dir(staged, target)
    failed = [f"{f['file']}: {r['description']} (measured {r['value']:.3f})"
              for f in result["types"].values() for r in f["rules"] if not r["passed"]]
    raise GgufGateFailed(f"{target / VERDICT}: GGUF parity gate FAIL: {'; '.join(failed)}; rule: a release carries a GGUF "
                         "file only when its parity gate passed (drop that type from release.gguf.types, or remove release.gguf)")


def _print_parity(name: str, f: dict[str, Any]) -> None:
    t = f["table"]
    console.print(f"{name}: {f['bytes'] / 1e6:.1f} MB, identical answers {t['identical_answers']['mean']:.3f} "
                  f"[{t['identical_answers']['ci_low']:.3f}, {t['identical_answers']['ci_high']:.3f}], stopped "
                  f"{t['stopped']['gguf']:.3f} (adapter {t['stopped']['adapter']:.3f}), {t['tokens_per_s']} tokens/s", highlight=False, soft_wrap=True)
    for r in f["rules"]:
        ci = f" [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]" if r.get("ci") else ""
        console.print(f"  {'[green]PASS[/green]' if r['passed'] else '[red]FAIL[/red]'} {r['description']}: {r['value']:.3f}{ci}",
                      highlight=False, soft_wrap=True)
        if not r["passed"] and r.get("first_difference"):
            console.print(f"    first difference: {r['first_difference']}", markup=False, highlight=False, soft_wrap=True)


def export_gguf(project, run_id: str = "default", out_dir: Path | None = None, venv: Path | None = None,
                types: list[str] | None = None) -> tuple[Path, dict[str, Any]]:
    """`tunegate export --format gguf`: `write_gguf` for run `run_id` with `release.gguf` (or the defaults, f16 and
    q8_0), published whole to `out_dir` (default runs/<id>/export/gguf/) whatever the verdict, so a FAIL can be read.

    Returns (the folder, verdict.json's contents). Raises TunegateError as `write_gguf`, before anything is written:
    a run id that is not an identifier, no type in `types` or an unknown one, or `out_dir` exists and is not an
    earlier GGUF export (core.io.check_replaceable).
    """
    from pydantic import ValidationError

    from tunegate.run_chain import check_releasable

    run_dir = project.run_dir(run_id)
    cfg = project.release.gguf or GgufConfig()
    if types is not None:
        if not types:
            raise TunegateError("--types: no GGUF type given; e.g. --types f16,q8_0")
        try:
            cfg = cfg.model_copy(update={"types": GgufConfig(types=types).types})
        except ValidationError as exc:
            raise TunegateError(f"--types {','.join(types)}: {exc.errors()[0]['msg']}") from None
    target = Path(out_dir) if out_dir is not None else run_dir / "export" / "gguf"
    check_replaceable(target, VERDICT, "GGUF export", keys=("types", "converter"))  # never another folder's files
    venv = find_venv(venv)
    check_releasable(run_dir, ("data", "train", "eval"))  # before anything is written
    _inputs(project, run_dir, cfg.max_rows)
    tmp = staging_dir(target)
    try:
        result = write_gguf(project, run_dir, tmp, cfg, venv, check=False)
        publish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target, result
