"""GGUF export and its parity gate through the real llama.cpp (issue 25), on the tiny Llama whose eos is not its
end-of-turn token (conftest.split_eos_model_dir: it answers "The answer." then <|im_end|>, deterministically).

Needs the llama.cpp environment (`make llama`); skipped with a reason when it is absent, and a failure then when
TUNEGATE_REQUIRE_LLAMA is set (CI builds it).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import chat, project_yaml, write_jsonl

from tunegate import TunegateError
from tunegate.config import load_project
from tunegate.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("TUNEGATE_LLAMA_VENV", REPO / ".venv-llama"))
INSTALLED = (VENV / ".tunegate-llama-installed").is_file()
if not INSTALLED and os.environ.get("TUNEGATE_REQUIRE_LLAMA"):  # CI (.ci/run) builds it: absent there is a failure
    raise RuntimeError(f"TUNEGATE_REQUIRE_LLAMA is set but there is no llama.cpp environment at {VENV} (`make llama`)")

pytestmark = [
    pytest.mark.llama,
    pytest.mark.skipif(not INSTALLED, reason=f"no llama.cpp environment at {VENV} (install it with `make llama` or `tunegate serve-setup llama`)"),
]


def test_llama_cpp_was_built_without_intel_amx():
    """ggml's AMX backend segfaulted on q8_0 files on a CI machine with AMX (tunegate.llama_env): the build leaves it
    out. Decided by the library llama.cpp itself reports, so it fails only where AMX was compiled in."""
    from tunegate.core.process import venv_python

    info = subprocess.run([str(venv_python(VENV)), "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
                          capture_output=True, text=True, check=True).stdout
    assert "CPU :" in info, info  # llama.cpp's system info line was read
    assert "AMX" not in info, info


def _project(root: Path, base: Path, release: str = "") -> Path:
    labels = ["alpha", "beta", "gamma"]
    write_jsonl(root / "train.jsonl", [chat(f"message number {i} about topic {labels[i % 3]}", labels[i % 3], f"t{i}") for i in range(40)])
    write_jsonl(root / "golden.jsonl", [chat(f"golden question {i} on {labels[i % 3]}", labels[i % 3], f"g{i}") for i in range(12)])
    (root / "tunegate.yaml").write_text(project_yaml(
        "tiny", base, eval_="  max_new_tokens: 8\n  batch_size: 12\n  bootstrap_samples: 200",
        train="  adapter: lora\n  lora: {r: 4, lora_alpha: 8}\n"
              "  trl: {max_steps: 2, per_device_train_batch_size: 4, save_steps: 2, logging_steps: 1, warmup_steps: 0}",
        extra=release))
    return root


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, split_eos_model_dir):
    """A PASSed run (data, train, eval) of the split-eos model."""
    root = _project(tmp_path_factory.mktemp("gguf"), split_eos_model_dir)
    manifests = run_pipeline(load_project(root / "tunegate.yaml"), until="eval")
    assert manifests["eval"].verdict == "PASS"
    return root


def test_export_writes_f16_and_q8_0_that_answer_as_the_adapter_did(evaluated):
    from tunegate.gguf_export import export_gguf

    project = load_project(evaluated / "tunegate.yaml")
    folder, result = export_gguf(project, venv=VENV)
    assert folder == evaluated / "runs" / "default" / "export" / "gguf"
    assert result["verdict"] == "PASS" and list(result["types"]) == ["f16", "q8_0"]
    f16, q8 = result["types"]["f16"], result["types"]["q8_0"]
    assert (folder / "tiny-f16.gguf").stat().st_size == f16["bytes"] and q8["bytes"] < f16["bytes"]
    for f in (f16, q8):
        rules = {r["rule"]: r for r in f["rules"]}
        assert rules["prompt_identical"]["value"] == 1.0
        # the adapter stopped on all 12 rows (at <|im_end|>, not eos <|endoftext|>), and so did llama.cpp
        assert rules["stops"]["description"].endswith("(12 rows)") and rules["stops"]["value"] == 1.0
        assert rules["metric_tolerance"]["value"] == 0.0
        assert f["table"]["identical_answers"]["mean"] == 1.0 and f["table"]["stopped"] == {"gguf": 1.0, "adapter": 1.0}
        # llama.cpp read the chat template and both stop tokens from the file's metadata
        header = f["llama_cpp"]
        assert "<|im_start|>" in header["chat_template"] and header["eos_token_id"] == 0  # <|endoftext|>
    answers = [json.loads(line) for line in (folder / "parity-q8_0.jsonl").read_text().splitlines()[1:]]
    assert {a["output"] for a in answers} == {"The answer."} and {a["finish_reason"] for a in answers} == {"stop"}
    modelfile = (folder / "Modelfile").read_text()
    assert "FROM ./tiny-q8_0.gguf" in modelfile and "TEMPLATE" in modelfile
    assert 'PARAMETER stop "<|endoftext|>"' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert not list(folder.parent.glob(".*partial"))  # published whole


def test_answers_made_under_other_eval_settings_or_edited_are_refused(evaluated, tmp_path):
    from tunegate.gguf_export import export_gguf

    with pytest.raises(TunegateError, match="the eval stage ran with other eval settings"):
        export_gguf(load_project(evaluated / "tunegate.yaml", ["eval.max_new_tokens=16"]), venv=VENV, out_dir=tmp_path / "a")
    samples = evaluated / "runs" / "default" / "eval" / "samples.jsonl"
    original = samples.read_bytes()
    samples.write_bytes(original.replace(b"The answer.", b"The answer!", 1))
    try:
        with pytest.raises(TunegateError, match="samples.jsonl: missing or changed since the eval stage wrote it"):
            export_gguf(load_project(evaluated / "tunegate.yaml"), venv=VENV, out_dir=tmp_path / "b")
    finally:
        samples.write_bytes(original)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_out_folder_of_other_files_and_an_empty_type_list_are_refused_before_any_work(evaluated, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    for args, message in ((["--out", str(mine)], "is not an earlier GGUF export (no verdict.json in it)"),
                          (["--types", ""], "--types: no GGUF type given"),
                          (["--types", "q3"], "--types q3: Value error, unknown GGUF type q3")):
        r = subprocess.run([sys.executable, "-m", "tunegate.cli", "export", str(evaluated), "--format", "gguf",
                            "--llama-venv", str(VENV), *args], capture_output=True, text=True, check=False)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_a_template_that_did_not_travel_fails_the_gate_and_says_where(evaluated, tmp_path):
    """The merged model's chat template edited (a space where training had a newline): the GGUF carries it, and
    the parity gate finds the first differing prompt token. The verdict is published so it can be read; exit 3."""
    from tunegate.export import export_run

    project = load_project(evaluated / "tunegate.yaml")
    merged, _ = export_run(project)
    template = merged / "chat_template.jinja"
    original = template.read_text()
    template.write_text(original.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant '"))
    try:
        r = subprocess.run([sys.executable, "-m", "tunegate.cli", "export", str(evaluated), "--format", "gguf", "--types", "q8_0",
                            "--out", str(tmp_path / "out"), "--llama-venv", str(VENV)], capture_output=True, text=True, check=False)
    finally:
        template.write_text(original)
    assert r.returncode == 3, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "GGUF parity gate: FAIL" in r.stdout and "FAIL llama.cpp's prompt tokens" in out and "first difference" in out
    assert "# PARITY GATE FAILED for tiny-q8_0.gguf" in (tmp_path / "out" / "Modelfile").read_text()
    verdict = json.loads((tmp_path / "out" / "verdict.json").read_text())
    prompt = verdict["types"]["q8_0"]["rules"][0]
    assert prompt["rule"] == "prompt_identical" and prompt["value"] == 0.0 and prompt["first_difference"]["id"] == "g0"
    assert "assistant " in prompt["first_difference"]["llama_cpp"]


def test_release_carries_the_gated_gguf_signed_and_is_refused_when_its_gate_fails(tmp_path, split_eos_model_dir, monkeypatch):
    from tunegate import gguf_export
    from tunegate.release import bundle_dir, verify_bundle

    root = _project(tmp_path / "p", split_eos_model_dir, release="release:\n  gguf: {types: [q8_0]}\n")
    project = load_project(root / "tunegate.yaml")
    monkeypatch.setenv("TUNEGATE_LLAMA_VENV", str(VENV))
    run_pipeline(project)
    bundle = bundle_dir(root / "runs" / "default")
    release = json.loads((bundle / "release.json").read_text())
    assert release["gguf"]["q8_0"]["file"] == "tiny-q8_0.gguf" and release["gguf"]["q8_0"]["verdict"] == "PASS"
    files = json.loads((bundle / "files.json").read_text())
    assert {"gguf/tiny-q8_0.gguf", "gguf/Modelfile", "gguf/verdict.json"} <= set(files)
    verify_bundle(bundle, root / ".tunegate" / "keys" / "public.pem")
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "### llama.cpp and Ollama (GGUF)" in card and "| `gguf/tiny-q8_0.gguf` |" in card and "1.000 [1.000, 1.000]" in card

    # the same run with a gate that fails (one rule turned FAIL): the release stage stops and publishes nothing
    real = gguf_export.parity

    def failing(*args, **kwargs):
        gate = real(*args, **kwargs)
        gate["rules"][1]["passed"], gate["verdict"] = False, "FAIL"
        return gate

    monkeypatch.setattr(gguf_export, "parity", failing)
    with pytest.raises(gguf_export.GgufGateFailed, match="GGUF parity gate FAIL: tiny-q4_0.gguf: llama.cpp stops") as failed:
        run_pipeline(load_project(root / "tunegate.yaml", ["release.gguf.types=[q4_0]"]))
    assert failed.value.exit_code == 3
    assert json.loads((bundle / "release.json").read_text())["gguf"] == release["gguf"]  # the earlier bundle stays
    readable = root / "runs" / "default" / "export" / "gguf"  # the failed gate's folder, to read why
    assert json.loads((readable / "verdict.json").read_text())["verdict"] == "FAIL" and (readable / "parity-q4_0.jsonl").is_file()
    assert not list((root / "runs" / "default" / "export").glob(".*"))  # published whole (the stage's own partial is the pipeline's)


def test_a_missing_llama_environment_stops_the_run_before_its_first_stage(tmp_path, split_eos_model_dir, monkeypatch):
    root = _project(tmp_path / "p", split_eos_model_dir, release="release:\n  gguf: {types: [q8_0]}\n")
    monkeypatch.setenv("TUNEGATE_LLAMA_VENV", str(tmp_path / "nowhere"))
    with pytest.raises(TunegateError, match="no llama.cpp environment; install it with: tunegate serve-setup llama"):
        run_pipeline(load_project(root / "tunegate.yaml"))
    assert not (root / "runs" / "default" / "data").exists()
