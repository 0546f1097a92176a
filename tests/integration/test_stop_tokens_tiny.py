"""Stop tokens travel (issue 20): on a base whose eos (`<|endoftext|>`) is not its end-of-turn token (`<|im_end|>`),
every artifact tunegate writes lists both as eos ids, so a plain `transformers` load of the released files stops
at the end of the answer without being told (conftest.split_eos_model_dir: a tiny model that answers
"The answer." then `<|im_end|>`, and repeats itself past it)."""

import json
import sys
import types

import pytest
from conftest import SPLIT_EOS_ANSWER, chat, project_yaml, write_jsonl

from tunegate.config import load_project
from tunegate.pipeline import run_pipeline

release = pytest.importorskip("tunegate.release")
pytest.importorskip("model_signing", reason='release signing needs: pip install "model-signing>=1.1,<1.2" pyopenssl')

MAX_NEW = 32


@pytest.fixture(scope="module")
def released(tmp_path_factory, split_eos_model_dir):
    """A PASSed DoRA run on the split-eos base (DoRA: the bundle carries a merged model) and its signed bundle."""
    root = tmp_path_factory.mktemp("split-eos")
    labels = ["alpha", "beta", "gamma"]
    write_jsonl(root / "train.jsonl", [chat(f"message number {i} about topic {labels[i % 3]}", labels[i % 3], f"t{i}") for i in range(24)])
    write_jsonl(root / "golden.jsonl", [chat(f"golden question {i} on {labels[i % 3]}", labels[i % 3], f"g{i}") for i in range(12)])
    (root / "tunegate.yaml").write_text(project_yaml("spliteos", split_eos_model_dir, train=(
        "  adapter: dora\n  lora: {r: 4, lora_alpha: 8}\n"
        "  trl: {max_steps: 2, per_device_train_batch_size: 4, save_steps: 2, logging_steps: 1, warmup_steps: 0}")))
    project = load_project(root / "tunegate.yaml")
    assert run_pipeline(project, until="eval")["eval"].verdict == "PASS"
    keys = release.generate_keys(root / "keys")
    fake = types.ModuleType("tunegate.report.release_docs")  # the release documents have their own tests
    fake.render_release_docs = lambda run_dir, project, **kw: {name: f"# {name}\n" for name in release.DOC_NAMES}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "tunegate.report.release_docs", fake)
        bundle = release.build_bundle(project, private_key=keys[0], out_dir=root / "bundle")
    return root, bundle, keys


def _answers(model_dir, tokenizer, n_prompts):
    """Greedy answers of the model in `model_dir` (plain transformers, no eos argument) to n golden-like prompts:
    a list of generated token id lists."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for i in range(n_prompts):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": f"golden question {i} on alpha"}],
                                            add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False)
        out.append(ids[0, enc["input_ids"].shape[1]:].tolist())
    return out


def test_released_files_stop_at_the_end_of_turn_with_plain_transformers(released, split_eos_model_dir):
    from transformers import AutoTokenizer

    root, bundle, keys = released
    info = release.verify_bundle(bundle, keys[1])  # the stop ids are part of what is signed
    tok = AutoTokenizer.from_pretrained(bundle / "merged")
    eos, eot = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    assert (tok.eos_token, eos, eot) == ("<|endoftext|>", 0, 2)
    stops = [eos, eot]
    assert info["stop_token_ids"] == stops and info["vllm"]["merged"] == "merged/"
    for folder in (root / "runs" / "default" / "train" / "adapter", bundle / "adapter", bundle / "merged"):
        gen = json.loads((folder / "generation_config.json").read_text())
        assert gen["eos_token_id"] == stops and gen["pad_token_id"] == eos, folder

    answer = tok(SPLIT_EOS_ANSWER, add_special_tokens=False)["input_ids"]
    n = 8
    after = _answers(bundle / "merged", tok, n)
    stopped = sum(a == answer + [eot] for a in after)
    before = _answers(split_eos_model_dir, tok, n)  # the base's own generation_config.json: eos <|endoftext|> only
    ran_on = sum(len(a) == MAX_NEW for a in before)
    print(f"answers that stopped at the end of turn: released merged model {stopped}/{n}; "
          f"base model's generation_config {n - ran_on}/{n} (ran to max_new_tokens {MAX_NEW}: {ran_on})")
    assert stopped == n
    assert ran_on == n  # the model does answer past its turn: only the released generation_config stops it
    assert tok.decode(after[0], skip_special_tokens=True) == SPLIT_EOS_ANSWER


def test_the_adapter_folders_generation_config_stops_the_adapter(released, split_eos_model_dir):
    """The bundle's adapter/ on the base with plain transformers + PEFT: its generation_config.json stops it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    _, bundle, _ = released
    tok = AutoTokenizer.from_pretrained(bundle / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(split_eos_model_dir, dtype=torch.float32),
                                      str(bundle / "adapter")).eval()
    config = GenerationConfig.from_pretrained(bundle / "adapter", max_new_tokens=MAX_NEW, do_sample=False)
    enc = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.inference_mode():
        ids = model.generate(**enc, generation_config=config)
    new = ids[0, enc["input_ids"].shape[1]:].tolist()
    assert new[-1] == tok.convert_tokens_to_ids("<|im_end|>") and len(new) < MAX_NEW
