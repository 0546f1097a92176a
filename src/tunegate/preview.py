"""Loss-mask preview (`tunegate data-preview`): which tokens of a row are trained on, and which rows get cut.

Rows come from the finished data stage (runs/<id>/data/train.jsonl, then val.jsonl) when its fingerprint
matches the project's current data config and files; otherwise from the sources, read and validated by the
data stage's own code (`read_source`, the system-message policy and, with `data.pii`, the same redaction),
without the duplicate and golden-overlap steps. Every row is encoded by `tunegate.data.format.encode_record`
with `data.max_length` and `data.overlength`: the function the train stage calls in `tokenize_rows`, so
the preview cannot disagree with training.

Supervised tokens (label != -100) are shown on a green background in a terminal, between ⟦ and ⟧ when the
output is not a terminal, and inside `<span class="sup">` in the HTML page.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunegate import TunegateError
from tunegate.data.format import IGNORE_INDEX, Encoded, apply_system_policy, encode_record, supports_system_role
from tunegate.data.records import RowError

SUP_OPEN, SUP_CLOSE = "⟦", "⟧"  # supervised-span markers when there is no colour
POLICY_CUT = {
    "truncate_end": "cut from the end; the end-of-turn token is put last and supervised",
    "cut_context_left": "cut from the start (the context); the final answer is kept whole",
}


@dataclass
class Segment:
    text: str
    supervised: bool
    n_tokens: int


@dataclass
class RowPreview:
    id: str
    where: str  # the file (and line) the row was read from
    split: str  # train | val | source
    segments: list[Segment] = field(default_factory=list)
    n_tokens: int = 0  # after the over-length policy: what the train stage sees
    n_supervised: int = 0
    n_tokens_before: int = 0  # before the over-length policy
    n_supervised_before: int = 0
    truncated: bool = False
    rejected: str | None = None  # "rule: detail" when the row is not trained on

    @property
    def status(self) -> str:
        if self.rejected:
            return f"REJECTED, not trained on: {self.rejected}"
        if self.truncated:
            return f"TRUNCATED: {self.n_tokens_before} -> {self.n_tokens} tokens ({self.n_tokens_before - self.n_tokens} fewer), supervised {self.n_supervised_before} -> {self.n_supervised}"
        return "fits max_length, not truncated"


def segments(tokenizer, enc: Encoded) -> list[Segment]:
    """Runs of consecutive positions with the same supervised flag, each decoded as one piece of text.

    A run is decoded whole (not token by token) so multi-byte characters split across byte-level BPE tokens
    read correctly; runs break only where the loss mask changes, which is at a template boundary.
    """
    out: list[Segment] = []
    start = 0
    flags = [x != IGNORE_INDEX for x in enc.labels]
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[start]:
            ids = enc.input_ids[start:i]
            text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            out.append(Segment(text, flags[start], len(ids)))
            start = i
    return out


def preview_row(tokenizer, rec: dict[str, Any], max_length: int, policy: str, where: str, split: str) -> RowPreview:
    """Encode one row exactly as the train stage does and describe it. A row the data code rejects is
    returned with `rejected` set (and, when it only failed the over-length policy, its uncut tokens)."""
    p = RowPreview(rec["id"], where, split)
    try:
        full = encode_record(tokenizer, rec, sys.maxsize, policy)  # the same row with no length limit
    except RowError as exc:
        p.rejected = f"{exc.rule}: {exc.detail}"
        return p
    p.n_tokens_before, p.n_supervised_before = len(full.input_ids), full.n_supervised
    try:
        enc = encode_record(tokenizer, rec, max_length, policy)  # what training sees
    except RowError as exc:
        p.rejected = f"{exc.rule}: {exc.detail}"
        enc = full  # shown uncut, marked rejected
    p.segments = segments(tokenizer, enc)
    p.n_tokens, p.n_supervised, p.truncated = len(enc.input_ids), enc.n_supervised, enc.truncated
    return p


@dataclass
class Rows:
    """The rows a preview can choose from, in order, and what the data code rejected (by id)."""

    rows: list[tuple[dict[str, Any], str, str]]  # (record, where, split)
    rejected: dict[str, dict[str, Any]]  # id -> {file, line, rule, detail}
    origin: str  # where they were read from, for messages
    from_stage: bool


def load_rows(project, run_dir: Path) -> Rows:
    """The finished data stage's train and val rows when it is current, else the validated source rows."""
    from tunegate.core.io import read_jsonl
    from tunegate.data.records import read_source

    from tunegate.pipeline import stale_reason

    why = stale_reason(project, run_dir, "data")
    stage_dir = run_dir / "data"
    if why is None:
        rows = [(r, f"{stage_dir / split}.jsonl:{i}, from {Path(r['meta']['file']).name}:{r['meta']['line']}", split)
                for split in ("train", "val") for i, r in enumerate(read_jsonl(stage_dir / f"{split}.jsonl"), start=1)]
        rejected = {r["id"]: r for r in read_jsonl(stage_dir / "rejected.jsonl") if r.get("id")}
        return Rows(rows, rejected, f"{stage_dir / 'train.jsonl'} and val.jsonl", True)
    from tunegate.core.console import console
    from tunegate.data.records import dedupe_ids

    console.print(
        f"[yellow]{why}: previewing the sources with the current config (validation, system-message policy, "
        f"{'PII redaction, ' if project.data.pii else ''}template, loss mask, over-length policy; not the duplicate and "
        f"golden-overlap steps). Run `tunegate data` for the exact training rows.[/yellow]"
    )
    records, rejected = [], {}
    for src in project.data.sources:
        recs, rej = read_source(src)
        records += recs
        rejected.update({r.id: r.to_json() for r in rej if r.id})
    dedupe_ids(records)
    rows = [(r, f"{r['meta']['file']}:{r['meta']['line']}", "source") for r in records]
    return Rows(rows, rejected, ", ".join(s.name for s in project.data.sources), False)


