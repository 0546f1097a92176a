"""kill -9 of `tunegate data`, `tunegate release` and `tunegate promote` at every step of their publish (issue 23,
kind 6), on the tiny-model project.

Each command runs as a subprocess that `TUNEGATE_FAULT` makes SIGKILL itself at a named step
(core/io.fault_point), or that the test kills after a delay (anywhere in its work); then the command runs again,
and its files must equal a clean run's, with nothing left anywhere in the project: no staging folder
(`.partial`), no set-aside copy (`.old`, `.old-PID`), no temporary file (`.tmp`), no stray registry copy.

The default tests take about a minute. `TUNEGATE_KILL_SWEEP=1` adds the long sweep (several minutes): a DoRA
release, whose merge (`export`) publishes inside the release's staging folder, killed at each step of both
publishes, and a sweep of delays over `data` and that release.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import chat, project_yaml, write_jsonl

from tunegate.config import load_project
from tunegate.core.manifest import read_manifest, sha256_file
from tunegate.pipeline import run_pipeline

release = pytest.importorskip("tunegate.release")
pytest.importorskip("model_signing", reason='release signing needs: pip install "model-signing>=1.1,<1.2" pyopenssl')

SRC = str(Path(__file__).resolve().parents[2] / "src")
LEFTOVER = re.compile(r"\.(partial|old|tmp)$|\.old-\d+$")
# Files of the data stage whose bytes depend on the clock: the rest must be byte-identical after a kill and rerun.
TIMED = {"timings.json", "data_card.md", "data_card.html"}
sweep = pytest.mark.skipif(not os.environ.get("TUNEGATE_KILL_SWEEP"), reason="the long kill -9 sweep (minutes): set TUNEGATE_KILL_SWEEP=1")


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    """A PASSed run with a LoRA r8 adapter (released as it is, no merge; the release stage signed it with the
    project-local key) and a second key pair, keys/, that `tunegate release --key` signs with."""
    root = tmp_path_factory.mktemp("kill")
    labels = ["alpha", "beta", "gamma"]
    write_jsonl(root / "train.jsonl", [chat(f"message number {i} about topic {labels[i % 3]}", labels[i % 3], f"t{i}") for i in range(60)])
    write_jsonl(root / "golden.jsonl", [chat(f"golden question {i} on {labels[i % 3]}", labels[i % 3], f"g{i}") for i in range(12)])
    (root / "tunegate.yaml").write_text(project_yaml(
        "tiny", tiny_model_dir, train="  adapter: lora\n  lora: {r: 8, lora_alpha: 16}\n"
        "  trl: {max_steps: 2, per_device_train_batch_size: 4, save_steps: 2, logging_steps: 1, warmup_steps: 0}"))
    assert run_pipeline(load_project(root / "tunegate.yaml"))["eval"].verdict == "PASS"
    release.generate_keys(root / "keys")
    return root


def tunegate(root, *args, fault=None, kill_after_s=None):
    """Run the CLI in `root`; SIGKILLed at `fault` (a fault point) or after `kill_after_s`. Returns the exit status
    (-9: killed) and the seconds it ran."""
    env = dict(os.environ, PYTHONPATH=SRC, TUNEGATE_FAULT=fault or "")
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "tunegate.cli", *map(str, args)], cwd=root, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = p.communicate(timeout=kill_after_s if kill_after_s is not None else 600)
    except subprocess.TimeoutExpired:
        p.kill()  # SIGKILL
        _, err = p.communicate()
    assert p.returncode in (0, -9), err[-3000:]
    return p.returncode, time.perf_counter() - t0


def leftovers(root):
    found = [str(p.relative_to(root)) for p in root.rglob("*") if LEFTOVER.search(p.name)]
    for folder, column in (("adapters", "adapter_dir"), ("bundles", "bundle_dir")):
        if (root / folder).is_dir():  # one copy per row
            rows = {Path(v[column]).name for v in _versions(root) if v[column]}
            found += [f"{folder}/{p.name}" for p in (root / folder).iterdir() if p.name not in rows]
    return sorted(found)


def _versions(root):
    from tunegate import registry

    return registry.versions(root / "tunegate.db", "tiny")


def data_files(root, run_id):
    stage = root / "runs" / run_id / "data"
    m = read_manifest(stage)
    assert m is not None, f"{stage}: no finished data stage"
    assert sorted(p.name for p in stage.iterdir()) == sorted([*m.outputs, "manifest.json"])
    return {rel: digest for rel, digest in m.outputs.items() if rel not in TIMED}


def bundle_files(root, bundle):
    """What must not change between two releases of one run: every file's sha256 but release.json's (it holds
    the time it was made) and the signature's; the bundle must verify."""
    release.verify_bundle(bundle, root / "keys" / "public.pem")
    files = json.loads((bundle / "files.json").read_text())
    files.pop("release.json")
    return files


def spread(clean_s, n):
    """`n` kill times spread over 35%..98% of a clean run (before that the interpreter is still starting)."""
    return [round(clean_s * (0.35 + 0.63 * i / max(n - 1, 1)), 2) for i in range(n)]


def kill_data(root, faults, n_delays):
    """`tunegate data --force` (its own run id) killed at each fault point and after each delay, each time followed
    by a plain `tunegate data`, which must skip or redo the stage to the clean run's files, leaving nothing."""
    args = ("data", "tunegate.yaml", "--run-id", "killdata")
    rc, clean_s = tunegate(root, *args, "--force")
    assert rc == 0
    clean = data_files(root, "killdata")
    tried = []
    for fault, delay in [(f, None) for f in faults] + [(None, t) for t in spread(clean_s, n_delays)]:
        rc, _ = tunegate(root, *args, "--force", fault=fault, kill_after_s=delay)
        assert rc == -9 or delay is not None, fault
        tried.append(fault or delay)
        assert tunegate(root, *args)[0] == 0
        assert data_files(root, "killdata") == clean, fault or delay
        assert leftovers(root) == [], fault or delay
    return tried, clean_s


