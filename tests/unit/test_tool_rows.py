"""Tool calling rows (issue 21, item 4): chat rows with OpenAI `tools`, `tool_calls` and `tool` results; BFCL's
files read by configuration (format bfcl); rendering through a template's tool support or the fallback, with the
loss mask on the real SmolLM2 tokenizer; the GRPO verifier `tool_call`."""

import json

import pytest

from conftest import shared_data, write_jsonl
from tunegate.config import GrpoConfig, SourceConfig
from tunegate.data.format import (
    IGNORE_INDEX,
    TOOL_FALLBACK,
    encode_record,
    generation_prompt,
    record_control_token_problem,
    render_chat,
    special_tokens,
    supports_tools,
)
from tunegate.data.records import BFCL_NO_CALL_ANSWER, read_source, reference_answer, row_hash
from tunegate.evals.toolcall import parse_calls, tool_call
from tunegate.verifiers import build_verifier

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def row(rid, messages, tools=(WEATHER,)):
    out = {"id": rid, "messages": messages}
    if tools is not None:
        out["tools"] = list(tools)
    return out


def agentic():
    return [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 21}'},
            {"role": "assistant", "content": "21 degrees in Paris."}]


def read(tmp_path, rows, fmt="chat"):
    return read_source(SourceConfig(path=write_jsonl(tmp_path / "in.jsonl", rows), format=fmt))


def test_tool_rows_are_read_into_one_canonical_shape(tmp_path):
    rows = [row("call", agentic()[:2]), row("agentic", agentic()),
            row("bare_schema", agentic()[:2], tools=[WEATHER["function"]]),
            row("no_calls_written_as_empty", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "tool_calls": []}], tools=None)]
    records, rejected = read(tmp_path, rows)
    assert not rejected and records[3]["messages"][1] == {"role": "assistant", "content": "hello"}
    first = records[0]
    assert first["tools"] == [WEATHER] and "tools" not in first["meta"]
    assert first["messages"][1] == {"role": "assistant", "content": "",
                                    "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert records[1]["messages"][2] == {"role": "tool", "content": '{"temp_c": 21}', "tool_call_id": "c1"}
    assert records[2]["tools"] == [WEATHER]  # BFCL's bare function objects are wrapped
    assert json.loads(reference_answer(first)) == [{"get_weather": {"city": ["Paris"]}}]
    assert reference_answer(records[1]) == "[]"  # the final turn calls nothing
    assert row_hash(first) != row_hash({**first, "tools": [WEATHER, {**WEATHER, "function": {"name": "other"}}]})


def test_malformed_tool_rows_are_rejected_with_a_named_rule(tmp_path):
    user = {"role": "user", "content": "Weather in Paris?"}
    calling = {"role": "assistant", "content": "", "tool_calls": [CALL]}
    rows = [
        row("no_tools", [user, calling], tools=None),
        row("tool_turn_no_tools", [user, {"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}], tools=None),
        row("empty_tools", [user, calling], tools=[]),
        row("tools_not_list", [user, calling], tools={"name": "get_weather"}),
        row("nameless_tool", [user, calling], tools=[{"type": "function", "function": {"parameters": {}}}]),
        row("tool_twice", [user, calling], tools=[WEATHER, WEATHER]),
        row("unknown_tool", [user, {**calling, "tool_calls": [{"type": "function", "function": {"name": "get_time", "arguments": {}}}]}]),
        row("bad_arguments", [user, {**calling, "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{oops"}}]}]),
        row("list_arguments", [user, {**calling, "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": [1]}}]}]),
        row("calls_not_list", [user, {**calling, "tool_calls": "get_weather"}]),
        row("result_missing", [user, calling, {"role": "assistant", "content": "21 degrees"}]),
        row("result_extra", [*agentic()[:3], {"role": "tool", "content": "again"}, agentic()[3]]),
        row("result_first", [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]),
        row("empty_text_no_call", [user, {"role": "assistant", "content": ""}]),
        row("ends_on_result", agentic()[:3]),
    ]
    records, rejected = read(tmp_path, rows)
    assert records == []
    assert {r.id: r.rule for r in rejected} == {
        "no_tools": "tool_calls", "tool_turn_no_tools": "tool_calls", "empty_tools": "invalid_tools",
        "tools_not_list": "invalid_tools", "nameless_tool": "invalid_tools", "tool_twice": "invalid_tools",
        "unknown_tool": "unknown_tool", "bad_arguments": "tool_calls", "list_arguments": "tool_calls",
        "calls_not_list": "tool_calls", "result_missing": "role_order", "result_extra": "role_order",
        "result_first": "role_order", "empty_text_no_call": "empty_turn", "ends_on_result": "role_order",
    }


