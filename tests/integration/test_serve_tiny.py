"""The embedded server on the tiny Llama: two real signed release bundles (two runs of the pipeline), tenant
isolation, refusal of unsigned / tampered / FAIL bundles, per-request adapter switching, traces, feedback
exactly once under concurrent posts, and the feedback export read back by the data stage's own reader."""

import json
import shutil
import threading

import pytest
from conftest import chat, project_yaml, write_jsonl

from tunegate import TunegateError
from tunegate.config import BundleConfig, SourceConfig, load_project
from tunegate.serve import db as servedb

pytestmark = pytest.mark.serve


def _yaml(tiny_model_dir, serve: str = "") -> str:
    # init_lora_weights false: B starts random too, so two seeds give two visibly different adapters
    return project_yaml("svc", tiny_model_dir, extra=serve, eval_="  max_new_tokens: 2\n  batch_size: 12\n  bootstrap_samples: 100", train=(
        "  adapter: lora\n  lora: {r: 8, lora_alpha: 16, init_lora_weights: false}\n"
        "  trl: {max_steps: 1, per_device_train_batch_size: 4, save_steps: 1, logging_steps: 1, warmup_steps: 0}"))


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    """A project with two signed PASS bundles (support: seed 1, sales: seed 2), its app, and three tenants."""
    from tunegate.pipeline import run_pipeline
    from tunegate.release import build_bundle, generate_keys

    root = tmp_path_factory.mktemp("serve-project")
    labels = ["alpha", "beta", "gamma"]
    write_jsonl(root / "train.jsonl", [chat(f"message {i} about {labels[i % 3]}", labels[i % 3], f"t{i}") for i in range(24)])
    write_jsonl(root / "golden.jsonl", [chat(f"golden {i} on {labels[i % 3]}", labels[i % 3], f"g{i}") for i in range(6)])
    (root / "tunegate.yaml").write_text(_yaml(tiny_model_dir))
    private, public = generate_keys(root / "keys")
    for run_id, seed, name in (("a", 1, "support"), ("b", 2, "sales")):
        project = load_project(root / "tunegate.yaml", [f"train.seed={seed}"])
        run_pipeline(project, run_id=run_id, until="eval")
        build_bundle(project, run_id, private_key=private, out_dir=root / "bundles" / name, merge=False)
    (root / "tunegate.yaml").write_text(_yaml(tiny_model_dir, "serve:\n  bundles: [bundles/support, bundles/sales]\n"
                                                              "  public_key: keys/public.pem\n  max_new_tokens: 16\n"))
    project = load_project(root / "tunegate.yaml")
    from tunegate.serve import create_app

    app = create_app(project)
    db = servedb.connect(servedb.project_url(project))
    keys = {
        "acme": servedb.add_tenant(db, "acme", ["support"]),
        "globex": servedb.add_tenant(db, "globex", ["sales"], allow_base=True),
        "ops": servedb.add_tenant(db, "ops", ["support", "sales"], allow_base=True),
    }
    return {"root": root, "project": project, "app": app, "db": db, "keys": keys, "private": private, "public": public}


@pytest.fixture(scope="module")
def client(served):
    from fastapi.testclient import TestClient

    with TestClient(served["app"]) as c:
        yield c


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def ask(client, key, model, text="Tell me about alpha.", **extra):
    body = {"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": 12, **extra}
    return client.post("/v1/chat/completions", json=body, headers=auth(key))


# ---------------------------------------------------------------- access

def test_health_and_models_per_tenant(served, client):
    h = client.get("/health").json()
    base = served["app"].state.engine.base_name
    assert h == {"status": "ok", "engine": "embedded", "adapters_loaded": 2}  # no adapter names without a key
    ids = lambda k: [m["id"] for m in client.get("/v1/models", headers=auth(served["keys"][k])).json()["data"]]
    assert ids("acme") == ["support"]
    assert ids("globex") == [base, "sales"]
    assert client.get("/v1/models").status_code == 401


