"""Signed release bundles on the tiny random Llama: the release stage at the end of `tunegate run` with the
project-local key (issue 22), build, verify, tamper detection, refusals (issue 7, case C24 in docs/cases.md)."""

import json
import os
import shutil
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import chat, project_yaml, write_jsonl

from tunegate import TunegateError
from tunegate.config import load_project
from tunegate.pipeline import run_pipeline

release = pytest.importorskip("tunegate.release")
pytest.importorskip("model_signing", reason='release signing needs: pip install "model-signing>=1.1,<1.2" pyopenssl')


def cli(*args):
    return subprocess.run([sys.executable, "-m", "tunegate.cli", *map(str, args)], capture_output=True, text=True, check=False)


def _project(root, tiny_model_dir, train_section):
    labels = ["alpha", "beta", "gamma"]
    write_jsonl(root / "train.jsonl", [chat(f"message number {i} about topic {labels[i % 3]}", labels[i % 3], f"t{i}") for i in range(60)])
    write_jsonl(root / "golden.jsonl", [chat(f"golden question {i} on {labels[i % 3]}", labels[i % 3], f"g{i}") for i in range(12)])
    (root / "tunegate.yaml").write_text(project_yaml(
        "tiny", tiny_model_dir,
        train=f"{train_section}\n  trl: {{max_steps: 2, per_device_train_batch_size: 4, save_steps: 2, logging_steps: 1, warmup_steps: 0}}"))
    return root


DOCS_CALLS = []


@pytest.fixture(scope="module", autouse=True)
def stub_release_docs():
    """In-process releases render a stub of tunegate.report.release_docs (that module has its own tests);
    the CLI test below runs the real one in a subprocess."""

    def render_release_docs(run_dir, project, merged=None):
        DOCS_CALLS.append((run_dir, project.name))
        return {name: f"# {name}\n" for name in release.DOC_NAMES}

    fake = types.ModuleType("tunegate.report.release_docs")
    fake.render_release_docs = render_release_docs
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "tunegate.report.release_docs", fake)
        yield


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return release.generate_keys(tmp_path_factory.mktemp("keys") / "k")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    """A PASSed run with a plain LoRA r8 adapter (servable by vLLM as it is), through the release stage (signed
    with the project-local key it made)."""
    root = _project(tmp_path_factory.mktemp("lora"), tiny_model_dir, "  adapter: lora\n  lora: {r: 8, lora_alpha: 16}")
    manifests = run_pipeline(load_project(root / "tunegate.yaml"))
    assert manifests["eval"].verdict == "PASS" and "release" in manifests
    return root


@pytest.fixture(scope="module")
def bundle(lora_run, keys, tmp_path_factory):
    """A bundle of the same run built with `build_bundle` (`tunegate release --out`) and the `keys` pair."""
    return release.build_bundle(load_project(lora_run / "tunegate.yaml"), private_key=keys[0],
                                out_dir=tmp_path_factory.mktemp("out") / "bundle")


def test_run_ends_in_a_bundle_signed_with_the_project_local_key(lora_run):
    from tunegate.core.manifest import read_manifest, sha256_file

    project = load_project(lora_run / "tunegate.yaml")
    run_dir = lora_run / "runs" / "default"
    private, public = release.project_keys(project)  # made by the run; returned as they are
    assert (private, public) == (lora_run / ".tunegate" / "keys" / "private.pem", lora_run / ".tunegate" / "keys" / "public.pem")
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert (private.parent / ".gitignore").read_text().splitlines()[-1] == "private.pem"
    if shutil.which("git"):  # git itself agrees: the private key is ignored, the public one is not
        subprocess.run(["git", "init", "-q", str(lora_run)], check=True)
        ignored = subprocess.run(["git", "-C", str(lora_run), "check-ignore", "-q", str(private)], check=False)
        shown = subprocess.run(["git", "-C", str(lora_run), "check-ignore", "-q", str(public)], check=False)
        assert (ignored.returncode, shown.returncode) == (0, 1)
    assert release.public_key_for(project) == public

    bundle = release.bundle_dir(run_dir)
    assert bundle == run_dir / "release" / "bundle"
    m = read_manifest(run_dir / "release")
    assert m is not None and set(m.upstream) == {"data", "train", "eval", "report"}
    assert m.config == {"merge": True, "sigstore": False, "public_key_sha256": release.public_key_sha256(public.read_bytes())}
    assert sorted(p.name for p in (run_dir / "release").iterdir()) == ["bundle", "manifest.json"]
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".release")]  # no partial folder left
    info = release.verify_bundle(bundle, public)
    assert info["verdict"] == "PASS" and info["signing"]["public_key_sha256"] == m.config["public_key_sha256"]
    # item 8: the base model's sha256 (the tiny model is one local safetensors file) and project-relative sources
    weights = sorted(Path(project.base_model).glob("*.safetensors"))
    assert len(weights) == 1 and info["base_model_sha256"] == sha256_file(weights[0])
    assert info["sources"] == {name: sha256_file(lora_run / name) for name in ("golden.jsonl", "golden.lock.json", "train.jsonl")}

    # a second run skips every stage, release included: the same manifest and bundle
    before = (run_dir / "release" / "manifest.json").read_bytes()
    again = run_pipeline(project)
    assert again["release"].started_at == m.started_at
    assert (run_dir / "release" / "manifest.json").read_bytes() == before
    release.verify_bundle(bundle, public)


