"""`tunegate drift`: have production requests moved away from what the adapter was trained on?

Compares the prompts of recent traces in the serving database (tunegate.serve.db; `serve.database_url`, default
`sqlite:///<project dir>/serve.db`; the window is `--since`) with the user turns of the run's training data
(runs/<id>/data/train.jsonl). Three checks, thresholds in the project's `drift:` section (config.DriftConfig):

  length      words per prompt (whitespace split: tokenizer-free, so no model is loaded); two-sample
              Kolmogorov-Smirnov test (scipy.stats.ks_2samp). Flagged when D > max_ks_statistic and p < alpha.
  embedding   all-MiniLM-L6-v2 sentence embeddings (tunegate.retrieval.embed, offline). The cosine distance between
              the two mean embeddings, and the unbiased squared maximum mean discrepancy MMD^2_u with a Gaussian
              (RBF) kernel at the median-heuristic bandwidth (Gretton, Borgwardt, Rasch, Schoelkopf & Smola 2012,
              "A Kernel Two-Sample Test", JMLR 13; eq. 3 and section 8), with a permutation-test p-value
              (`permutations` relabellings from a seeded RNG; p = (1 + #{MMD^2_perm >= MMD^2}) / (1 + permutations)).
              Flagged when the mean cosine distance > max_mean_cosine_distance and p < alpha.
  new clusters  a recent prompt is novel when its nearest training prompt has cosine < novelty_cosine; novel
              prompts are grouped by average-linkage agglomerative clustering (cosine; groups merge while their
              mean cosine stays >= cluster_cosine). Unlike k-means, this needs no cluster count, so a new topic of
              20 requests stays one cluster. A group of >= min_cluster_size prompts holding >= min_cluster_share of
              the window is a new cluster: drift, reported with its size and 3 example requests (those nearest its
              centroid).

Each side is subsampled (seeded) to `max_prompts` before embedding; lengths use every prompt. At the default
cap (2000 + 2000 prompts, 384 dims) the MMD test takes ~2.3 s and ~0.45 GB on 2 CPU cores (measured).

`--golden` re-runs the frozen golden set (lock and train-overlap checks of the eval stage) against the served
adapter through an OpenAI-compatible endpoint (tunegate.evals.backends.OpenAIChat: `drift.base_url`, else
`eval.server.base_url`, else `tunegate serve`'s host and port), scores it with the project's eval metrics and
bootstrap CIs (tunegate.evals.gate.score_metrics, paired with the release-time answers in eval/samples.jsonl), and
compares each metric with the release score in eval/scores.json: drift when it fell more than golden_max_drop
and below the lower end of the release score's 95% CI.

Writes runs/<id>/drift/<UTC timestamp>/ (or --out): drift.json, drift.md and drift.png (length histograms and a
2-D PCA of the embeddings). These files quote production requests verbatim (new-cluster examples): they are as
sensitive as the serving database itself. The console output never shows request text.

Exit codes (cli): 0 no drift, 5 (tunegate.EXIT_DRIFT) a threshold was crossed, 2 invalid input (no serving
database, fewer than `min_traces` requests in the window, no training data, no release scores for --golden).
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from tunegate import TunegateError

EXAMPLES_PER_CLUSTER = 3
_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*$")
_UNIT_S = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str) -> dt.timedelta:
    """'90m', '24h', '7d', '2w' -> a timedelta. Raises TunegateError on anything else."""
    m = _SINCE.match(text or "")
    if not m or float(m.group(1)) <= 0:
        raise TunegateError(f"--since {text!r}: expected a positive number and a unit m, h, d or w (e.g. 7d, 24h)")
    return dt.timedelta(seconds=float(m.group(1)) * _UNIT_S[m.group(2)])


def _content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        return "".join(p if isinstance(p, str) else p.get("text", "") for p in content
                       if isinstance(p, str) or (isinstance(p, dict) and p.get("type") == "text"))
    return ""


def request_prompt(messages: Any) -> str:
    """A served request's prompt as training rows define it (records.prompt_text): its user turns, joined."""
    if not isinstance(messages, list):
        return ""
    return "\n".join(_content(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "user")


def recent_requests(engine, since: dt.timedelta, adapter: str | None = None, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Traces created in [now - since, now], oldest first: {id, tenant, adapter, created_at, prompt}.

    adapter: keep only that adapter's traces ("base": the base model's)."""
    from sqlalchemy import select

    from tunegate.serve import db as servedb

    t = servedb.tables()["traces"]
    now = now or dt.datetime.now(dt.UTC)
    q = select(t.c.id, t.c.tenant, t.c.adapter, t.c.created_at, t.c.messages).where(
        t.c.created_at >= now - since, t.c.created_at <= now).order_by(t.c.created_at, t.c.id)
    if adapter is not None:
        q = q.where(t.c.adapter.is_(None) if adapter == "base" else t.c.adapter == adapter)
    with engine.connect() as con:
        rows = con.execute(q).mappings().all()
    out = []
    for r in rows:
        prompt = request_prompt(r["messages"])
        if prompt.strip():
            out.append({"id": r["id"], "tenant": r["tenant"], "adapter": r["adapter"],
                        "created_at": servedb.iso_utc(r["created_at"]), "prompt": prompt})
    return out


def training_prompts(run_dir: Path) -> list[str]:
    """The user turns (or prompts) of runs/<id>/data/train.jsonl. Raises TunegateError when it is missing or empty."""
    from tunegate.core.io import read_jsonl
    from tunegate.data.records import prompt_text

    path = Path(run_dir) / "data" / "train.jsonl"
    if not path.is_file():
        raise TunegateError(f"{path}: no training data for this run (run `tunegate data PROJECT --run-id {Path(run_dir).name}` first)")
    prompts = [p for p in (prompt_text(r) for r in read_jsonl(path)) if p.strip()]
    if not prompts:
        raise TunegateError(f"{path}: no training prompts (every row is empty)")
    return prompts


def word_counts(texts: Sequence[str]):
    """Words per text (whitespace split), shape (len(texts),), int."""
    import numpy as np

    return np.array([len(t.split()) for t in texts], dtype=np.int64)


def length_shift(train_len, recent_len, cfg) -> dict[str, Any]:
    """Two-sample Kolmogorov-Smirnov test on words per prompt, with means and p50/p95 side by side."""
    import numpy as np
    from scipy.stats import ks_2samp

    res = ks_2samp(train_len, recent_len)
    d, p = float(res.statistic), float(res.pvalue)

    def summary(x):
        return {"n": len(x), "mean": round(float(np.mean(x)), 2), "p50": float(np.percentile(x, 50)),
                "p95": float(np.percentile(x, 95))}

    drift = d > cfg.max_ks_statistic and p < cfg.alpha
    return {"unit": "words", "train": summary(train_len), "recent": summary(recent_len), "ks_statistic": round(d, 4),
            "p_value": p, "threshold": {"max_ks_statistic": cfg.max_ks_statistic, "alpha": cfg.alpha}, "drift": drift,
            "reason": (f"prompt length shifted: KS D {d:.3f} > {cfg.max_ks_statistic} (p {p:.2g} < {cfg.alpha}); mean "
                       f"{np.mean(train_len):.1f} -> {np.mean(recent_len):.1f} words") if drift else None}


def mmd_permutation_test(x, y, permutations: int = 200, seed: int = 0) -> dict[str, float]:
    """Unbiased MMD^2 between samples x (n, d) and y (m, d), Gaussian kernel at the median-heuristic bandwidth,
    with a permutation-test p-value (Gretton et al. 2012, JMLR 13, "A Kernel Two-Sample Test").

    k(a, b) = exp(-||a - b||^2 / (2 sigma^2)), sigma = the median pairwise distance of the pooled sample.
    Every relabelling reuses one (n+m, n+m) kernel matrix, so the test costs one matrix product.
    Raises ValueError when either sample has fewer than 2 rows.
    """
    import numpy as np

    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError("MMD needs at least 2 rows per sample")
    z = np.concatenate([x, y]).astype(np.float64)  # (N, d)
    sq = np.einsum("ij,ij->i", z, z)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (z @ z.T), 0.0)  # (N, N) squared distances
    np.fill_diagonal(d2, 0.0)
    med = float(np.median(d2[np.triu_indices(len(z), 1)]))  # median of d^2 = (median of d)^2
    if med <= 0:
        med = float(d2.max()) or 1.0  # (most) points coincide
    k = np.exp(-d2 / (2.0 * med))  # (N, N), diagonal 1
    del d2
    rng = np.random.default_rng(seed)
    labels = np.zeros((len(z), permutations + 1))  # column 0: the observed split; then relabellings
    labels[:n, 0] = 1.0
    for j in range(1, permutations + 1):
        labels[rng.permutation(len(z))[:n], j] = 1.0
    ka = k @ labels  # (N, P+1)
    k1 = k.sum(axis=1)[:, None]
    s_xx = np.sum(labels * ka, axis=0)  # a^T K a
    s_xy = np.sum(labels * (k1 - ka), axis=0)  # a^T K b, b = 1 - a
    s_yy = np.sum((1.0 - labels) * (k1 - ka), axis=0)  # b^T K b
    mmd2 = (s_xx - n) / (n * (n - 1)) + (s_yy - m) / (m * (m - 1)) - 2.0 * s_xy / (n * m)  # diagonals (k=1) removed
    p = (1 + int(np.sum(mmd2[1:] >= mmd2[0]))) / (1 + permutations)
    return {"mmd2": float(mmd2[0]), "p_value": p, "bandwidth": float(np.sqrt(med)), "permutations": permutations}


def embedding_shift(train_emb, recent_emb, cfg) -> dict[str, Any]:
    """Mean-embedding cosine distance and the MMD permutation test between (n, d) and (m, d) unit embeddings."""
    import numpy as np

    a, b = train_emb.mean(axis=0), recent_emb.mean(axis=0)
    cos_dist = float(1.0 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
    mmd = mmd_permutation_test(train_emb, recent_emb, cfg.permutations, cfg.seed)
    drift = cos_dist > cfg.max_mean_cosine_distance and mmd["p_value"] < cfg.alpha
    return {"model": "all-MiniLM-L6-v2", "n_train": len(train_emb), "n_recent": len(recent_emb),
            "mean_cosine_distance": round(cos_dist, 4), "mmd2": mmd["mmd2"], "mmd_p_value": mmd["p_value"],
            "rbf_bandwidth": mmd["bandwidth"], "permutations": mmd["permutations"],
            "threshold": {"max_mean_cosine_distance": cfg.max_mean_cosine_distance, "alpha": cfg.alpha}, "drift": drift,
            "reason": (f"request embeddings shifted: mean cosine distance {cos_dist:.3f} > {cfg.max_mean_cosine_distance} "
                       f"(MMD permutation p {mmd['p_value']:.2g} < {cfg.alpha})") if drift else None}


def new_clusters(train_emb, recent_emb, recent: Sequence[dict[str, Any]], cfg) -> dict[str, Any]:
    """Novel recent prompts (nearest training cosine < novelty_cosine), grouped; groups big enough are new clusters.

    recent: the requests behind recent_emb's rows, same order. Each cluster carries its size, share of the window,
    mean nearest-training cosine, and up to 3 example requests (id, prompt) nearest its centroid."""
    import numpy as np

    nearest = (recent_emb @ train_emb.T).max(axis=1)  # (m,) cosine to the nearest training prompt
    novel = np.flatnonzero(nearest < cfg.novelty_cosine)
    groups: list[np.ndarray] = []
    if len(novel) == 1:
        groups = [novel]
    elif len(novel) > 1:
        from sklearn.cluster import AgglomerativeClustering

        labels = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                         distance_threshold=1.0 - cfg.cluster_cosine).fit_predict(recent_emb[novel])
        groups = [novel[labels == c] for c in np.unique(labels)]
    m = len(recent_emb)
    clusters = []
    for g in sorted(groups, key=len, reverse=True):
        centroid = recent_emb[g].mean(axis=0)
        order = g[np.argsort(-(recent_emb[g] @ centroid))][:EXAMPLES_PER_CLUSTER]
        is_new = len(g) >= cfg.min_cluster_size and len(g) / m >= cfg.min_cluster_share
        clusters.append({"size": len(g), "share": round(len(g) / m, 4), "new": bool(is_new),
                         "mean_nearest_train_cosine": round(float(nearest[g].mean()), 4),
                         "examples": [{"id": recent[i]["id"], "prompt": recent[i]["prompt"]} for i in order]})
    found = [c for c in clusters if c["new"]]
    return {"novel_prompts": len(novel), "novel_share": round(len(novel) / m, 4),
            "nearest_train_cosine_p50": round(float(np.median(nearest)), 4),
            "threshold": {"novelty_cosine": cfg.novelty_cosine, "cluster_cosine": cfg.cluster_cosine,
                          "min_cluster_size": cfg.min_cluster_size, "min_cluster_share": cfg.min_cluster_share},
            "new_clusters": found, "small_groups": [{k: v for k, v in c.items() if k != "examples"} for c in clusters if not c["new"]],
            "drift": bool(found),
            "reason": (f"{len(found)} new cluster(s) of requests unlike any training prompt ({sum(c['size'] for c in found)} "
                       f"of {m} requests sampled; nearest training cosine < {cfg.novelty_cosine})") if found else None}


# ---------------------------------------------------------------- --golden

def golden_endpoint(project) -> tuple[str, str]:
    """(base_url, api_key_env) for --golden: drift.base_url, else eval.server's, else `tunegate serve`'s address."""
    d, srv = project.drift, project.eval.server
    if d.base_url:
        return d.base_url, d.api_key_env
    if srv is not None:
        return srv.base_url, srv.api_key_env
    if project.serve is not None:
        return f"http://{project.serve.host}:{project.serve.port}/v1", d.api_key_env
    raise TunegateError(f"{project.source_file}: --golden needs an OpenAI-compatible endpoint: set drift.base_url, eval.server "
                        "or a serve section (tunegate serve)")


def golden_drift(project, run_dir: Path, model: str) -> dict[str, Any]:
    """Re-run the frozen golden set on `model` at the endpoint; compare each eval metric with its release score.

    Raises TunegateError when the run has no eval/scores.json, the golden set changed since it was frozen, or
    the server fails."""
    import json

    from tunegate.core.io import read_jsonl
    from tunegate.data.records import reference_answer
    from tunegate.evals.backends import OpenAIChat, check_served_adapter
    from tunegate.evals.gate import score_metrics
    from tunegate.data.golden import check_golden
    from tunegate.evals.answer import answer_golden

    run_dir = Path(run_dir)
    scores_path = run_dir / "eval" / "scores.json"
    if not scores_path.is_file():
        raise TunegateError(f"{scores_path}: no release scores to compare with (run the eval stage of run {run_dir.name} first)")
    release = json.loads(scores_path.read_text())
    ecfg, dcfg = project.eval, project.drift
    missing = [n for n in ("golden.jsonl", "train.jsonl", "val.jsonl") if not (run_dir / "data" / n).is_file()]
    if missing:
        raise TunegateError(f"{run_dir / 'data'}: missing {', '.join(missing)} (rerun the data stage of run {run_dir.name})")
    golden = check_golden(project, run_dir / "data")
    from tunegate.core.manifest import read_manifest
    from tunegate.evals.custom import check_unchanged, metric_functions

    check_unchanged(project, read_manifest(run_dir / "eval"))  # the metric code the release's scores were made with
    custom = metric_functions(project)  # loaded before the endpoint answers
    base_url, key_env = golden_endpoint(project)
    note = None
    try:  # the same check as the eval stage's: is the served model this run's adapter?
        check_served_adapter(base_url, model, run_dir / "train" / "adapter", key_env)
    except TunegateError as e:
        note = f"could not verify that {model!r} serves this run's adapter: {e}"
    backend = OpenAIChat(base_url, model, key_env, ecfg.server.concurrency if ecfg.server else 8)
    outputs = answer_golden(backend, None, golden, ecfg.max_new_tokens, f"golden set on {model}")
    refs = [reference_answer(r) for r in golden]
    at_release = outputs  # paired comparison with the release-time answers, when they match row for row
    samples_path = run_dir / "eval" / "samples.jsonl"
    paired = False
    if samples_path.is_file():
        by_id = {s["id"]: s.get("candidate_output") for s in read_jsonl(samples_path)}
        if all(isinstance(by_id.get(g["id"]), str) for g in golden):
            at_release, paired = [by_id[g["id"]] for g in golden], True
    summary, _ = score_metrics(ecfg.metrics, at_release, outputs, refs, ecfg.bootstrap_samples, ecfg.seed, ecfg.json_schema, custom,
                               project.task)
    lower = {r.metric for r in ecfg.gate if r.lower_is_better}
    metrics, reasons = {}, []
    for name in ecfg.metrics:
        rel = release.get("metrics", {}).get(name, {}).get("candidate")
        if rel is None:
            continue
        now = summary[name]["candidate"]
        drop = (now["mean"] - rel["mean"]) if name in lower else (rel["mean"] - now["mean"])
        outside = now["mean"] > rel["ci_high"] if name in lower else now["mean"] < rel["ci_low"]
        flagged = drop > dcfg.golden_max_drop and outside
        entry = {"release": rel, "now": now, "drop": round(drop, 4), "outside_release_ci": bool(outside),
                 "lower_is_better": name in lower, "drift": flagged}
        if paired:
            entry["paired_delta_now_minus_release"] = summary[name]["delta"]
        metrics[name] = entry
        if flagged:
            reasons.append(f"golden {name} fell from {rel['mean']:.3f} [{rel['ci_low']:.3f}, {rel['ci_high']:.3f}] at release to "
                           f"{now['mean']:.3f} on {model} (drop {drop:.3f} > {dcfg.golden_max_drop})")
    if not metrics:
        raise TunegateError(f"{scores_path}: holds none of eval.metrics ({', '.join(ecfg.metrics)}) to compare with")
    return {"model": model, "base_url": base_url, "n": len(golden), "paired_with_release_answers": paired,
            "threshold": {"golden_max_drop": dcfg.golden_max_drop, "rule": "drop > golden_max_drop and outside the release 95% CI"},
            "metrics": metrics, "note": note, "drift": bool(reasons), "reason": "; ".join(reasons) or None}


# ---------------------------------------------------------------- report

def _subsample(n: int, cap: int, seed: int):
    import numpy as np

    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))


def write_plot(path: Path, train_len, recent_len, train_emb, recent_emb) -> None:
    """Two panels: words-per-prompt histograms (train vs recent, density) and a 2-D PCA of both embedding sets."""
    import io

    from tunegate.report.render import pyplot

    plt = pyplot()
    import numpy as np
    from sklearn.decomposition import PCA

    from tunegate.core.io import atomic_write_bytes

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    hi = max(int(np.percentile(np.concatenate([train_len, recent_len]), 99)), 1)
    bins = np.linspace(0, hi + 1, min(40, hi + 2))
    ax1.hist(np.minimum(train_len, hi), bins=bins, alpha=0.55, density=True, label=f"training ({len(train_len)})")
    ax1.hist(np.minimum(recent_len, hi), bins=bins, alpha=0.55, density=True, label=f"recent ({len(recent_len)})")
    ax1.set_xlabel("words per prompt (clipped at p99)")
    ax1.set_ylabel("density")
    ax1.legend()
    ax1.set_title("prompt length")
    both = np.concatenate([train_emb, recent_emb])
    xy = PCA(n_components=2, random_state=0).fit_transform(both) if len(both) > 2 else np.zeros((len(both), 2))
    ax2.scatter(xy[: len(train_emb), 0], xy[: len(train_emb), 1], s=6, alpha=0.5, label="training")
    ax2.scatter(xy[len(train_emb):, 0], xy[len(train_emb):, 1], s=10, alpha=0.7, label="recent")
    ax2.set_title("MiniLM embeddings, PCA 2-D")
    ax2.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _md_text(text: str, limit: int = 300) -> str:
    one = " ".join(text.split())
    one = one if len(one) <= limit else one[: limit - 1] + "…"
    return one.replace("|", "\\|")


def render_markdown(r: dict[str, Any]) -> str:
    c = r["checks"]
    ln, em, cl = c["length"], c["embedding"], c["new_clusters"]
    out = [
        f"# Drift report: {r['project']}, run {r['run_id']}",
        "",
        ("> **Sensitive.** This folder quotes production requests verbatim (the new-cluster examples below). "
        "Keep it under the same access control and retention as the serving database."),
        "",
        (f"Window: {r['window']['from']} to {r['window']['to']} (`--since {r['window']['since']}`); adapter: "
        f"{r['adapter'] or 'all'}; {r['counts']['recent_prompts']} recent requests vs {r['counts']['train_prompts']} training prompts."),
        "",
        f"**Verdict: {'DRIFT' if r['drift'] else 'no drift'}**",
        "",
    ]
    out += [f"- {x}" for x in r["reasons"]] + ([""] if r["reasons"] else [])
    out += [
        "## Prompt length (words)", "",
        "| | n | mean | p50 | p95 |", "|---|---|---|---|---|",
        *[f"| {k} | {ln[k]['n']} | {ln[k]['mean']} | {ln[k]['p50']:g} | {ln[k]['p95']:g} |" for k in ("train", "recent")],
        "",
        (f"Kolmogorov-Smirnov D = {ln['ks_statistic']:.3f}, p = {ln['p_value']:.3g} (flagged when D > {ln['threshold']['max_ks_statistic']} "
        f"and p < {ln['threshold']['alpha']}): {'**drift**' if ln['drift'] else 'ok'}."),
        "",
        "## Embedding shift (all-MiniLM-L6-v2)", "",
        (f"Mean-embedding cosine distance {em['mean_cosine_distance']:.4f}; MMD² (RBF, median-heuristic bandwidth "
        f"{em['rbf_bandwidth']:.3f}) = {em['mmd2']:.5f}, permutation p = {em['mmd_p_value']:.3g} ({em['permutations']} permutations; "
        f"{em['n_train']} training and {em['n_recent']} recent prompts embedded). Flagged when the distance > "
        f"{em['threshold']['max_mean_cosine_distance']} and p < {em['threshold']['alpha']}: {'**drift**' if em['drift'] else 'ok'}."),
        "",
        "## New clusters of requests", "",
        (f"{cl['novel_prompts']} recent requests ({cl['novel_share']:.1%}) have no training prompt with cosine >= "
        f"{cl['threshold']['novelty_cosine']} (median nearest-training cosine {cl['nearest_train_cosine_p50']:.3f})."),
        "",
    ]
    if not cl["new_clusters"]:
        out += ["No new cluster.", ""]
    for i, k in enumerate(cl["new_clusters"], 1):
        out += [(f"### New cluster {i}: {k['size']} requests ({k['share']:.1%}), mean nearest-training cosine "
                f"{k['mean_nearest_train_cosine']:.3f}"), ""]
        out += [f"- `{e['id']}`: {_md_text(e['prompt'])}" for e in k["examples"]] + [""]
    g = c.get("golden")
    if g:
        out += ["## Golden set on the served adapter", "",
                (f"{g['n']} golden rows answered by `{g['model']}` at {g['base_url']}; drift when a metric drops more than "
                f"{g['threshold']['golden_max_drop']} and below the release score's 95% CI."), ""]
        if g.get("note"):
            out += [f"Note: {g['note']}", ""]
        out += ["| metric | at release [95% CI] | now [95% CI] | drop | drift |", "|---|---|---|---|---|"]
        for name, m in g["metrics"].items():
            a, b = m["release"], m["now"]
            out.append(f"| {name} | {a['mean']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}] | {b['mean']:.3f} "
                       f"[{b['ci_low']:.3f}, {b['ci_high']:.3f}] | {m['drop']:+.3f} | {'**yes**' if m['drift'] else 'no'} |")
        out.append("")
    out += ["![length histograms and embedding PCA](drift.png)", ""]
    return "\n".join(out)


# ---------------------------------------------------------------- the command

def run_drift(project, run_id: str = "default", since: str = "7d", adapter: str | None = None, golden: bool = False,
              out_dir: Path | None = None, embed_fn: Callable[[Sequence[str]], Any] | None = None,
              now: dt.datetime | None = None) -> tuple[dict[str, Any], Path]:
    """`tunegate drift`: the checks above; writes drift.json, drift.md and drift.png. Returns (result, folder).

    embed_fn: texts -> (n, d) unit-normalised embeddings (default tunegate.retrieval.embed, MiniLM).
    Raises:
        TunegateError: no serving database, fewer than drift.min_traces requests in the window, no training
            data for the run, bad --since; with golden, missing release scores or a changed golden set.
    """
    import numpy as np

    from tunegate.core.io import atomic_write_json, atomic_write_text
    from tunegate.pipeline import run_dir_for
    from tunegate.serve import db as servedb

    cfg = project.drift
    window = parse_since(since)
    now = now or dt.datetime.now(dt.UTC)
    run_dir = run_dir_for(project, run_id)
    train = training_prompts(run_dir)
    url = servedb.project_url(project)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise TunegateError(f"{url[len('sqlite:///'):]}: no serving database (serve.database_url); nothing was served yet")
    recent = recent_requests(servedb.connect(url), window, adapter, now)
    if len(recent) < cfg.min_traces:
        which = f" for adapter {adapter}" if adapter else ""
        raise TunegateError(f"{len(recent)} request(s){which} in the last {since} in the serving database "
                            f"({url.split('://')[0]}); drift needs at least drift.min_traces = {cfg.min_traces}: widen --since")

    train_len, recent_len = word_counts(train), word_counts([r["prompt"] for r in recent])
    ti = _subsample(len(train), cfg.max_prompts, cfg.seed)
    ri = _subsample(len(recent), cfg.max_prompts, cfg.seed + 1)
    if embed_fn is None:
        from tunegate.retrieval import embed as embed_fn
    train_emb = np.asarray(embed_fn([train[i] for i in ti]), dtype=np.float64)
    recent_sub = [recent[i] for i in ri]
    recent_emb = np.asarray(embed_fn([r["prompt"] for r in recent_sub]), dtype=np.float64)

    checks: dict[str, Any] = {
        "length": length_shift(train_len, recent_len, cfg),
        "embedding": embedding_shift(train_emb, recent_emb, cfg),
        "new_clusters": new_clusters(train_emb, recent_emb, recent_sub, cfg),
    }
    if golden:
        model = adapter if adapter and adapter != "base" else (project.eval.server.candidate_model if project.eval.server else None)
        if not model:
            raise TunegateError("--golden: name the served adapter with --adapter NAME (or set eval.server.candidate_model)")
        checks["golden"] = golden_drift(project, run_dir, model)
    reasons = [c["reason"] for c in checks.values() if c["drift"]]
    by_adapter: dict[str, int] = {}
    for r in recent:
        by_adapter[r["adapter"] or "base"] = by_adapter.get(r["adapter"] or "base", 0) + 1
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    result = {
        "project": project.name, "run_id": run_id, "created_at": now.isoformat(timespec="seconds"),
        "window": {"since": since, "from": (now - window).isoformat(timespec="seconds"), "to": now.isoformat(timespec="seconds")},
        "adapter": adapter, "database": url.split("://")[0],
        "counts": {"train_prompts": len(train), "recent_prompts": len(recent), "recent_by_adapter": by_adapter},
        "settings": project.section("drift"),
        "checks": checks, "drift": bool(reasons), "reasons": reasons,
    }
    folder = Path(out_dir) if out_dir is not None else run_dir / "drift" / stamp
    write_plot(folder / "drift.png", train_len, recent_len, train_emb, recent_emb)
    atomic_write_text(folder / "drift.md", render_markdown(result))
    atomic_write_json(folder / "drift.json", result)  # last: its presence marks a complete report
    return result, folder
