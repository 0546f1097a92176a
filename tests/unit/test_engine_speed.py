"""The training engine's speed work (issue 24) changes no result: padding-free batches give the padded batch's loss
mask and per-token loss and keep rows apart; the lean LoRA/DoRA forward gives PEFT's outputs and gradients; the
precision is chosen by the hardware. On the real tokenizer and a tiny 2-layer Llama built in-process."""

import pytest

from conftest import chat


def _rows(tokenizer, n=6):
    from tunegate.data.format import encode_chat

    answers = ["card_arrival", "a much longer answer about an exchange rate that went wrong", "top_up", "no", "pin", "ok"]
    rows = []
    for i in range(n):
        enc = encode_chat(tokenizer, chat(f"question {i} " + "word " * (3 * i), answers[i % len(answers)])["messages"])
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
    return rows


def _padded(rows, pad_id):
    import torch

    from tunegate.data.format import IGNORE_INDEX

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def test_pack_rows_places_every_row_once_within_the_budget_and_a_long_row_alone():
    from tunegate.recipes.sft import pack_rows

    lengths = [40, 200, 30, 100, 90, 300, 10]
    packs = pack_rows(lengths, budget=256)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    cap = 300  # the longest row sets the cap when it is over the budget
    assert all(sum(lengths[i] for i in p) <= cap for p in packs)
    assert [5] in packs and len(packs) == 3  # 770 tokens in sequences of <= 300: three


def test_padding_free_batch_has_the_padded_batchs_loss_mask_and_per_token_loss(tokenizer, tiny_model_dir):
    import torch

    from tunegate.data.format import IGNORE_INDEX
    from tunegate.models import load_model
    from tunegate.recipes.sft import PackedCollator, supervised_only_loss

    rows = _rows(tokenizer)
    packed = PackedCollator(tokenizer.pad_token_id, budget=160)(rows)
    padded = _padded(rows, tokenizer.pad_token_id)
    assert packed["input_ids"].shape[0] < len(rows)  # rows were packed together
    assert int(packed["attention_mask"].sum()) == sum(len(r["input_ids"]) for r in rows)  # no token lost
    supervised = sum(sum(1 for y in r["labels"][1:] if y != IGNORE_INDEX) for r in rows)
    assert int((packed["labels"][:, 1:] != IGNORE_INDEX).sum()) == supervised == int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())

    model = load_model(tiny_model_dir)
    with torch.no_grad():
        loss_packed, n_packed, correct_packed = supervised_only_loss(model, packed)
        loss_padded, n_padded, correct_padded = supervised_only_loss(model, padded)
    assert n_packed == n_padded == supervised
    assert correct_packed == correct_padded
    assert float(loss_packed) == pytest.approx(float(loss_padded), rel=1e-5)


def test_a_row_never_attends_to_another_row_of_its_packed_sequence(tokenizer, tiny_model_dir):
    """The row packed first is perturbed: the rows packed after it (which causal attention alone would let see it)
    keep their logits, and the row packed last scores as it does alone (its position ids restart at 0)."""
    import torch

    from tunegate.models import load_model
    from tunegate.recipes.sft import PackedCollator, pack_rows

    rows = _rows(tokenizer, 3)
    collate = PackedCollator(tokenizer.pad_token_id, budget=4096)
    batch = collate(rows)
    assert batch["input_ids"].shape[0] == 1  # one packed sequence holds all three rows
    (order,) = pack_rows([len(r["input_ids"]) for r in rows], 4096)  # the collator's packing order
    starts, at = {}, 0
    for i in order:
        starts[i] = at
        at += len(rows[i]["input_ids"])
    first, last = order[0], order[-1]
    changed = [dict(r) for r in rows]
    changed[first] = {"input_ids": [t if k < 2 else (t + 7) % 1000 for k, t in enumerate(rows[first]["input_ids"])],
                      "labels": rows[first]["labels"]}
    other = collate(changed)
    assert other["input_ids"][0, starts[last]:].tolist()[:len(rows[last]["input_ids"])] == rows[last]["input_ids"]
    model = load_model(tiny_model_dir).eval()
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        b = model(input_ids=other["input_ids"], position_ids=other["position_ids"], use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([rows[last]["input_ids"]])).logits[0]
    s0, n0 = starts[first], len(rows[first]["input_ids"])
    assert not torch.allclose(a[s0:s0 + n0], b[s0:s0 + n0])  # the perturbed row's own logits moved
    for i in order[1:]:
        s, n = starts[i], len(rows[i]["input_ids"])
        assert torch.allclose(a[s:s + n], b[s:s + n], atol=1e-5)  # the rows after it did not
    s, n = starts[last], len(rows[last]["input_ids"])
    assert torch.allclose(a[s:s + n], alone, atol=1e-4)  # a packed row is scored as if it were alone
    with torch.no_grad():  # the check can see a leak: with a KV cache, transformers ignores the packing
        leaky = model(input_ids=other["input_ids"], position_ids=other["position_ids"], use_cache=True).logits[0]
    assert not torch.allclose(leaky[s:s + n], a[s:s + n], atol=1e-3)


