"""GGUF export pieces that need no llama.cpp (issue 25): the config block, the Ollama Modelfile written from the real
SmolLM2 tokenizer, the parity rules on hand-made llama.cpp answers, the bundle check of gguf/, and the converter's
extraction from an sdist. The conversion and llama.cpp itself: tests/integration/test_gguf_tiny.py (marker llama)."""

import io
import json
import tarfile

import pytest
from conftest import chat

from tunegate import TunegateError
from tunegate.config import GgufConfig, load_project


def test_gguf_config_types_are_known_lowercased_and_listed_once():
    assert GgufConfig().types == ["f16", "q8_0"] and GgufConfig().tolerance == 0.02
    assert GgufConfig(types=["Q4_K_M"]).types == ["q4_k_m"]
    with pytest.raises(ValueError, match="unknown GGUF type q3"):
        GgufConfig(types=["q3"])
    with pytest.raises(ValueError, match="listed twice"):
        GgufConfig(types=["f16", "F16"])
    with pytest.raises(ValueError):
        GgufConfig(tolerance=0)


def test_ollama_modelfile_carries_chatml_the_project_system_prompt_and_both_stop_tokens(tokenizer):
    from tunegate.gguf_export import ollama_modelfile

    golden = [chat(f"q{i}", "a", system="Answer with one word.") for i in range(3)]
    text, notes = ollama_modelfile(tokenizer, golden, "p-q8_0.gguf", ["p-f16.gguf"], "header")
    assert notes == []
    lines = text.splitlines()
    assert "FROM ./p-q8_0.gguf" in lines and "# also here: ./p-f16.gguf" in lines
    assert 'TEMPLATE """{{- range $i, $_ := .Messages }}' in text
    assert 'SYSTEM """Answer with one word."""' in lines
    # SmolLM2: eos <|im_end|> (id 2) is also its end of turn: one stop
    assert [ln for ln in lines if ln.startswith("PARAMETER stop")] == ['PARAMETER stop "<|im_end|>"']
    assert "PARAMETER temperature 0" in lines

    # no system message in the rows: SmolLM2's template inserts its own, and that is what SYSTEM says
    text, _ = ollama_modelfile(tokenizer, [chat("q", "a")], "p.gguf", [], "h")
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text

    # three quotes cannot be quoted in a Modelfile: no SYSTEM, and a note that says why
    text, notes = ollama_modelfile(tokenizer, [chat("q", "a", system='Say """hi"""')], "p.gguf", [], "h")
    assert "SYSTEM" not in text.replace("# no SYSTEM", "") and 'contains """' in notes[0]


def test_a_template_that_is_not_chatml_gets_no_ollama_template(tokenizer):
    import copy

    from tunegate.gguf_export import ollama_modelfile

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    text, notes = ollama_modelfile(tok, [chat("q", "a")], "p.gguf", [], "h")
    assert "TEMPLATE" not in text.replace("# no TEMPLATE", "") and "not ChatML" in notes[0]


def _answers(tokenizer, golden, outputs, stopped, prompt_ids=None):
    from tunegate.data.format import generation_prompt

    return [{"id": g["id"], "output": o, "finish_reason": "stop" if s else "length", "completion_tokens": 3,
             "seconds": 0.1,
             "prompt_token_ids": prompt_ids[i] if prompt_ids else tokenizer(generation_prompt(tokenizer, g), add_special_tokens=False)["input_ids"]}
            for i, (g, o, s) in enumerate(zip(golden, outputs, stopped))]