def test_bfcl_rows_from_a_file_and_its_ground_truth(tmp_path):
    (tmp_path / "possible_answer").mkdir()
    fn = {"name": "area", "description": "Area.", "parameters": {"type": "dict", "properties": {"base": {"type": "integer"}, "unit": {"type": "string"}}}}
    questions = [
        {"id": "simple_python_0", "question": [[{"role": "user", "content": "Area of base 10?"}]], "function": [fn]},
        {"id": "simple_python_1", "question": [[{"role": "user", "content": "No truth for me"}]], "function": [fn]},
        {"id": "simple_python_2", "question": [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]], "function": [fn]},
        {"id": "simple_python_3", "question": [[{"role": "user", "content": "Wrong function"}]], "function": [fn]},
        {"id": "simple_python_4", "question": [[{"role": "user", "content": "Bad truth"}]], "function": [fn]},
    ]
    truths = [{"id": "simple_python_0", "ground_truth": [{"area": {"base": [10], "unit": ["", "cm"]}}]},
              {"id": "simple_python_3", "ground_truth": [{"volume": {"base": [10]}}]},
              {"id": "simple_python_4", "ground_truth": [{"area": {"base": 10}}]}]
    path = write_jsonl(tmp_path / "BFCL_v4_simple_python.json", questions)
    write_jsonl(tmp_path / "possible_answer" / "BFCL_v4_simple_python.json", truths)
    write_jsonl(tmp_path / "BFCL_v4_irrelevance.json", [{"id": "irrelevance_0", "question": [[{"role": "user", "content": "Tell a joke"}]], "function": [fn]}])
    records, rejected = read_source(SourceConfig(path=path, format="bfcl"))
    assert {r.id: r.rule for r in rejected} == {"simple_python_1": "missing_field", "simple_python_2": "unsupported_row",
                                               "simple_python_3": "invalid_ground_truth", "simple_python_4": "invalid_ground_truth"}
    (rec,) = records
    assert rec["meta"]["category"] == "simple_python" and rec["ground_truth"] == truths[0]["ground_truth"]
    assert rec["messages"][-1]["tool_calls"] == [{"type": "function", "function": {"name": "area", "arguments": {"base": 10}}}]
    assert json.loads(reference_answer(rec)) == truths[0]["ground_truth"]
    folder, _ = read_source(SourceConfig(path=tmp_path, format="bfcl"))  # the folder: every question file, by name
    irrelevant = next(r for r in folder if r["id"] == "irrelevance_0")
    assert irrelevant["meta"]["category"] == "irrelevance" and reference_answer(irrelevant) == "[]"
    assert irrelevant["messages"][-1] == {"role": "assistant", "content": BFCL_NO_CALL_ANSWER}


def test_fallback_rendering_and_loss_mask_on_smollm2(tokenizer, tmp_path):
    assert not supports_tools(tokenizer)  # SmolLM2's ChatML template has no tool support
    (rec,) = read(tmp_path, [row("agentic", [{"role": "system", "content": "Be brief."}, *agentic()])])[0]
    enc = encode_record(tokenizer, rec, 1024, "drop")
    text = tokenizer.decode(enc.input_ids)
    assert "Be brief.\n\nYou may call functions" in text and json.dumps(WEATHER) in text
    assert '<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response><|im_end|>' in text
    spans, span = [], []
    for tok, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE_INDEX:
            span.append(tok)
        elif span:
            spans.append(tokenizer.decode(span))
            span = []
    spans += [tokenizer.decode(span)] if span else []
    # both assistant turns are supervised, the call as its <tool_call> text; schemas and the tool result are not
    assert spans == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                     "21 degrees in Paris.<|im_end|>"]
    prompt = generation_prompt(tokenizer, {**rec, "messages": rec["messages"][:3]})  # eval renders the same way
    assert text.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n") and "You may call functions" in prompt
    answer = spans[0].removesuffix("<|im_end|>")
    assert tool_call(answer, reference_answer({**rec, "messages": rec["messages"][:3]})) == 1.0  # the trained text parses back


TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_with_tool_support_renders_them_itself(tokenizer, tmp_path):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TOOL_TEMPLATE
    assert supports_tools(tok)
    (rec,) = read(tmp_path, [row("agentic", agentic())])[0]
    text = render_chat(tok, rec["messages"], False, rec["tools"])
    assert text.startswith("<|im_start|>system\nTOOLS:") and 'CALL get_weather {"city": "Paris"}' in text
    assert TOOL_FALLBACK[:20] not in text
    enc = encode_record(tok, rec, 1024, "drop")
    sup = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])
    assert sup == 'CALL get_weather {"city": "Paris"}<|im_end|>21 degrees in Paris.<|im_end|>'
    tok.chat_template = tokenizer.chat_template
    assert not supports_tools(tok)  # the cached answer follows the template


def test_control_tokens_in_schemas_and_calls_are_refused(tokenizer):
    rec = {"messages": agentic()[:2], "tools": [{**WEATHER, "function": {**WEATHER["function"], "description": "<|im_end|>"}}]}
    assert "tools contains the control token" in record_control_token_problem(special_tokens(tokenizer), rec)
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "<|im_start|>"}}}
    rec = {"messages": [agentic()[0], {"role": "assistant", "content": "", "tool_calls": [call]}], "tools": [WEATHER]}
    assert "messages[1].tool_calls contains" in record_control_token_problem(special_tokens(tokenizer), rec)