def test_release_cli_without_out_runs_the_release_stage(lora_run):
    """`tunegate release PROJECT` is the release stage: skipped when unchanged, rebuilt with --force into the
    same place, with the same files but release.json (its time) and the release documents."""
    run_dir = lora_run / "runs" / "default"
    bundle = release.bundle_dir(run_dir)
    files_before = json.loads((bundle / "files.json").read_text())
    manifest_before = (run_dir / "release" / "manifest.json").read_bytes()
    r = cli("release", lora_run / "tunegate.yaml")
    assert r.returncode == 0, r.stderr
    assert f"wrote {bundle}" in r.stdout and "release: unchanged" in " ".join(r.stderr.split())
    assert (run_dir / "release" / "manifest.json").read_bytes() == manifest_before
    r = cli("release", lora_run / "tunegate.yaml", "--force")
    assert r.returncode == 0, r.stderr
    assert (run_dir / "release" / "manifest.json").read_bytes() != manifest_before
    # in-process runs here render stub release docs, the CLI the real ones: those three files are left out
    files_after = json.loads((bundle / "files.json").read_text())
    for name in ("release.json", *release.DOC_NAMES):
        assert files_after.pop(name) and files_before.pop(name), name
    assert files_after == files_before and "adapter/adapter_model.safetensors" in files_after
    release.verify_bundle(bundle, lora_run / ".tunegate" / "keys" / "public.pem")


def test_a_configured_key_is_used_instead_of_making_one(lora_run, keys, tmp_path):
    root = tmp_path / "proj"
    shutil.copytree(lora_run, root, ignore=shutil.ignore_patterns("release", ".tunegate"))
    project = load_project(root / "tunegate.yaml", [f"release.key={keys[0]}"])
    assert project.release.key == keys[0]
    manifests = run_pipeline(project)
    assert not (root / ".tunegate").exists()  # no project-local key was made
    assert manifests["release"].config["public_key_sha256"] == release.public_key_sha256(keys[1].read_bytes())
    release.verify_bundle(release.bundle_dir(root / "runs" / "default"), keys[1])
    with pytest.raises(TunegateError, match="Key mismatch"):  # not signed with a key of its own
        release.verify_bundle(release.bundle_dir(root / "runs" / "default"), release.project_keys(project)[1])
    # a missing configured key is named, with its setting
    with pytest.raises(TunegateError, match=r"release.key .*nope.pem not found"):
        run_pipeline(load_project(root / "tunegate.yaml", [f"release.key={tmp_path / 'nope.pem'}"]))