def test_parity_rules_pass_on_the_adapters_answers_and_fail_each_on_its_own_fault(tmp_path, tiny_project, tokenizer):
    from tunegate.gguf_export import parity

    project = load_project(tiny_project / "tunegate.yaml", ["eval.max_new_tokens=8", "eval.bootstrap_samples=200"])
    golden = [chat(f"q{i}", ["alpha", "beta"][i % 2], f"g{i}") for i in range(10)]
    samples = [{"id": g["id"], "reference": g["messages"][-1]["content"], "candidate_output": g["messages"][-1]["content"]}
               for g in golden]
    same = parity(project.eval, tokenizer, golden, samples, _answers(tokenizer, golden, [s["candidate_output"] for s in samples], [True] * 10), 0.02)
    assert same["verdict"] == "PASS"
    assert [r["rule"] for r in same["rules"]] == ["prompt_identical", "stops", "metric_tolerance"]
    assert same["table"]["identical_answers"]["mean"] == 1.0 and same["table"]["stopped"] == {"gguf": 1.0, "adapter": 1.0}

    # one answer runs on to the length limit where the adapter stopped
    rambling = [s["candidate_output"] for s in samples[:9]] + [samples[9]["candidate_output"] + " and so on and on"]
    ran_on = parity(project.eval, tokenizer, golden, samples, _answers(tokenizer, golden, rambling, [True] * 9 + [False]), 1.0)
    stops = ran_on["rules"][1]
    assert ran_on["verdict"] == "FAIL" and not stops["passed"] and stops["value"] == 0.9 and stops["first_difference"]["id"] == "g9"

    # a row where the adapter itself ran to max_new_tokens (the eval stage recorded it) owes no stop
    recorded = [{**s, "candidate_stopped": i != 9} for i, s in enumerate(samples)]
    owed = parity(project.eval, tokenizer, golden, recorded, _answers(tokenizer, golden, ["x"] * 9 + ["y"], [True] * 9 + [False]), 1.0)
    assert owed["rules"][1]["passed"] and owed["rules"][1]["description"].endswith("(9 rows)")
    assert owed["table"]["adapter_stopped_from"] == "eval/samples.jsonl candidate_stopped"
    assert ran_on["table"]["adapter_stopped_from"] == "answer re-encoded < max_new_tokens"
    # the adapter's own text, run to the limit in llama.cpp, is the adapter's answer: not a stop failure
    same_text = parity(project.eval, tokenizer, golden, samples, _answers(tokenizer, golden, [s["candidate_output"] for s in samples], [False] * 10), 0.02)
    assert same_text["rules"][1]["passed"]

    # one wrong answer in ten moves exact_match by 0.1 > 0.02
    outputs = [s["candidate_output"] for s in samples]
    outputs[3] = "gamma"
    worse = parity(project.eval, tokenizer, golden, samples, _answers(tokenizer, golden, outputs, [True] * 10), 0.02)
    metric = worse["rules"][2]
    assert metric["metric"] == "exact_match" and metric["value"] == pytest.approx(-0.1) and not metric["passed"]
    assert worse["table"]["identical_answers"]["mean"] == pytest.approx(0.9)
    assert parity(project.eval, tokenizer, golden, samples, _answers(tokenizer, golden, outputs, [True] * 10), 0.15)["verdict"] == "PASS"

    # a prompt with a different newline after the role: found, and where
    from tunegate.data.format import generation_prompt

    ids = [tokenizer(generation_prompt(tokenizer, g), add_special_tokens=False)["input_ids"] for g in golden]
    ids[5] = tokenizer(generation_prompt(tokenizer, golden[5]).replace("assistant\n", "assistant "), add_special_tokens=False)["input_ids"]
    off = parity(project.eval, tokenizer, golden, samples, _answers(tokenizer, golden, outputs, [True] * 10, ids), 0.15)
    prompt = off["rules"][0]
    assert not prompt["passed"] and prompt["value"] == 0.9 and prompt["first_difference"]["id"] == "g5"
    assert "assistant " in prompt["first_difference"]["llama_cpp"] and "assistant\n" in prompt["first_difference"]["training"]


def _bundle(tmp_path, verdict="PASS", sha=None):
    from tunegate.core.manifest import sha256_file

    g = tmp_path / "gguf"
    g.mkdir()
    (g / "p-q8_0.gguf").write_bytes(b"GGUF fake")
    digest = sha256_file(g / "p-q8_0.gguf")
    entry = {"file": "p-q8_0.gguf", "bytes": 9, "sha256": sha or digest, "verdict": verdict}
    (g / "verdict.json").write_text(json.dumps({"verdict": verdict, "types": {"q8_0": entry}}))
    return {"gguf": {"q8_0": {**entry, "sha256": digest}}}


def test_bundle_check_of_gguf_needs_pass_and_the_measured_sha256(tmp_path):
    from tunegate.release import _check_gguf

    assert _check_gguf(tmp_path, {"gguf": None}) == []  # no gguf/ and none listed
    ok = tmp_path / "ok"
    ok.mkdir()
    assert _check_gguf(ok, _bundle(ok)) == []
    failed = tmp_path / "failed"
    failed.mkdir()
    assert _check_gguf(failed, _bundle(failed, verdict="FAIL")) == ["gguf/verdict.json: parity verdict FAIL, not PASS"]
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    release = _bundle(swapped)
    (swapped / "gguf" / "p-q8_0.gguf").write_bytes(b"GGUF other")
    assert _check_gguf(swapped, release) == ["gguf/p-q8_0.gguf: sha256 differs from the one its parity gate measured"]
    other_type = tmp_path / "other_type"
    other_type.mkdir()
    release = _bundle(other_type)
    assert _check_gguf(other_type, {"gguf": {"f16": release["gguf"]["q8_0"]}}) == [
        "gguf/verdict.json: types ['q8_0'], release.json lists ['f16']",
        "gguf/p-q8_0.gguf: sha256 differs from the one its parity gate measured"]  # release.json has no q8_0 to agree with
    outside = tmp_path / "outside"
    outside.mkdir()
    release = _bundle(outside)
    verdict = json.loads((outside / "gguf" / "verdict.json").read_text())
    verdict["types"]["q8_0"]["file"] = "../gguf/p-q8_0.gguf"  # the same bytes, named from outside gguf/
    (outside / "gguf" / "verdict.json").write_text(json.dumps(verdict))
    assert _check_gguf(outside, release) == ["gguf/../gguf/p-q8_0.gguf: missing"]
    listed_only = tmp_path / "listed"
    listed_only.mkdir()
    assert _check_gguf(listed_only, {"gguf": {"q8_0": {}}}) == ["gguf/verdict.json: missing or unreadable"]


