"""Special tokens added through the project file (issue 20): `train.added_tokens: ["<ticket>"]` on the tiny Llama.

The data stage keeps rows that use the token and tokenizes it as one new id; training grows the embedding and trains
the new row with the adapter (PEFT trainable tokens); the adapter folder records the vocabulary; eval, export/release
and the embedded server grow the base model before loading the adapter; a token the base already has is refused."""

import json
import shutil
import sys
import types

import pytest
from conftest import chat, project_yaml, write_jsonl

from tunegate import TunegateError
from tunegate.config import load_project
from tunegate.models import VOCAB_RECORD
from tunegate.pipeline import run_pipeline, validate_project

TOKEN = "<ticket>"
LABELS = ["alpha", "beta", "gamma"]


def _write_project(root, tiny_model_dir, added='["<ticket>"]', n_train=24):
    write_jsonl(root / "train.jsonl", [chat(f"open {TOKEN} number {i} about {LABELS[i % 3]}", f"{TOKEN} {LABELS[i % 3]}", f"t{i}")
                                       for i in range(n_train)])
    write_jsonl(root / "golden.jsonl", [chat(f"golden {TOKEN} {i} on {LABELS[i % 3]}", f"{TOKEN} {LABELS[i % 3]}", f"g{i}")
                                        for i in range(6)])
    (root / "tunegate.yaml").write_text(project_yaml(
        "tok", tiny_model_dir,
        train=f"  adapter: lora\n  added_tokens: {added}\n  lora: {{r: 4, lora_alpha: 8}}\n"
              "  trl: {max_steps: 3, per_device_train_batch_size: 4, save_steps: 3, logging_steps: 1, warmup_steps: 0}"))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A PASSed run (data, train, eval) of a LoRA SFT project whose rows use `<ticket>`, an added token."""
    root = _write_project(tmp_path_factory.mktemp("added-tokens"), tiny_model_dir)
    project = load_project(root / "tunegate.yaml")
    manifests = run_pipeline(project, until="eval")
    assert manifests["eval"].verdict == "PASS"
    return project, root / "runs" / "default"


def _base_rows(tiny_model_dir):
    return json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]


def test_data_stage_keeps_rows_using_the_added_token_as_one_new_id(trained, tiny_model_dir, tokenizer):
    from tunegate.models import load_project_tokenizer

    project, run = trained
    stats = json.loads((run / "data" / "stats.json").read_text())
    kept = [json.loads(line) for line in (run / "data" / "train.jsonl").read_text().splitlines()]
    kept += [json.loads(line) for line in (run / "data" / "val.jsonl").read_text().splitlines()]
    assert len(kept) == 24 and stats.get("rejected_by_rule", {}).get("control_token") is None
    assert all(TOKEN in r["messages"][0]["content"] for r in kept)

    tok = load_project_tokenizer(project)
    new_id = len(tokenizer)  # the base tokenizer's size: the first free id
    assert tok(f"a {TOKEN} b", add_special_tokens=False)["input_ids"].count(new_id) == 1
    assert tok.convert_tokens_to_ids(TOKEN) == new_id and len(tok) == new_id + 1
    assert tok.decode([new_id], skip_special_tokens=True) == TOKEN  # a plain token: kept in decoded answers
    assert len(tokenizer(TOKEN, add_special_tokens=False)["input_ids"]) > 1  # the base tokenizer splits it


def test_the_adapter_records_the_vocabulary_and_holds_the_trained_row(trained, tiny_model_dir):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tunegate.models import fit_embeddings, load_tokenizer

    project, run = trained
    adapter = run / "train" / "adapter"
    base_rows = _base_rows(tiny_model_dir)
    record = json.loads((adapter / VOCAB_RECORD).read_text())
    assert record == {"vocab_size": base_rows + 1, "base_vocab_size": base_rows, "tokenizer_size": base_rows + 1,
                      "added_tokens": {TOKEN: base_rows}}
    summary = json.loads((run / "train" / "train_summary.json").read_text())
    assert summary["vocab_size"] == base_rows + 1 and summary["added_tokens"] == {TOKEN: base_rows}
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == [base_rows]  # tied embeddings: the input rows, which lm_head follows
    assert load_tokenizer(adapter).convert_tokens_to_ids(TOKEN) == base_rows  # the tokenizer saved with it

    weights = load_file(adapter / "adapter_model.safetensors")
    rows = {k: v for k, v in weights.items() if "trainable_tokens_delta" in k}
    assert [tuple(v.shape) for v in rows.values()] == [(1, 64)]  # the new row only, not the whole embedding
    assert not any("embed_tokens.weight" in k or "lm_head.weight" in k for k in weights)
    # trained: it moved from where the grown base model starts it (a seeded draw, the same on every load)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    fit_embeddings(fresh, load_tokenizer(tiny_model_dir, [TOKEN]), [TOKEN])
    start = fresh.get_input_embeddings().weight[base_rows:].detach()
    again = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    fit_embeddings(again, load_tokenizer(tiny_model_dir, [TOKEN]), [TOKEN])
    assert torch.equal(start, again.get_input_embeddings().weight[base_rows:])
    assert not torch.allclose(next(iter(rows.values())), start)


def test_eval_loaded_the_adapter_with_its_tokenizer_and_generated(trained):
    project, run = trained
    samples = [json.loads(line) for line in (run / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6
    assert all(isinstance(s["candidate_output"], str) for s in samples), samples[0]


def test_loading_the_adapter_on_a_fresh_base_grows_it_first(trained, tiny_model_dir):
    import torch
    from peft import PeftModel

    from tunegate.models import embedding_rows, fit_to_adapter, load_adapter_tokenizer, load_model

    _, run = trained
    adapter = run / "train" / "adapter"
    base_rows = _base_rows(tiny_model_dir)
    with pytest.raises(Exception):  # what loading did before: the adapter's row index is past the embedding
        PeftModel.from_pretrained(load_model(tiny_model_dir), str(adapter))

    tok = load_adapter_tokenizer(adapter, tiny_model_dir)
    model = fit_to_adapter(load_model(tiny_model_dir), adapter)
    assert embedding_rows(model) == base_rows + 1
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    enc = tok.apply_chat_template([{"role": "user", "content": f"open {TOKEN} now"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    assert base_rows in enc["input_ids"][0].tolist()
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]


def test_an_adapter_of_another_vocabulary_is_refused_in_one_line(trained, tiny_model_dir, tmp_path):
    from tunegate.models import fit_to_adapter, load_model

    _, run = trained
    other = tmp_path / "other"
    shutil.copytree(run / "train" / "adapter", other)
    record = json.loads((other / VOCAB_RECORD).read_text())
    (other / VOCAB_RECORD).write_text(json.dumps({**record, "base_vocab_size": record["base_vocab_size"] + 64,
                                                  "vocab_size": record["vocab_size"] + 64}))
    with pytest.raises(TunegateError) as exc:
        fit_to_adapter(load_model(tiny_model_dir), other)
    assert "\n" not in str(exc.value) and "trained on a base model whose embedding has" in str(exc.value)

    # two adapters with different added tokens cannot share one base model (the embedded server's case)
    (other / VOCAB_RECORD).write_text(json.dumps({**record, "added_tokens": {"<other>": record["base_vocab_size"]}}))
    model = fit_to_adapter(load_model(tiny_model_dir), run / "train" / "adapter")
    with pytest.raises(TunegateError, match="differ from those this model already carries") as exc:
        fit_to_adapter(model, other)
    assert "\n" not in str(exc.value)


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory):
    release = pytest.importorskip("tunegate.release")
    pytest.importorskip("model_signing", reason='release signing needs: pip install "model-signing>=1.1,<1.2" pyopenssl')
    project, run = trained
    keys = release.generate_keys(tmp_path_factory.mktemp("keys") / "k")
    fake = types.ModuleType("tunegate.report.release_docs")  # the release documents have their own tests
    fake.render_release_docs = lambda run_dir, project, **kw: {name: f"# {name}\n" for name in release.DOC_NAMES}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "tunegate.report.release_docs", fake)
        out = release.build_bundle(project, private_key=keys[0], out_dir=run.parent.parent / "bundle")
    return out, keys


def test_the_release_records_the_vocabulary_and_merges_the_grown_embedding(bundle, trained, tiny_model_dir):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunegate import release

    out, keys = bundle
    base_rows = _base_rows(tiny_model_dir)
    info = release.verify_bundle(out, keys[1])
    assert info["vocab_size"] == base_rows + 1 and info["added_tokens"] == {TOKEN: base_rows}
    assert info["vllm"]["servable_as_lora"] is False and info["vllm"]["merged"] == "merged/"
    assert any("added tokens" in r for r in info["vllm"]["reasons"])

    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    assert merged.config.vocab_size == base_rows + 1 and merged.get_input_embeddings().weight.shape[0] == base_rows + 1
    delta = next(v for k, v in load_file(out / "adapter" / "adapter_model.safetensors").items() if "trainable_tokens_delta" in k)
    assert torch.allclose(merged.get_input_embeddings().weight[base_rows:], delta)
    assert torch.allclose(merged.get_output_embeddings().weight[base_rows:], delta)  # tied
    tok = AutoTokenizer.from_pretrained(out / "merged")
    assert tok(f"x {TOKEN}", add_special_tokens=False)["input_ids"][-1] == base_rows
    assert json.loads((out / "merged" / VOCAB_RECORD).read_text())["vocab_size"] == base_rows + 1


def test_vllm_refuses_the_adapter_as_a_lora_and_names_the_merged_model(bundle):
    from tunegate.serve.vllm import plan_launch

    out, _ = bundle
    info = json.loads((out / "release.json").read_text())
    with pytest.raises(TunegateError) as exc:
        plan_launch("/base", "base", {"tok": (out, info)})
    assert "added tokens" in str(exc.value) and "--merged tok" in str(exc.value)
    assert plan_launch("/base", "base", {"tok": (out, info)}, merged="tok").model == out / "merged"


def test_the_embedded_server_grows_the_base_and_serves_with_the_adapters_tokenizer(bundle, trained, tiny_model_dir):
    from tunegate.config import BundleConfig
    from tunegate.models import embedding_rows
    from tunegate.serve.engine import EmbeddedEngine

    out, keys = bundle
    project, _ = trained
    base_rows = _base_rows(tiny_model_dir)
    engine = EmbeddedEngine.load(project, [BundleConfig(path=out, name="tok")], keys[1])
    assert embedding_rows(engine.model) == base_rows + 1
    assert engine.tokenizer.convert_tokens_to_ids(TOKEN) == base_rows
    ids, _ = engine.encode([{"role": "user", "content": f"open {TOKEN} now"}])
    assert base_rows in ids[0].tolist()
    done = engine.complete("tok", [{"role": "user", "content": f"open {TOKEN} now"}], max_new_tokens=3, temperature=0.0)
    assert done.prompt_tokens == ids.shape[1] and done.completion_tokens >= 1


def test_validate_refuses_an_added_token_the_base_already_has(tmp_path, tiny_model_dir):
    _write_project(tmp_path, tiny_model_dir, added='["<|im_end|>", "hello"]')
    problems = validate_project(load_project(tmp_path / "tunegate.yaml"))
    found = [p for p in problems if "train.added_tokens" in p]
    assert len(found) == 1 and "\n" not in found[0], problems
    assert "'<|im_end|>' (id 2)" in found[0] and "'hello'" in found[0] and "already in the base tokenizer's vocabulary" in found[0]


@pytest.mark.parametrize("added, why", [
    ('["<t>", "<t>"]', "listed twice"),
    ('[""]', "empty or blank"),
    ('[" <t>"]', "whitespace"),
])
def test_the_project_file_refuses_duplicate_or_blank_added_tokens(tmp_path, tiny_model_dir, added, why):
    _write_project(tmp_path, tiny_model_dir, added=added)
    with pytest.raises(TunegateError, match=why):
        load_project(tmp_path / "tunegate.yaml")


def test_the_preflight_dry_run_measures_the_grown_model(trained):
    from tunegate.preflight import run_checks

    project, run = trained
    check = run_checks(project, run / "data", measure=True)
    assert check["errors"] == 0, check["findings"]
    assert check["micro_benchmark"]["tokens_per_s"] > 0


def test_an_untied_output_layer_trains_and_carries_the_new_rows_too(split_eos_model_dir, tmp_path):
    """split_eos_model_dir has an lm_head of its own: its new row is a trainable-tokens row of the adapter as well,
    so a fresh load gives the same logits, the new token's included."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from tunegate.models import fit_embeddings, fit_to_adapter, load_model, load_tokenizer, vocabulary_record
    from tunegate.recipes.common import added_token_indices

    tok = load_tokenizer(split_eos_model_dir, [TOKEN])
    new_id = tok.convert_tokens_to_ids(TOKEN)
    model = load_model(split_eos_model_dir)
    vocab = fit_embeddings(model, tok, [TOKEN])
    indices = added_token_indices(model, [new_id])
    assert indices == {"model.embed_tokens": [new_id], "lm_head": [new_id]}
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", trainable_token_indices=indices))
    deltas = {n: p for n, p in peft.named_parameters() if "trainable_tokens_delta" in n}
    assert len(deltas) == 2 and all(p.requires_grad for p in deltas.values())
    with torch.no_grad():  # as training would: move both new rows
        for p in deltas.values():
            p.add_(torch.randn_like(p))
    peft.eval()
    x = tok(f"open {TOKEN} now {TOKEN}", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        before = peft(input_ids=x).logits
    peft.save_pretrained(tmp_path, save_embedding_layers=False)
    (tmp_path / VOCAB_RECORD).write_text(json.dumps(vocabulary_record(tok, vocab["base_vocab_size"], vocab["vocab_size"], [TOKEN])))

    again = PeftModel.from_pretrained(fit_to_adapter(load_model(split_eos_model_dir), tmp_path), str(tmp_path)).eval()
    with torch.inference_mode():
        after = again(input_ids=x).logits
    assert torch.allclose(before, after, atol=1e-6)
    merged = again.merge_and_unload()
    lm_head_row = next(p for n, p in deltas.items() if "lm_head" in n).detach()[0]
    assert torch.allclose(merged.lm_head.weight[new_id], lm_head_row)
    assert not torch.allclose(merged.lm_head.weight[new_id], merged.model.embed_tokens.weight[new_id])  # untied


def test_a_full_fine_tune_trains_the_grown_model_and_eval_grows_its_baseline(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    _write_project(tmp_path, tiny_model_dir)
    text = (tmp_path / "tunegate.yaml").read_text().replace("  adapter: lora\n", "  adapter: full\n").replace(
        "  lora: {r: 4, lora_alpha: 8}\n", "")
    (tmp_path / "tunegate.yaml").write_text(text)
    project = load_project(tmp_path / "tunegate.yaml")
    assert run_pipeline(project, until="eval")["eval"].verdict == "PASS"
    base_rows = _base_rows(tiny_model_dir)
    model_dir = tmp_path / "runs" / "default" / "train" / "model"
    assert json.loads((model_dir / VOCAB_RECORD).read_text())["added_tokens"] == {TOKEN: base_rows}
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert full.config.vocab_size == base_rows + 1
    samples = (tmp_path / "runs" / "default" / "eval" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 6


def test_ifd_selection_scores_rows_using_the_added_token_on_the_grown_base(tmp_path, tiny_model_dir):
    """data.select's IFD runs the base model over the rows: it is grown for the added token's id first."""
    _write_project(tmp_path, tiny_model_dir)
    project = load_project(tmp_path / "tunegate.yaml", ["data.select={complexity: ifd, diversity_threshold: 0.999}"])
    run_pipeline(project, until="data")
    rows = [json.loads(line) for line in (tmp_path / "runs" / "default" / "data" / "train.jsonl").read_text().splitlines()]
    assert rows and all(isinstance(r["meta"]["ifd"], float) for r in rows)