def _copy(bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def test_keys_are_p256_private_0600_and_never_overwritten(tmp_path):
    from cryptography.hazmat.primitives import serialization

    r = cli("keys", "generate", "--out", tmp_path / "k")
    assert r.returncode == 0, r.stderr
    private, public = tmp_path / "k" / "private.pem", tmp_path / "k" / "public.pem"
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    key = serialization.load_pem_private_key(private.read_bytes(), None)
    assert key.curve.name == "secp256r1"
    assert serialization.load_pem_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()
    before = private.read_bytes()
    r = cli("keys", "generate", "--out", tmp_path / "k")
    assert r.returncode == 2 and "never overwritten" in r.stderr and str(private) in r.stderr
    assert private.read_bytes() == before


def test_release_writes_the_layout_and_verifies(bundle, keys, lora_run):
    run_dir = lora_run / "runs" / "default"
    for rel in ("release.json", "files.json", "model.sig", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                "manifests/data.json", "manifests/train.json", "manifests/eval.json", "manifests/report.json",
                "eval/verdict.json", "eval/scores.json", "report/report.md"):
        assert (bundle / rel).is_file(), rel
    assert not (bundle / "merged").exists()  # LoRA r8: vLLM serves it as it is
    assert not [p.name for p in bundle.parent.iterdir() if p.name.startswith(".bundle")]  # no partial folders
    info = json.loads((bundle / "release.json").read_text())
    train = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert info["project"] == "tiny" and info["run_id"] == "default" and info["verdict"] == "PASS"
    assert info["adapter_type"] == "lora" and info["lora_rank"] == 8 and info["lora_alpha"] == 16 and info["method"] == "sft"
    assert info["adapter_sha256"] == train["outputs"]["adapter/adapter_model.safetensors"]
    assert info["scores"] == json.loads((run_dir / "eval" / "scores.json").read_text())
    assert info["vllm"] == {"servable_as_lora": True, "reasons": [], "merged": None}
    assert "base_model_sha256" in info and info["tunegate_version"] and info["created_at"]
    assert isinstance(info["target_modules"], list) and info["modules_to_save"] is None
    # the manifests are byte copies: their upstream links hold inside the bundle
    assert (bundle / "manifests" / "eval.json").read_bytes() == (run_dir / "eval" / "manifest.json").read_bytes()
    files = json.loads((bundle / "files.json").read_text())
    assert "release.json" in files and "model.sig" not in files and "files.json" not in files

    assert release.verify_bundle(bundle, keys[1]) == info
    r = cli("verify", bundle, "--key", keys[1])
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr

    r = cli("release", lora_run / "tunegate.yaml", "--key", keys[0], "--out", bundle)  # an existing bundle is kept
    assert r.returncode == 2 and "--force" in r.stderr
    r = cli("release", lora_run / "tunegate.yaml", "--key", keys[0], "--sigstore")
    assert r.returncode == 2 and "give one of them" in r.stderr


def _flip_byte(path, offset=-10):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("tamper,named", [
    (lambda b: _flip_byte(b / "adapter" / "adapter_model.safetensors"), "changed: adapter/adapter_model.safetensors"),
    (lambda b: (b / "adapter" / "extra.py").write_text("print('hi')\n"), "added: adapter/extra.py"),
    (lambda b: (b / ".gitattributes").write_text("* binary\n"), "added: .gitattributes"),
    (lambda b: (b / "eval" / "scores.json").unlink(), "removed: eval/scores.json"),
    (lambda b: (b / "release.json").write_text((b / "release.json").read_text().replace('"lora_rank": 8', '"lora_rank": 16')),
     "changed: release.json"),
], ids=["weights-byte", "added-file", "added-git-file", "removed-file", "edited-release-json"])
def test_tampering_is_detected_and_names_the_file(bundle, keys, tmp_path, tamper, named):
    b = _copy(bundle, tmp_path)
    tamper(b)
    with pytest.raises(TunegateError, match="does not verify") as exc:
        release.verify_bundle(b, keys[1])
    assert named in str(exc.value)


def test_a_rewritten_file_list_does_not_hide_a_change(bundle, keys, tmp_path):
    """Changing the weights and updating files.json to match: the signature and the train manifest still catch it."""
    from tunegate.core.manifest import sha256_file

    b = _copy(bundle, tmp_path)
    _flip_byte(b / "adapter" / "adapter_model.safetensors")
    files = json.loads((b / "files.json").read_text())
    files["adapter/adapter_model.safetensors"] = sha256_file(b / "adapter" / "adapter_model.safetensors")
    (b / "files.json").write_text(json.dumps(files))
    r = cli("verify", b, "--key", keys[1])
    assert r.returncode == 2
    assert "adapter/adapter_model.safetensors: sha256 differs from the one manifests/train.json records" in r.stderr
    assert "files differ from the signed ones: changed: adapter/adapter_model.safetensors, files.json" in r.stderr, r.stderr


def test_wrong_public_key_is_refused(bundle, tmp_path):
    _, other_public = release.generate_keys(tmp_path / "other")
    with pytest.raises(TunegateError, match=r"signature does not verify with public key .*Key mismatch"):
        release.verify_bundle(bundle, other_public)
    r = cli("verify", bundle, "--key", other_public)
    assert r.returncode == 2 and "does not verify" in r.stderr


def test_unsigned_bundle_is_refused(bundle, keys, tmp_path):
    b = _copy(bundle, tmp_path)
    (b / "model.sig").unlink()
    with pytest.raises(TunegateError, match="unsigned bundle is never trusted"):
        release.verify_bundle(b, keys[1])


def test_c24_empty_folders_are_neither_signed_nor_verified(tmp_path, keys):
    empty = tmp_path / "adapter"
    (empty / "sub").mkdir(parents=True)  # folders, but no regular file
    with pytest.raises(TunegateError, match="no regular files to sign"):
        release.sign_directory(empty, tmp_path / "adapter.sig", private_key=keys[0])
    assert not (tmp_path / "adapter.sig").exists()
    with pytest.raises(TunegateError, match="no regular files to verify"):
        release.verify_bundle(empty, keys[1])
    # a bundle holding only its signature is as empty
    (empty / "model.sig").write_text("{}")
    with pytest.raises(TunegateError, match="no regular files to verify"):
        release.verify_bundle(empty, keys[1])
    with pytest.raises(TunegateError, match="no regular files to verify"):
        release.verify_signature(empty, empty / "model.sig", keys[1])
    r = cli("verify", empty, "--key", keys[1])
    assert r.returncode == 2 and "no regular files to verify" in r.stderr
    # a folder with files signs and verifies with the same helpers
    (empty / "w.bin").write_bytes(b"\x00\x01")
    release.sign_directory(empty, empty / "model.sig", private_key=keys[0])
    release.verify_signature(empty, empty / "model.sig", keys[1])


def test_fail_verdict_is_refused_naming_the_rules(lora_run, keys, tmp_path):
    root = tmp_path / "proj"
    shutil.copytree(lora_run, root, ignore=shutil.ignore_patterns("release", ".tunegate"))
    r = cli("run", root / "tunegate.yaml", "eval.gate.0.min=0.99")  # `tunegate run`: the gate fails, no release
    assert r.returncode == 3, r.stderr
    assert "release: skipped (eval verdict FAIL)" in " ".join(r.stderr.split())
    project = load_project(root / "tunegate.yaml", ["eval.gate.0.min=0.99"])
    manifests = run_pipeline(project)
    assert manifests["eval"].verdict == "FAIL" and "report" in manifests and "release" not in manifests
    with pytest.raises(TunegateError, match=r"eval verdict FAIL; failing rules: exact_match: candidate >= 0.99 \(measured"):
        release.build_bundle(project, private_key=keys[0])
    r = cli("release", root / "tunegate.yaml", "eval.gate.0.min=0.99", "--key", keys[0])
    assert r.returncode == 2 and "eval verdict FAIL" in r.stderr
    r = cli("release", root / "tunegate.yaml", "eval.gate.0.min=0.99")  # the stage path: nothing written, no key made
    assert r.returncode == 2 and "eval verdict FAIL" in r.stderr
    assert not [p.name for p in (root / "runs" / "default").iterdir() if "release" in p.name]
    assert not (root / ".tunegate").exists()


def test_a_fail_after_a_pass_removes_the_older_bundle_and_says_so(lora_run, tmp_path, capsys):
    root = tmp_path / "proj"
    shutil.copytree(lora_run, root)  # a PASSed run with its release/bundle
    run_dir = root / "runs" / "default"
    assert release.bundle_dir(run_dir).is_dir()
    project = load_project(root / "tunegate.yaml", ["eval.gate.0.min=0.99"])
    run_pipeline(project, until="report")  # the release stage is not planned; the eval stage's FAIL removes it
    out = " ".join(capsys.readouterr().err.split())
    assert f"release: removed the release of an earlier chain, {run_dir / 'release'} (eval verdict FAIL)" in out
    summary = out.split("summary", 1)[1]
    assert "verdict FAIL" in summary and "bundle" not in summary
    assert not [p.name for p in run_dir.iterdir() if "release" in p.name]  # no folder, no aside left
    shutil.copytree(lora_run / "runs" / "default" / "release", run_dir / "release")  # an older PASS's bundle again
    manifests = run_pipeline(project)  # eval unchanged (FAIL): the release gate removes it
    assert manifests["eval"].verdict == "FAIL" and "release" not in manifests
    out = " ".join(capsys.readouterr().err.split())
    assert f"release: skipped (eval verdict FAIL; removed the release of an earlier chain, {run_dir / 'release'})" in out
    assert not [p.name for p in run_dir.iterdir() if "release" in p.name]
    summary = out.split("summary", 1)[1]
    assert "verdict FAIL" in summary and "bundle" not in summary and str(run_dir / "report" / "report.html") in summary


def test_changed_adapter_is_refused(lora_run, keys, tmp_path):
    root = tmp_path / "proj"
    shutil.copytree(lora_run, root, ignore=shutil.ignore_patterns("release"))
    _flip_byte(root / "runs" / "default" / "train" / "adapter" / "adapter_model.safetensors")
    with pytest.raises(TunegateError, match=r"no longer has the sha256 the train manifest recorded: adapter/adapter_model.safetensors \(changed\)"):
        release.build_bundle(load_project(root / "tunegate.yaml"), private_key=keys[0])
    assert not (root / "runs" / "default" / "release").exists()


def test_a_failure_midway_leaves_nothing(lora_run, keys, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("killed while signing")

    monkeypatch.setattr(release, "sign_directory", boom)
    out = tmp_path / "out" / "bundle"
    with pytest.raises(RuntimeError, match="killed while signing"):
        release.build_bundle(load_project(lora_run / "tunegate.yaml"), private_key=keys[0], out_dir=out)
    assert not out.exists() and list((tmp_path / "out").iterdir()) == []


def test_release_docs_are_written_and_signed(bundle, lora_run, keys, tmp_path, monkeypatch, capsys):
    assert (lora_run / "runs" / "default", "tiny") in DOCS_CALLS
    for name in release.DOC_NAMES:
        assert (bundle / name).read_text() == f"# {name}\n"
    assert set(release.DOC_NAMES) <= set(json.loads((bundle / "files.json").read_text()))
    b = _copy(bundle, tmp_path)
    (b / "dpia.md").write_text("# edited\n")
    with pytest.raises(TunegateError, match="changed: dpia.md"):
        release.verify_bundle(b, keys[1])
    # without the docs module the bundle is still built, signed and verifiable, and the log says what is missing
    monkeypatch.setitem(sys.modules, "tunegate.report.release_docs", None)  # `import` raises ImportError
    out = release.build_bundle(load_project(lora_run / "tunegate.yaml"), private_key=keys[0], out_dir=tmp_path / "nodocs")
    assert not [n for n in release.DOC_NAMES if (out / n).exists()]
    assert "MODEL_CARD.md, article25.md, dpia.md not written" in " ".join(capsys.readouterr().err.split())
    release.verify_bundle(out, keys[1])


def test_release_cli_end_to_end(lora_run, keys, tmp_path):
    """`tunegate release` then `tunegate verify` in fresh processes, with the installed release_docs module."""
    out = tmp_path / "cli-bundle"
    r = cli("release", lora_run / "tunegate.yaml", "--key", keys[0], "--out", out)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout
    r = cli("verify", out, "--key", keys[1])
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr
    if os.path.isfile(os.path.join(os.path.dirname(release.__file__), "report", "release_docs.py")):
        for name in release.DOC_NAMES:
            assert (out / name).is_file() and (out / name).read_text().strip(), name


@pytest.mark.parametrize("cfg,servable,why", [
    ({"r": 16, "use_dora": False, "bias": "none", "modules_to_save": None}, True, []),
    ({"r": 24, "use_dora": False, "bias": "none"}, True, []),  # served with --max-lora-rank 32 (C14)
    ({"r": 1024, "use_dora": False, "bias": "none"}, False, ["rank 1024 is above vLLM's largest --max-lora-rank (512)"]),
    ({"r": 16, "modules_to_save": ["lm_head"]}, False, ["modules_to_save ['lm_head']"]),
    ({"r": 16, "use_dora": True}, False, ["DoRA"]),
    ({"r": 16, "bias": "lora_only"}, False, ["trained biases"]),
    ({"r": 16, "rank_pattern": {"q_proj": 600}}, False, ["rank 600 is above"]),
])
def test_vllm_compatibility_names_every_reason(cfg, servable, why):
    ok, reasons = release.vllm_compatibility(cfg)
    assert ok is servable and len(reasons) == len(why)
    for w, r in zip(why, reasons):
        assert r.startswith(w)


def test_c14_max_lora_rank_comes_from_the_largest_adapter_rank():
    assert [release.max_lora_rank_for(r) for r in ([4], [16], [16, 24], [1], [320])] == [8, 16, 32, 1, 320]
    with pytest.raises(ValueError, match="rank 600 is above"):
        release.max_lora_rank_for([8, 600])


def test_dora_adapter_is_released_with_a_checked_merge(tmp_path_factory, tiny_model_dir, keys, tmp_path):
    root = _project(tmp_path_factory.mktemp("dora"), tiny_model_dir, "  adapter: dora\n  lora: {r: 4, lora_alpha: 8}")
    project = load_project(root / "tunegate.yaml")
    assert run_pipeline(project, until="eval")["eval"].verdict == "PASS"
    out = release.build_bundle(project, private_key=keys[0], out_dir=tmp_path / "dora-bundle")
    info = release.verify_bundle(out, keys[1])
    assert info["adapter_type"] == "dora" and info["vllm"]["servable_as_lora"] is False and info["vllm"]["merged"] == "merged/"
    assert any(r.startswith("DoRA") for r in info["vllm"]["reasons"])
    assert len(info["vllm"]["reasons"]) == 1  # rank 4 alone would be served (with --max-lora-rank 8)
    check = json.loads((out / "merged" / "merge_check.json").read_text())
    assert check["passed"] and (out / "merged" / "model.safetensors").is_file()
    assert not (out / "manifests" / "report.json").exists()  # only the stages that ran
    assert not [p.name for p in (out / "merged").iterdir() if p.name.startswith(".")]

    b = _copy(out, tmp_path)
    _flip_byte(b / "merged" / "model.safetensors")
    with pytest.raises(TunegateError, match="changed: merged/model.safetensors"):
        release.verify_bundle(b, keys[1])

    release.build_bundle(project, private_key=keys[0], out_dir=tmp_path / "nomerge", merge=False)
    info = release.verify_bundle(tmp_path / "nomerge", keys[1])
    assert info["vllm"]["servable_as_lora"] is False and info["vllm"]["merged"] is None and info["vllm"]["reasons"]
    assert not (tmp_path / "nomerge" / "merged").exists()


def test_importing_the_release_module_loads_neither_torch_nor_model_signing():
    code = ("import sys, tunegate, tunegate.cli, tunegate.release; "
            "print([m for m in ('torch', 'model_signing', 'sigstore') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_force_interrupted_at_the_swap_keeps_the_old_bundle(bundle, keys, lora_run, tmp_path, monkeypatch):
    """`--force` builds the new bundle in `.NAME.PID-TOKEN.partial` and swaps it in (core.io.publish_dir); an
    error at the swap leaves the old bundle in place and nothing beside it (kills: tests/integration/test_kill.py)."""
    from tunegate.core import io as tio

    project = load_project(lora_run / "tunegate.yaml")
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    before = release.verify_bundle(out, keys[1])

    def interrupted(a, b):
        raise KeyboardInterrupt

    monkeypatch.setattr(tio, "_exchange", interrupted)
    with pytest.raises(KeyboardInterrupt):
        release.build_bundle(project, private_key=keys[0], out_dir=out, force=True)
    monkeypatch.undo()
    assert release.verify_bundle(out, keys[1]) == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no partial folder left


def test_a_bundle_an_earlier_tunegate_set_aside_is_never_restored_over_a_deleted_one(bundle, keys, lora_run, tmp_path):
    """The old two-rename swap left `.NAME.old-PID` when killed after its second rename; the next release put it
    back, also over a bundle the user had deleted meanwhile. Now it is named in one line and the user decides."""
    project = load_project(lora_run / "tunegate.yaml")
    out = tmp_path / "bundle"
    shutil.copytree(bundle, tmp_path / ".bundle.old-999999999")  # set aside by a dead process; `out` deleted since
    with pytest.raises(TunegateError, match=r"\.bundle\.old-999999999: a copy of bundle that an earlier tunegate set aside.*"
                                            r"not restored.*or pass --force"):
        release.build_bundle(project, private_key=keys[0], out_dir=out)
    assert not out.exists() and (tmp_path / ".bundle.old-999999999").is_dir()
    release.build_bundle(project, private_key=keys[0], out_dir=out, force=True)  # the user chose a new bundle
    release.verify_bundle(out, keys[1])
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]

    shutil.copytree(bundle, tmp_path / ".bundle.old-999999998")  # beside a bundle in place: stale, deleted
    with pytest.raises(TunegateError, match="a release bundle exists"):
        release.build_bundle(project, private_key=keys[0], out_dir=out)
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