def test_converter_extraction_takes_only_the_vendored_converter_and_refuses_an_sdist_without_one(tmp_path):
    from tunegate.llama_env import _extract_converter

    def sdist(path, names):
        with tarfile.open(path, "w:gz") as tar:
            for name in names:
                data = f"# {name}\n".encode()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path

    v = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
    good = sdist(tmp_path / "good.tar.gz", [v + "convert_hf_to_gguf.py", v + "conversion/base.py", v + "gguf-py/gguf/vocab.py",
                                            v + "src/llama.cpp", "llama_cpp_python-0.3.36/setup.py"])
    _extract_converter(good, tmp_path / "out")
    got = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert got == ["conversion/base.py", "convert_hf_to_gguf.py", "gguf-py/gguf/vocab.py"]
    with pytest.raises(TunegateError, match="no vendor/llama.cpp/convert_hf_to_gguf.py"):
        _extract_converter(sdist(tmp_path / "bad.tar.gz", [v + "conversion/base.py"]), tmp_path / "out2")


def test_no_llama_environment_names_the_install_command(tmp_path, monkeypatch):
    from tunegate.llama_env import find_venv

    monkeypatch.delenv("TUNEGATE_LLAMA_VENV", raising=False)
    with pytest.raises(TunegateError, match="tunegate serve-setup llama --venv .*nowhere"):
        find_venv(tmp_path / "nowhere")


def test_llama_cpp_is_built_without_intel_amx_on_x86_and_an_older_build_is_rebuilt(tmp_path, monkeypatch):
    """ggml's AMX backend segfaulted on a q8_0 file in CI (tunegate.llama_env): x86-64 builds get -mno-amx-*, with
    pip's wheel cache off; a stamp written by a build without those flags is no finished install."""
    import hashlib
    import subprocess

    from tunegate import llama_env

    env, build = llama_env.build_env("x86_64", probe=lambda flags: True)
    assert env["CFLAGS"].split()[-3:] == ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]
    assert env["CXXFLAGS"].endswith(llama_env.NO_AMX_FLAGS)
    monkeypatch.setenv("CFLAGS", "-O2")
    assert llama_env.build_env("x86_64", probe=lambda flags: True)[0]["CFLAGS"] == "-O2 " + llama_env.NO_AMX_FLAGS  # kept
    arm_env, arm_build = llama_env.build_env("aarch64", probe=lambda flags: True)
    assert arm_env["CFLAGS"] == "-O2" and arm_build == "native"  # -mno-amx-* is an x86 flag
    assert llama_env.build_env("x86_64", probe=lambda flags: False)[1] == "native"  # a compiler without AMX flags

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / "sdist").mkdir()
    sdist = venv / "sdist" / llama_env.SDIST
    with tarfile.open(sdist, "w:gz") as tar:
        data = b"# converter\n"
        info = tarfile.TarInfo(llama_env._VENDOR + "convert_hf_to_gguf.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(llama_env, "SDIST_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest())
    monkeypatch.setattr(llama_env, "build_env", lambda machine=None, probe=None: (dict(env), build))  # as on x86-64
    (venv / llama_env.STAMP).write_text(f"{llama_env.LLAMA_CPP_PYTHON} sdist sha256 {llama_env.SDIST_SHA256}\n")  # an older stamp
    calls = []

    def run(cmd, env=None, **kw):
        calls.append((cmd, env))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(llama_env.subprocess, "run", run)
    llama_env.setup_venv(venv)
    (cmd, build_vars), = calls
    assert cmd[-4:] == ["install", "--no-cache-dir", "--force-reinstall", str(sdist)]
    assert llama_env.NO_AMX_FLAGS in build_vars["CFLAGS"] and llama_env.NO_AMX_FLAGS in build_vars["CXXFLAGS"]
    assert (venv / llama_env.STAMP).read_text() == llama_env.stamp_text(build)
    llama_env.setup_venv(venv)
    assert len(calls) == 1  # stamped with this build: nothing runs again
    assert llama_env.find_venv(venv) == venv
    (venv / llama_env.STAMP).write_text(f"{llama_env.LLAMA_CPP_PYTHON} sdist sha256 {llama_env.SDIST_SHA256}\n")
    with pytest.raises(TunegateError, match="built by an older tunegate .*tunegate serve-setup llama"):
        llama_env.find_venv(venv)  # an export never runs on the old build


def test_this_machines_compiler_takes_the_no_amx_flags_if_it_is_x86():
    import platform

    from tunegate.llama_env import NO_AMX_FLAGS, _compiler_takes

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the AMX flags are x86 flags")
    assert _compiler_takes(NO_AMX_FLAGS)  # GCC 12 here: the build gets them
    assert not _compiler_takes("-mno-such-flag-anywhere")
