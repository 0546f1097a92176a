"""Merging a trained adapter (case C13 in docs/cases.md): published only when the merged model reproduces the adapter."""

import json
import re
import subprocess
import sys

import pytest

from tunegate import TunegateError
from tunegate.config import load_project
from tunegate.export import DEFAULT_ATOL, MERGE_CHECK, export_run, merge_adapter
from tunegate.pipeline import run_pipeline


def _trained(tiny_project, *overrides):
    project = load_project(tiny_project / "tunegate.yaml", list(overrides))
    run_pipeline(project, until="train")
    return project


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_export_reproduces_the_adapter(tiny_project, use_dora):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunegate.evals.generate import generate
    from tunegate.models import load_tokenizer

    project = _trained(tiny_project, f"train.lora.use_dora={str(use_dora).lower()}")
    r = subprocess.run(
        [sys.executable, "-m", "tunegate.cli", "export", str(tiny_project / "tunegate.yaml"),
         f"train.lora.use_dora={str(use_dora).lower()}", "--prompts", "6"],
        capture_output=True, text=True, check=False,
    )
    assert r.returncode == 0, r.stderr
    out = tiny_project / "runs" / "default" / "export" / "merged"
    assert "wrote" in r.stdout and str(out) in r.stdout
    check = json.loads((out / MERGE_CHECK).read_text())
    print(f"{'DoRA' if use_dora else 'LoRA'} max |logit diff| {check['max_abs_logit_diff']:.3e}")
    assert check["passed"] and check["max_abs_logit_diff"] <= check["tolerance"]["max_abs_logit_diff"] == DEFAULT_ATOL
    assert check["greedy_identical"] == check["n"] == 6
    assert check["adapter_type"] == ("DoRA" if use_dora else "LoRA")
    assert set(check["adapter_sha256"]) >= {"adapter_config.json", "adapter_model.safetensors"}
    assert check["peft_version"] and check["torch_version"] and check["base_model"] == project.base_model
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert load_tokenizer(out).chat_template  # the chat template travels with the merged model
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no partial folders left

    # --out on a folder that is not an earlier merge: refused before any work, its files untouched
    (tiny_project / "mine").mkdir()
    (tiny_project / "mine" / "notes.txt").write_text("precious")
    r = subprocess.run([sys.executable, "-m", "tunegate.cli", "export", str(tiny_project / "tunegate.yaml"),
                        f"train.lora.use_dora={str(use_dora).lower()}", "--out", str(tiny_project / "mine")],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "is not an earlier merged model (no merge_check.json in it)" in r.stderr, r.stderr
    assert (tiny_project / "mine" / "notes.txt").read_text() == "precious"

    # the merged folder, loaded as a plain transformers model, gives the adapter's greedy outputs
    tok = load_tokenizer(out)
    prompts = [p["prompt"] for p in check["prompts"]]
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(project.base_model, dtype=torch.float32),
        str(tiny_project / "runs" / "default" / "train" / "adapter"),
    )
    assert generate(plain, tok, prompts, 8, 8) == generate(peft_model, tok, prompts, 8, 8)


def test_a_merge_that_changes_outputs_is_refused_and_not_written(tiny_project, monkeypatch):
    import torch
    from peft.tuners.lora import (
        LoraModel,  # PeftModel forwards merge_and_unload to its tuner
    )

    project = _trained(tiny_project)
    original = LoraModel.merge_and_unload

    def broken_merge(self, *args, **kwargs):
        model = original(self, *args, **kwargs)
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight.mul_(1.5)  # what a wrong scale would do
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", broken_merge)
    out = tiny_project / "merged"
    with pytest.raises(TunegateError, match=r"merge refused: max \|logit difference\| .* \(tolerance 0.001\).*first differing prompt #\d"):
        export_run(project, out_dir=out, n_prompts=3)
    assert not out.exists()
    assert not [p.name for p in tiny_project.iterdir() if p.name.startswith(".merged")]


def test_a_zero_tolerance_names_the_measured_difference(tiny_project, tiny_model_dir):
    """atol=0 refuses any rounding at all: the error states the measured difference against the tolerance."""
    _trained(tiny_project)
    out = tiny_project / "strict"
    try:
        merge_adapter(tiny_model_dir, tiny_project / "runs" / "default" / "train" / "adapter", out, ["hello"], atol=0.0,
                      max_new_tokens=2)
    except TunegateError as exc:
        assert "(tolerance 0)" in str(exc) and not out.exists()
    else:  # an exactly bit-identical merge is possible; then it must have been published whole
        assert (out / MERGE_CHECK).is_file()


def test_missing_adapter_names_the_path(tiny_project, tiny_model_dir):
    project = load_project(tiny_project / "tunegate.yaml")
    adapter = tiny_project / "runs" / "default" / "train" / "adapter"
    with pytest.raises(TunegateError, match=re.escape(str(adapter / "adapter_config.json"))):
        export_run(project)
    with pytest.raises(TunegateError, match=re.escape(str(tiny_project / "nowhere" / "adapter_config.json"))):
        merge_adapter(tiny_model_dir, tiny_project / "nowhere", tiny_project / "out", ["hi"])
    (tiny_project / "runs" / "default").mkdir(parents=True)  # a run without a train stage (no run at all: the runs are listed)
    r = subprocess.run([sys.executable, "-m", "tunegate.cli", "export", str(tiny_project)], capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "adapter_config.json" in r.stderr and "no trained adapter" in r.stderr
    assert not (tiny_project / "runs" / "default" / "export").exists()