@pytest.mark.parametrize("dora", [True, False], ids=["dora", "lora"])
def test_lean_adapter_forward_gives_peft_outputs_and_gradients(tiny_model_dir, dora):
    """recipes.lean_adapter against PEFT's own forward: fp32, and bf16 base weights under bf16 autocast (the
    training precision where bf16 is native); one layer with a bias, so the DoRA rearrangement is checked with one."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunegate.models import load_model
    from tunegate.recipes.lean_adapter import use_lean_forward

    def model(lean, dtype, dropout=0.0):
        torch.manual_seed(0)
        base = load_model(tiny_model_dir, dtype=dtype)
        proj = base.model.layers[0].self_attn.o_proj
        proj.bias = torch.nn.Parameter(torch.randn(proj.out_features, dtype=dtype) * 0.1, requires_grad=False)
        m = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=dora, lora_dropout=dropout))
        with torch.no_grad():  # B starts at zero: move it so the adapter's delta counts (and the DoRA norm with it)
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
                if "magnitude" in name:
                    p.mul_(1.1)
        if lean:
            assert use_lean_forward(m) == 14  # 7 linear layers x 2 decoder layers
            assert use_lean_forward(m) == 0  # already swapped
        return m

    ids = torch.tensor([[5, 17, 300, 42, 9, 1000, 77]])

    def run(lean, dtype):
        m = model(lean, dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits = m(input_ids=ids).logits.float()
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.float() for n, p in m.named_parameters() if p.requires_grad}

    def err(a, b):
        return float((a - b).norm() / b.norm())

    exact, exact_grads = run(False, torch.float32)  # PEFT in fp32: the reference
    lean32, lean32_grads = run(True, torch.float32)
    peft16, peft16_grads = run(False, torch.bfloat16)
    lean16, lean16_grads = run(True, torch.bfloat16)
    assert exact_grads.keys() == lean16_grads.keys() and any("magnitude" in n for n in exact_grads) == dora
    assert err(lean32, exact) < 1e-5
    assert err(lean16, exact) <= 1.5 * err(peft16, exact) + 1e-3  # bf16: as close to exact as PEFT's own bf16
    for name, g in exact_grads.items():
        assert err(lean32_grads[name], g) < 1e-4, name
        assert err(lean16_grads[name], g) <= 1.5 * err(peft16_grads[name], g) + 0.02, (name, err(lean16_grads[name], g), err(peft16_grads[name], g))
    from peft.tuners.lora.layer import Linear

    peft_forward, calls = Linear.forward, []

    def counted(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return peft_forward(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Linear, "forward", counted)
        model(True, torch.float32)(input_ids=ids)
        assert calls == []  # the lean path ran: PEFT's forward was never entered
        model(True, torch.float32, dropout=0.1).train()(input_ids=ids)
        assert len(calls) == 14  # dropout in training: every layer went through PEFT's forward
    m = model(True, torch.float32)
    m.eval()
    with m.disable_adapter(), torch.no_grad():  # PEFT's own paths still answer: adapters disabled
        plain = m(input_ids=ids).logits
    m.merge_adapter()
    with torch.no_grad():
        merged = m(input_ids=ids).logits
    m.unmerge_adapter()
    with torch.no_grad():
        lean = m(input_ids=ids).logits
    assert torch.allclose(merged, lean, atol=1e-4) and not torch.allclose(plain, lean, atol=1e-3)


def test_without_gradients_the_dora_norm_is_kept_until_a_weight_changes(tiny_model_dir):
    """Generation and serving run without gradients: the lean DoRA layer computes each weight norm once, gives PEFT's
    outputs, and computes it again when an adapter weight changes in place; a training forward after it computes
    its own norm and trains."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from tunegate.models import load_model
    from tunegate.recipes.lean_adapter import use_lean_forward

    torch.manual_seed(0)
    peft = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    lean = copy.deepcopy(peft)
    use_lean_forward(lean)
    ids = torch.tensor([[5, 17, 300, 42, 9, 1000, 77]])
    layer = next(m for m in lean.modules() if hasattr(m, "row_norm"))
    with torch.inference_mode():
        first = lean(input_ids=ids).logits
        kept = layer._kept_norm[1]
        assert torch.allclose(lean(input_ids=ids).logits, first) and layer._kept_norm[1] is kept  # not recomputed
        assert torch.allclose(first, peft(input_ids=ids).logits, atol=1e-5)
    with torch.no_grad():  # the same in-place change to both models' adapters
        for model in (peft, lean):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(3.0)
    with torch.inference_mode():
        changed = lean(input_ids=ids).logits
        assert layer._kept_norm[1] is not kept and not torch.allclose(changed, first, atol=1e-3)
        assert torch.allclose(changed, peft(input_ids=ids).logits, atol=1e-5)
    lean.train()
    lean(input_ids=ids).logits.square().mean().backward()  # with gradients on, the norm is computed anew and trains
    assert any(p.grad is not None for n, p in lean.named_parameters() if "lora_B" in n)
    with torch.inference_mode():  # weights loaded under inference_mode keep no version counter: computed each time
        loaded = copy.deepcopy(peft)
        use_lean_forward(loaded)
        assert torch.allclose(loaded(input_ids=ids).logits, peft(input_ids=ids).logits, atol=1e-5)
        assert all(getattr(m, "_kept_norm", None) is None for m in loaded.modules())