def choose(rows: Rows, ids: list[str] | None, first: int) -> list[tuple[dict[str, Any], str, str] | RowPreview]:
    """The chosen rows, in the order asked. An id the data code rejected comes back as a rejected RowPreview.

    Raises:
        TunegateError: an id is neither a row nor a rejected row; the message names the file and a few valid ids.
    """
    if ids is None:
        return list(rows.rows[:first])
    by_id = {r["id"]: (r, where, split) for r, where, split in rows.rows}
    out: list[Any] = []
    for rid in ids:
        if rid in by_id:
            out.append(by_id[rid])
        elif rid in rows.rejected:
            r = rows.rejected[rid]
            out.append(RowPreview(rid, f"{r['file']}:{r['line']}", "rejected", rejected=f"{r['rule']}: {r['detail']}"))
        else:
            few = ", ".join(list(by_id)[:8])
            raise TunegateError(f"{rows.origin}: no row with id {rid!r} ({len(by_id)} rows; ids include {few}{', ...' if len(by_id) > 8 else ''})")
    return out


def build_previews(project, run_dir: Path, ids: list[str] | None, first: int) -> tuple[list[RowPreview], Rows]:
    """Choose rows and encode them with the project's tokenizer (the base model's, with train.added_tokens; no
    weights are loaded).

    Returns the previews in the order chosen, and the rows they were chosen from.
    """
    from tunegate.models import load_project_tokenizer

    cfg = project.data
    rows = load_rows(project, run_dir)
    chosen = choose(rows, ids, first)
    tokenizer = load_project_tokenizer(project)
    to_encode = [c for c in chosen if not isinstance(c, RowPreview)]
    rejected_early: dict[str, str] = {}
    if not rows.from_stage:  # the data stage's steps before the template, on the chosen rows only
        has_system = supports_system_role(tokenizer)
        if cfg.pii is not None:
            from tunegate.data.pii import redactor_from_config

            recs, drops, _ = redactor_from_config(cfg.pii).redact_records([r for r, _, _ in to_encode])
            rejected_early = {d.id: f"{d.rule}: {d.detail}" for d in drops}
            redacted = {r["id"]: r for r in recs}
            to_encode = [(redacted.get(r["id"], r), where, split) for r, where, split in to_encode]
        for i, (r, where, split) in enumerate(to_encode):
            if "messages" in r and r["id"] not in rejected_early:
                try:
                    r = {**r, "messages": apply_system_policy(r["messages"], cfg.system_role, has_system)}
                except RowError as exc:
                    rejected_early[r["id"]] = f"{exc.rule}: {exc.detail}"
                to_encode[i] = (r, where, split)
    encoded = {}
    for r, where, split in to_encode:
        if r["id"] in rejected_early:
            encoded[r["id"]] = RowPreview(r["id"], where, split, rejected=rejected_early[r["id"]])
        else:
            encoded[r["id"]] = preview_row(tokenizer, r, cfg.max_length, cfg.overlength, where, split)
    return [c if isinstance(c, RowPreview) else encoded[c[0]["id"]] for c in chosen], rows