def test_tenant_cannot_reach_another_tenants_adapter(served, client):
    keys = served["keys"]
    ok = ask(client, keys["acme"], "support")
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["id"].startswith("chatcmpl-") and ok.headers["X-Trace-Id"] == body["id"]
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] >= 1

    r = ask(client, keys["acme"], "sales")  # globex's adapter
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    r = ask(client, keys["acme"], served["app"].state.engine.base_name)  # base not granted to acme
    assert r.status_code == 403
    r = ask(client, keys["acme"], "no-such-adapter")  # 403 too: no probing for other tenants' names
    assert r.status_code == 403
    r = ask(client, keys["globex"], "support")
    assert r.status_code == 403
    for bad in ("tg-not-a-key", keys["acme"] + "x"):
        r = ask(client, bad, "support")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert r.headers["WWW-Authenticate"] == "Bearer"
    r = client.post("/v1/chat/completions", json={"model": "support", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401


def test_revoked_key_gets_401(served, client):
    key = servedb.add_tenant(served["db"], "temp", ["support"])
    assert ask(client, key, "support").status_code == 200
    servedb.revoke_tenant(served["db"], "temp")
    assert ask(client, key, "support").status_code == 401


def test_invalid_requests_are_400_in_openai_shape(served, client):
    key = served["keys"]["acme"]
    r = client.post("/v1/chat/completions", json={"model": "support", "messages": [{"role": "wizard", "content": "x"}]}, headers=auth(key))
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_role"
    r = client.post("/v1/chat/completions", json={"model": "support", "messages": [{"role": "user", "content": "q"},
                                                                                   {"role": "assistant", "content": "a"}]}, headers=auth(key))
    assert r.status_code == 400 and "last message" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"model": "support", "messages": []}, headers=auth(key))
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------- adapters

def test_each_adapter_and_the_base_model_answer_differently(served, client):
    key = served["keys"]["ops"]
    base = served["app"].state.engine.base_name
    answers = {}
    for model in (base, "support", "sales", "support", base):  # switch back and forth: selection is per request
        r = ask(client, key, model, "message 3 about alpha")
        assert r.status_code == 200, r.text
        answers.setdefault(model, set()).add(r.json()["choices"][0]["message"]["content"])
    assert all(len(v) == 1 for v in answers.values()), answers  # greedy: the same model answers the same
    texts = [next(iter(answers[m])) for m in (base, "support", "sales")]
    assert len(set(texts)) == 3, texts
    trace = servedb.get_trace(served["db"], r.json()["id"])
    assert trace["adapter"] is None and trace["model"] == base and trace["tenant"] == "ops"


def test_stream_sends_the_answer_and_done(served, client):
    key = served["keys"]["acme"]
    plain = ask(client, key, "support").json()["choices"][0]["message"]["content"]
    r = ask(client, key, "support", stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == plain
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert servedb.get_trace(served["db"], chunks[0]["id"])["params"]["stream"] is True


def _resign(bundle, private):
    """Re-sign a bundle after editing it (files.json and model.sig rewritten): a validly signed bundle."""
    from tunegate.core.io import atomic_write_json
    from tunegate.core.manifest import sha256_file
    from tunegate.release import list_files, sign_directory

    (bundle / "model.sig").unlink()
    (bundle / "files.json").unlink()
    files, _ = list_files(bundle)
    atomic_write_json(bundle / "files.json", {rel: sha256_file(bundle / rel) for rel in files})
    sign_directory(bundle, bundle / "model.sig", private_key=private)


def test_unsigned_tampered_wrong_key_and_fail_bundles_are_refused(served, tmp_path):
    from tunegate.release import generate_keys
    from tunegate.serve.bundles import check_bundle
    from tunegate.serve.engine import EmbeddedEngine

    good = served["root"] / "bundles" / "support"
    project, public = served["project"], served["public"]
    assert check_bundle(good, public, project)["verdict"] == "PASS"

    unsigned = tmp_path / "unsigned"
    shutil.copytree(good, unsigned)
    (unsigned / "model.sig").unlink()
    with pytest.raises(TunegateError, match="unsigned"):
        check_bundle(unsigned, public, project)

    tampered = tmp_path / "tampered"
    shutil.copytree(good, tampered)
    cfg = json.loads((tampered / "adapter" / "adapter_config.json").read_text())
    (tampered / "adapter" / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 999}))
    with pytest.raises(TunegateError, match=r"signature check failed(.|\n)*adapter/adapter_config.json"):
        check_bundle(tampered, public, project)

    _, other_public = generate_keys(tmp_path / "other-keys")
    with pytest.raises(TunegateError, match="signature check failed"):
        check_bundle(good, other_public, project)
    with pytest.raises(TunegateError, match="serve.public_key is not set"):
        check_bundle(good, None, project)

    failed = tmp_path / "failed"
    shutil.copytree(good, failed)
    release = json.loads((failed / "release.json").read_text())
    (failed / "release.json").write_text(json.dumps({**release, "verdict": "FAIL"}))
    _resign(failed, served["private"])  # a bundle signed by the right key, saying FAIL
    with pytest.raises(TunegateError, match="FAIL"):
        check_bundle(failed, public, project)

    # the server refuses to start, naming every refused bundle and its reason
    bundles = [BundleConfig(path=good, name="ok"), BundleConfig(path=unsigned), BundleConfig(path=failed)]
    with pytest.raises(TunegateError) as err:
        EmbeddedEngine.load(project, bundles, public)
    msg = str(err.value)
    assert f"{unsigned}: refused: unsigned" in msg and f"{failed}: refused" in msg and "FAIL" in msg
    assert str(good) not in msg