def kill_release(root, args, bundle, faults, n_delays):
    """`tunegate release ARGS --force` killed at each fault point and after each delay: right after the kill the
    bundle is whole (the old one or the new one), and the next release leaves the clean run's files and nothing else."""
    rc, clean_s = tunegate(root, *args, "--force")
    assert rc == 0
    clean = bundle_files(root, bundle)
    tried = []
    for fault, delay in [(f, None) for f in faults] + [(None, t) for t in spread(clean_s, n_delays)]:
        rc, _ = tunegate(root, *args, "--force", fault=fault, kill_after_s=delay)
        assert rc == -9 or delay is not None, fault
        tried.append(fault or delay)
        assert bundle_files(root, bundle) == clean, fault or delay
        assert tunegate(root, *args, "--force")[0] == 0
        assert bundle_files(root, bundle) == clean and leftovers(root) == [], fault or delay
    return tried, clean_s


def test_data_killed_at_any_point_reruns_to_the_clean_runs_files(project):
    tried, clean_s = kill_data(project, ["publish:start", "publish:exchanged", "stage:published"], n_delays=2)
    print(f"data: {len(tried)} kill points {tried}; clean run {clean_s:.1f} s")


def test_release_killed_at_any_point_reruns_to_the_clean_runs_bundle(project):
    """Without --out, `tunegate release` runs the release stage: its folder swap publishes the bundle
    (runs/<id>/release/bundle) and the manifest is written after it."""
    args = ("release", "tunegate.yaml", "--key", project / "keys" / "private.pem")
    tried, clean_s = kill_release(project, args, project / "runs" / "default" / "release" / "bundle",
                                  ["publish:start", "publish:exchanged", "stage:published"], n_delays=2)
    # A first release into --out (no bundle there yet) killed right after its rename: the bundle is in place, whole.
    clean = bundle_files(project, project / "runs" / "default" / "release" / "bundle")
    assert tunegate(project, *args, "--out", "first", fault="publish:renamed")[0] == -9
    assert bundle_files(project, project / "first") == clean and leftovers(project) == []
    tried.append("publish:renamed (first release)")
    print(f"release: {len(tried)} kill points {tried}; clean run {clean_s:.1f} s")


def _promotable(root):
    """The run's signed bundle at runs/default/release/bundle/, signed with the project-local key that promote
    verifies with; made here unless the pipeline's release stage made it already, and made again when the release
    test above re-signed it with keys/ (`tunegate release --key`): promote would refuse that signature."""
    keys = root / ".tunegate" / "keys"
    if not (keys / "private.pem").is_file():
        release.generate_keys(keys)
    bundle = release.bundle_dir(root / "runs" / "default")
    try:
        release.verify_bundle(bundle, keys / "public.pem")
    except Exception:
        release.build_bundle(load_project(root / "tunegate.yaml"), "default", private_key=keys / "private.pem",
                             out_dir=bundle, merge=False, force=True)


def test_promote_killed_at_any_point_reruns_to_one_whole_registered_copy(project):
    digest = read_manifest(project / "runs" / "default" / "train").outputs["adapter/adapter_model.safetensors"]
    _promotable(project)
    tried = []
    # @2: the second copy of a promotion, the bundle's (the adapter's is the first)
    for fault in ("staging:created", "publish:start", "staging:created@2", "publish:start@2", "registry:published"):
        assert tunegate(project, "promote", "tunegate.yaml", fault=fault)[0] == -9, fault
        tried.append(fault)
        assert _versions(project) == []  # never a row without its copy
        assert tunegate(project, "promote", "tunegate.yaml")[0] == 0
        (v,) = _versions(project)
        assert v["status"] == "production" and sha256_file(Path(v["adapter_dir"]) / "adapter_model.safetensors") == digest
        assert leftovers(project) == [], fault
        assert sorted(p.name for p in (project / "adapters").iterdir()) == [Path(v["adapter_dir"]).name]
        assert sorted(p.name for p in (project / "bundles").iterdir()) == [Path(v["bundle_dir"]).name]
        (project / "tunegate.db").unlink()  # the next kill point starts from an empty registry again
        shutil.rmtree(project / "adapters")
        shutil.rmtree(project / "bundles")
    print(f"promote: {len(tried)} kill points {tried}")


@sweep
def test_sweep_data_killed_after_many_delays(project):
    tried, clean_s = kill_data(project, [], n_delays=10)
    print(f"data sweep: {len(tried)} kill points {tried}; clean run {clean_s:.1f} s")


@sweep
def test_sweep_dora_release_with_its_merge_killed_at_every_step_of_both_publishes(project):
    """A DoRA adapter is merged (`export`) into merged/ inside the release stage's partial folder: publish @1 is the
    merge's (its first time: a plain rename), @2 the release stage folder's."""
    run_pipeline(load_project(project / "tunegate.yaml", ["train.adapter=dora"]), run_id="dora")
    args = ("release", "tunegate.yaml", "train.adapter=dora", "--run-id", "dora", "--key", project / "keys" / "private.pem")
    faults = ["staging:created@1", "publish:start@1", "publish:renamed@1", "publish:start@2", "publish:exchanged@1",
              "stage:published"]
    tried, clean_s = kill_release(project, args, project / "runs" / "dora" / "release" / "bundle", faults, n_delays=8)
    print(f"DoRA release sweep: {len(tried)} kill points {tried}; clean run {clean_s:.1f} s")