def test_tool_call_verifier(tmp_path):
    verifier = build_verifier(GrpoConfig(verifier="tool_call"), tmp_path)
    ref = json.dumps([{"get_weather": {"city": ["Paris"]}}])
    good = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris"}}\n</tool_call>'
    assert verifier.score(good, ref, {"id": "r"}) == 1.0
    assert verifier.score("It is sunny.", ref, {"id": "r"}) == 0.0
    assert verifier.score("It is sunny.", "[]", {"id": "r"}) == 1.0
    assert verifier.errors == 0
    assert verifier.score(good, "card_arrival", {"id": "r"}) == 0.0 and verifier.errors == 1  # a row without tools


def test_grpo_columns_render_tool_rows_as_text_with_their_references(tokenizer, tmp_path):
    from tunegate.recipes.grpo import columns

    (rec,) = read(tmp_path, [row("call", agentic()[:2])])[0]
    cols = columns([rec], tokenizer)
    assert cols["prompt"] == [generation_prompt(tokenizer, rec)] and "You may call functions" in cols["prompt"][0]
    assert json.loads(cols["reference"][0]) == [{"get_weather": {"city": ["Paris"]}}]
    plain = {"id": "p", "messages": agentic()[:1] + [{"role": "assistant", "content": "ok"}]}
    assert columns([plain], tokenizer)["prompt"] == [plain["messages"][:1]]  # other rows stay conversational


@pytest.mark.real_data
def test_bfcl_folder_reads_clean_and_every_row_renders_under_1024_tokens(tokenizer):
    from collections import Counter

    records, rejected = read_source(SourceConfig(path=shared_data("bfcl"), format="bfcl"))
    assert not rejected
    assert Counter(r["meta"]["category"] for r in records) == {"simple_python": 400, "irrelevance": 240, "multiple": 200, "parallel": 200}
    for rec in records[::25]:
        enc = encode_record(tokenizer, rec, 1024, "drop")
        answer = tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX][:-1])
        assert tool_call(answer, reference_answer(rec)) == 1.0, rec["id"]  # what is trained on scores 1
        assert parse_calls(answer) or rec["meta"]["category"] == "irrelevance"


def test_holdout_splits_a_source_by_id_into_two_disjoint_parts(tmp_path):
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(200)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)

    def ids(part, fraction=0.25, seed=0):
        return {r["id"] for r in read_source(SourceConfig(path=path, holdout={"fraction": fraction, "seed": seed, "part": part}))[0]}

    held, rest = ids("held_out"), ids("rest")
    assert held.isdisjoint(rest) and len(held | rest) == 200 and 30 < len(held) < 70
    write_jsonl(path, rows[::-1][:150])  # the same ids are held out whatever the order or the other rows
    assert ids("held_out") == {i for i in held if int(i[1:]) >= 50}
    assert ids("held_out", seed=1) != ids("held_out")


def test_holdout_config_demands_the_complement_on_the_golden_file(tmp_path):
    from tunegate import TunegateError
    from tunegate.config import load_project

    write_jsonl(tmp_path / "all.jsonl", [{"id": "a", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])

    def project(train_holdout):
        (tmp_path / "tunegate.yaml").write_text(
            "name: t\nbase_model: smollm2-135m-instruct\ndata:\n"
            f"  sources: [{{path: all.jsonl{train_holdout}}}]\n"
            "  golden: {path: all.jsonl, holdout: {fraction: 0.2, seed: 3, part: held_out}}\n")
        return load_project(tmp_path / "tunegate.yaml")

    assert project(", holdout: {fraction: 0.2, seed: 3, part: rest}").data.sources[0].holdout.part == "rest"
    for bad in ("", ", holdout: {fraction: 0.2, seed: 0, part: rest}", ", holdout: {fraction: 0.2, seed: 3, part: held_out}"):
        with pytest.raises(TunegateError, match="the golden's complement"):
            project(bad)
    assert "holdout" not in SourceConfig(path="x.jsonl").model_dump()  # unset: the dump (and fingerprints) as before


@pytest.mark.real_data
def test_the_bfcl_example_validates_and_its_golden_set_matches_its_lock():
    from conftest import REPO
    from tunegate.config import load_project
    from tunegate.pipeline import validate_project

    shared_data("bfcl")
    project = load_project(REPO / "examples" / "bfcl" / "tunegate.yaml")
    assert validate_project(project) == []  # the golden rows are read and checked against golden.lock.json
    train, _ = read_source(project.data.sources[0])
    golden, _ = read_source(project.data.golden, role="golden")
    assert len(golden) == 209 and {r["id"] for r in train}.isdisjoint(r["id"] for r in golden)


NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_fallback_on_a_template_without_system_role_puts_the_schemas_in_the_first_user_turn(tokenizer, tmp_path):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = NO_SYSTEM_TEMPLATE
    (rec,) = read(tmp_path, [row("call", agentic()[:2])])[0]
    enc = encode_record(tok, rec, 1024, "drop")
    text = tok.decode(enc.input_ids)
    assert text.startswith("<|im_start|>user\nYou may call functions") and text.count("<|im_start|>user") == 1
    sup = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])
    assert sup.startswith("<tool_call>") and sup.endswith("</tool_call><|im_end|>")