def test_vllm_engine_without_its_environment_names_the_install_command(served, tmp_path):
    from tunegate.serve import serve

    with pytest.raises(TunegateError, match="tunegate serve-setup vllm"):
        serve(served["project"], engine="vllm", vllm_venv=tmp_path / "no-venv")
    with pytest.raises(TunegateError, match="unknown"):
        serve(served["project"], engine="tgi")


# ---------------------------------------------------------------- feedback

def test_feedback_round_trip_to_training_sources(served, client):
    from typer.testing import CliRunner

    from tunegate.cli import app as cli_app
    from tunegate.data.records import read_source

    acme, globex = served["keys"]["acme"], served["keys"]["globex"]
    t1 = ask(client, acme, "support", "How do I reset my password?").json()
    t2 = ask(client, acme, "support", "What are your opening hours?").json()
    r = client.post("/v1/feedback", json={"trace_id": t1["id"], "rating": "down",
                                          "edited_answer": "Use the 'Forgot password' link on the sign-in page."}, headers=auth(acme))
    assert r.status_code == 201 and r.json()["replayed"] is False
    r2 = client.post("/v1/feedback", json={"trace_id": t1["id"], "rating": "down",
                                           "edited_answer": "Use the 'Forgot password' link on the sign-in page."}, headers=auth(acme))
    assert r2.status_code == 200 and r2.json()["replayed"] is True and r2.json()["id"] == r.json()["id"]
    assert client.post("/v1/feedback", json={"trace_id": t2["id"], "rating": "up"}, headers=auth(acme)).status_code == 201
    # another tenant's trace looks like no trace; a reused key with another body is a conflict
    assert client.post("/v1/feedback", json={"trace_id": t1["id"], "rating": "up"}, headers=auth(globex)).status_code == 404
    h = {**auth(acme), "Idempotency-Key": "retry-1"}
    assert client.post("/v1/feedback", json={"trace_id": t2["id"], "rating": "up"}, headers=h).status_code == 201
    c = client.post("/v1/feedback", json={"trace_id": t2["id"], "rating": "down"}, headers=h)
    assert c.status_code == 409 and c.json()["error"]["code"] == "idempotency_key_reused"
    assert client.post("/v1/feedback", json={"trace_id": t2["id"], "rating": "meh"}, headers=auth(acme)).status_code == 400
    assert client.post("/v1/feedback", json={"trace_id": t2["id"], "rating": "up", "edited_answer": " "}, headers=auth(acme)).status_code == 400

    # the random model's answers end by max_tokens, and an answer cut short is left out of the export
    # (truncated_response): these two are marked as whole answers to follow them through the export
    from sqlalchemy import update

    traces = servedb.tables()["traces"]
    with served["db"].begin() as con:
        con.execute(update(traces).where(traces.c.id.in_([t1["id"], t2["id"]])).values(finish_reason="stop"))
    out = served["root"] / "fb-export"
    res = CliRunner().invoke(cli_app, ["data", "feedback", str(served["root"] / "tunegate.yaml"), "--out", str(out), "--adapter", "support"])
    assert res.exit_code == 0, res.output
    assert "preference pair" in res.output and "format: kto" in res.output
    pairs, rej = read_source(SourceConfig(path=out / "preference.jsonl", format="preference"))
    assert not rej
    pair = next(p for p in pairs if p["meta"]["trace_id"] == t1["id"])
    assert pair["messages"] == [{"role": "user", "content": "How do I reset my password?"},
                                {"role": "assistant", "content": "Use the 'Forgot password' link on the sign-in page."}]
    assert pair["rejected"] == t1["choices"][0]["message"]["content"].strip()
    assert pair["meta"]["source"] == "feedback" and pair["meta"]["tenant"] == "acme" and pair["meta"]["adapter"] == "support"
    kto, rej = read_source(SourceConfig(path=out / "kto.jsonl", format="kto"))
    labels = {k["meta"]["trace_id"]: k["label"] for k in kto}
    assert labels[t1["id"]] is False and labels[t2["id"]] is True
    assert json.loads((out / "feedback_stats.json").read_text())["preference_rows"] >= 1