def print_previews(previews: list[RowPreview], max_length: int, policy: str, console=None) -> None:
    """Each row: a header, the token counts, the over-length verdict, and the text with supervised tokens marked."""
    from rich.console import Console
    from rich.text import Text

    console = console or Console(highlight=False)
    colour = console.color_system is not None
    legend = ("supervised tokens (label != -100) on green, masked tokens dim" if colour
              else f"supervised tokens (label != -100) between {SUP_OPEN} and {SUP_CLOSE}")
    console.print(Text(f"data.max_length {max_length}, data.overlength {policy}; {legend}", style="bold"), soft_wrap=True)
    for p in previews:
        console.print(Text(f"── {p.id}  ({p.split}, {p.where})", style="bold cyan"), soft_wrap=True)
        if p.segments:
            console.print(f"tokens {p.n_tokens}, supervised {p.n_supervised}, masked {p.n_tokens - p.n_supervised}", soft_wrap=True)
        status_style = "red" if p.rejected else ("yellow" if p.truncated else "green")
        cut = f"; {POLICY_CUT[policy]}" if p.truncated and policy in POLICY_CUT else ""
        console.print(Text(p.status + cut, style=status_style), soft_wrap=True)
        if p.rejected and p.segments:
            console.print(Text("the row before the over-length policy, as it would be masked:", style="dim"), soft_wrap=True)
        body = Text()
        for s in p.segments:
            if s.supervised:
                body.append(s.text if colour else f"{SUP_OPEN}{s.text}{SUP_CLOSE}", style="black on green")
            else:
                body.append(s.text, style="dim")
        if p.segments:
            console.print(body, soft_wrap=True)


def render_html(previews: list[RowPreview], title: str, max_length: int, policy: str, origin: str,
                header: dict[str, Any] | None = None) -> str:
    """The preview page; header: the run's page header (report.header.run_header), or None for none."""
    from tunegate.report.render import environment

    env = environment()
    return env.get_template("data_preview.html.j2").render(
        title=title, previews=previews, max_length=max_length, policy=policy, origin=origin, policy_cut=POLICY_CUT, header=header
    )


def run_preview(project, run_dir: Path, ids: list[str] | None, first: int, html: Path | None) -> list[RowPreview]:
    """`tunegate data-preview`: print the chosen rows, and write the HTML page when `html` is given."""
    from tunegate.core.io import atomic_write_text
    from tunegate.core.console import console as err

    previews, rows = build_previews(project, run_dir, ids, first)
    cfg = project.data
    print_previews(previews, cfg.max_length, cfg.overlength)
    if html is not None:
        origin = rows.origin if rows.from_stage else f"the sources {rows.origin} (no current data stage: before dedup and golden-overlap removal)"
        from tunegate.report.header import RUN_JS, run_header

        header = run_header(project.name, run_dir, Path(html).parent)
        if not (run_dir / RUN_JS).is_file():
            header["run_js"] = None  # not a stage page: no run.js will be written after it
        atomic_write_text(html, render_html(previews, project.name, cfg.max_length, cfg.overlength, origin, header))
        err.print(f"wrote {html}")
    return previews