def test_a_fresh_dora_adapter_over_bf16_base_weights_starts_as_the_base_model(tiny_model_dir):
    """PEFT rounds a new DoRA magnitude to the bf16 base's dtype; exact_dora_magnitude recomputes it in fp32, so at
    step 0 the adapted model answers exactly as the base with the adapter disabled (DPO's reference)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunegate.models import load_model
    from tunegate.recipes.lean_adapter import exact_dora_magnitude, use_lean_forward

    m = get_peft_model(load_model(tiny_model_dir, dtype=torch.bfloat16),
                       LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True), autocast_adapter_dtype=True)
    use_lean_forward(m)
    ids = torch.tensor([[5, 17, 300, 42, 9, 1000, 77]])

    def gap():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            adapted = m(input_ids=ids).logits.float()
            with m.disable_adapter():
                base = m(input_ids=ids).logits.float()
        return float((adapted - base).abs().max())

    assert gap() > 0  # PEFT's magnitude, rounded to bf16, moves the output at step 0
    assert exact_dora_magnitude(m) == 14
    assert gap() == 0.0


def test_an_explicit_trl_precision_keeps_the_base_in_fp32():
    from types import SimpleNamespace

    from tunegate.recipes.run import _precision

    def project(**trl):
        return SimpleNamespace(train=SimpleNamespace(adapter="dora", method="sft", trl=trl))

    assert _precision(project(bf16=False)) == {"base_weights": "fp32", "autocast": None,
                                                "reason": "train.trl sets {'bf16': False}: fp32 base weights"}
    assert _precision(project(fp16=True))["autocast"] == "fp16"
    assert _precision(project())["base_weights"] in ("bf16", "fp32")  # by the hardware


def test_precision_is_chosen_by_the_hardware(monkeypatch):
    from tunegate import models

    monkeypatch.setattr(models, "native_bf16", lambda: "avx512_bf16")
    adapter = models.train_precision(full=False)
    assert adapter["base_weights"] == "bf16" and adapter["autocast"] == "bf16" and "avx512_bf16" in adapter["reason"]
    assert models.describe_precision(adapter, adapter=True) == "bf16 base weights, fp32 adapter, bf16 autocast"
    full = models.train_precision(full=True)
    assert full["base_weights"] == "fp32" and full["autocast"] == "bf16"  # fp32 master weights for what AdamW updates
    monkeypatch.setattr(models, "native_bf16", lambda: None)
    plain = models.train_precision(full=False)
    assert plain == {"base_weights": "fp32", "autocast": None, "reason": plain["reason"]} and "no native bf16" in plain["reason"]
    assert models.bf16_supported() is False


def test_the_embedded_server_attaches_adapters_on_the_lean_forward_with_pefts_outputs(tiny_model_dir, tmp_path):
    """serve.engine._attach: the first adapter and one loaded later (a promotion) both run the lean forward, and a
    DoRA adapter answers as PEFT's own forward does."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from tunegate.models import load_model
    from tunegate.recipes.lean_adapter import _factored_layer_class, _lean_linear_class
    from tunegate.serve.engine import _attach

    for seed, name in ((0, "one"), (1, "two")):
        torch.manual_seed(seed)
        m = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True))
        with torch.no_grad():
            for pname, p in m.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, 0.05)
        m.save_pretrained(tmp_path / name)
    served = _attach(load_model(tiny_model_dir).eval(), tmp_path / "one", "one")
    served = _attach(served, tmp_path / "two", "two")
    lean = _lean_linear_class()
    layers = [mod for mod in served.modules() if "lora_A" in mod._modules]
    assert layers and all(type(mod) is lean for mod in layers)
    # the second adapter's DoRA layers are new modules: swapped too, or its forward would fall back to PEFT's
    assert all(type(mod.lora_magnitude_vector[n]) is _factored_layer_class() for mod in layers for n in ("one", "two"))
    ids = torch.tensor([[5, 17, 300, 42, 9, 1000, 77]])
    for name in ("one", "two"):
        served.set_adapter(name)
        reference = PeftModel.from_pretrained(load_model(tiny_model_dir), str(tmp_path / name)).eval()
        with torch.inference_mode():
            got, want = served(input_ids=ids).logits, reference(input_ids=ids).logits
        assert torch.allclose(got, want, atol=1e-5), name
        assert not torch.allclose(got, load_model(tiny_model_dir)(input_ids=ids).logits.detach(), atol=1e-3)