def test_concurrent_feedback_over_http_is_written_exactly_once(served):
    """16 clients on a real uvicorn server, each posting its feedback 3 times at once with one Idempotency-Key."""
    import httpx

    from tunegate.serve import start_background

    srv = start_background(served["app"])
    try:
        key = served["keys"]["ops"]
        before = servedb.count_feedback(served["db"])
        traces, statuses, errors = [None] * 16, [], []

        def client_run(i):
            try:
                with httpx.Client(base_url=srv.url, headers=auth(key), timeout=60) as c:
                    r = c.post("/chat/completions", json={"model": "sales", "max_tokens": 4, "temperature": 0,
                                                          "messages": [{"role": "user", "content": f"question {i}"}]})
                    r.raise_for_status()
                    traces[i] = r.json()["id"]
                    for _ in range(3):
                        f = c.post("/feedback", json={"trace_id": traces[i], "rating": "up" if i % 2 else "down"},
                                   headers={"Idempotency-Key": f"fb-{i}"})
                        statuses.append(f.status_code)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=client_run, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert sorted(statuses).count(201) == 16 and statuses.count(200) == 32
        assert servedb.count_feedback(served["db"]) - before == 16
        assert len(set(traces)) == 16
    finally:
        srv.stop()


def test_tenants_cli_prints_the_key_once_and_stores_its_hash(served):
    from typer.testing import CliRunner

    from tunegate.cli import app as cli_app

    yaml = str(served["root"] / "tunegate.yaml")
    r = CliRunner().invoke(cli_app, ["tenants", "add", yaml, "initech", "--adapter", "support"])
    assert r.exit_code == 0, r.output
    key = r.output.strip().splitlines()[-1]
    assert key.startswith("tg-") and servedb.tenant_for_key(served["db"], key).name == "initech"
    r = CliRunner().invoke(cli_app, ["tenants", "add", yaml, "bad", "--adapter", "nope"])
    assert r.exit_code != 0 and "not served by this project" in str(r.exception)
    name = load_project(served["root"] / "tunegate.yaml").name  # the registry's production version is served as the project name
    r = CliRunner().invoke(cli_app, ["tenants", "add", yaml, "registry-user", "--adapter", name])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli_app, ["tenants", "list", yaml])
    assert "initech\tactive" in r.output and key not in r.output
    assert CliRunner().invoke(cli_app, ["tenants", "revoke", yaml, "initech"]).exit_code == 0
    assert "initech\trevoked" in CliRunner().invoke(cli_app, ["tenants", "list", yaml]).output
    assert servedb.tenant_for_key(served["db"], key) is None


def test_serve_command_refuses_to_start_on_a_refused_bundle(served):
    from typer.testing import CliRunner

    from tunegate.cli import app as cli_app

    yaml = str(served["root"] / "tunegate.yaml")
    r = CliRunner().invoke(cli_app, ["serve", yaml, "serve.public_key=keys/missing.pem", "--port", "0"])
    assert isinstance(r.exception, TunegateError)
    msg = str(r.exception)
    assert "bundles/support: refused: serve.public_key" in msg and "bundles/sales: refused" in msg
    r = CliRunner().invoke(cli_app, ["serve", yaml, "--engine", "vllm", "--vllm-venv", str(served["root"] / "no-venv")])
    assert isinstance(r.exception, TunegateError) and "tunegate serve-setup vllm" in str(r.exception)


def test_feedback_off_closes_the_endpoint_but_still_traces(served, tmp_path):
    from fastapi.testclient import TestClient

    from tunegate.serve import create_app

    project = load_project(served["root"] / "tunegate.yaml", ["serve.feedback=false"])
    url = servedb.default_url(tmp_path)
    key = servedb.add_tenant(servedb.connect(url), "solo", ["support"])
    app = create_app(project, engine=served["app"].state.engine, database_url=url)  # the loaded model, another database
    with TestClient(app) as c:
        trace_id = ask(c, key, "support").json()["id"]
        assert servedb.get_trace(app.state.db, trace_id)["tenant"] == "solo"
        r = c.post("/v1/feedback", json={"trace_id": trace_id, "rating": "up"}, headers=auth(key))
        assert r.status_code == 403 and r.json()["error"]["code"] == "feedback_disabled"
    assert servedb.count_feedback(app.state.db) == 0
