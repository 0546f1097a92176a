"""Self-instruct synthetic data (tunegate.data.synth): filters, provenance, the reader, resume, both generators."""

from __future__ import annotations

import json

import pytest
from conftest import chat, fake_openai_server, write_jsonl

from tunegate import TunegateError
from tunegate.config import SourceConfig
from tunegate.data import synth
from tunegate.core.io import read_jsonl
from tunegate.data.records import read_source

SEEDS = [
    synth.Task("s1", "Write a haiku about the sea in spring.", "Waves fold into light."),
    synth.Task("s2", "Explain how a bicycle gear works to a child.", "Gears are wheels with teeth."),
    synth.Task("s3", "List three uses of baking soda at home.", "Cleaning, baking, deodorising."),
    synth.Task("s4", "Translate 'good morning' into French.", "Bonjour."),
]


class Scripted:
    """A fake Generator: instruction calls pop scripted replies in order; answer calls answer `answers`
    (instruction -> text) or "Answer to: <instruction>"."""

    name = "scripted-model"

    def __init__(self, instructions, answers=None):
        self.instructions = list(instructions)
        self.answers = answers or {}
        self.calls = []

    def complete(self, conversations, max_new_tokens, temperature=0.0, top_p=1.0, seed=0, desc=""):
        self.calls.append((list(conversations), temperature))
        out = []
        for conv in conversations:
            if len(conv) == 1 and conv[0]["content"].startswith("Here are"):
                out.append(self.instructions.pop(0) if self.instructions else "")
            else:
                q = conv[-1]["content"]
                out.append(self.answers.get(q, f"Answer to: {q}"))
        return out


def _run(tmp_path, instructions, n, seeds=SEEDS, **kw):
    gen = Scripted(instructions, kw.pop("answers", None))
    out = tmp_path / "synthetic.jsonl"
    stats = synth.synthesize(gen, seeds, n, out, progress=False, **kw)
    return out, stats, gen


def test_rouge_l_drops_near_copies_and_keeps_new_tasks(tmp_path):
    out, stats, _ = _run(tmp_path, [
        "Write a haiku about the sea in the spring.",  # near-copy of seed s1
        "Describe the water cycle for a school report.",  # new
        "Describe the water cycle for a school report, please.",  # near-copy of the row just generated
        "Suggest a name for a bakery that sells only bread.",  # new
    ], n=2, batch_size=4)
    rows = read_jsonl(out)
    assert [r["messages"][0]["content"] for r in rows] == [
        "Describe the water cycle for a school report.", "Suggest a name for a bakery that sells only bread."]
    assert stats["dropped"] == {"rouge_l": 2}
    dropped = read_jsonl(tmp_path / "synthetic.jsonl.dropped.jsonl")
    assert [d["similar_to"] for d in dropped][0] == "s1" and all(d["rouge_l"] >= 0.7 for d in dropped)


def test_filters_count_each_drop_by_reason(tmp_path):
    long_text = " ".join(["word"] * 151)
    out, stats, _ = _run(tmp_path, [
        "Request 5:   ",  # empty after the label
        "Too short",  # 2 words
        long_text,
        "... and then what happened next in the story?",  # starts with punctuation
        "Write one new request that a user could send.",  # echoes the prompt
        "write a HAIKU about   the sea in spring.",  # a seed shown in the prompt, after normalisation
        "Request 5: \"Plan a three-day trip to Lisbon on a small budget.\"\nRequest 6: more",  # kept, cleaned
        "plan a three-day trip to   LISBON on a small budget.",  # the row just kept, after normalisation
        "Give me a recipe for a vegan chocolate cake.",  # its answer is empty
    ], n=2, batch_size=9, max_attempts=9, answers={"Give me a recipe for a vegan chocolate cake.": "  \n"})
    assert stats["dropped"] == {"bad_start": 1, "copies_prompt": 2, "duplicate": 1, "empty_answer": 1,
                                "empty_instruction": 1, "too_long": 1, "too_short": 1}
    rows = read_jsonl(out)
    assert [r["messages"][0]["content"] for r in rows] == ["Plan a three-day trip to Lisbon on a small budget."]
    assert stats["rows_total"] == 1 and stats["stop_reason"] == "max_attempts"
    assert stats["instruction_prompts"] == stats["rows_new"] + stats["dropped_total"] + stats["surplus_instructions"]


def test_dedup_against_rows_already_in_the_output(tmp_path):
    out = tmp_path / "synthetic.jsonl"
    write_jsonl(out, [chat("Name three rivers in Africa.", "Nile, Congo, Niger.", "old1")])
    _, stats, _ = _run(tmp_path, ["name three RIVERS in africa.", "Name three mountains in Asia and their heights."], n=2, batch_size=2,
                       num_generated_examples=0)  # the old row is not shown in the prompt: a duplicate, not a copy
    assert stats["dropped"] == {"duplicate": 1}
    assert stats["rows_existing"] == 1 and stats["rows_total"] == 2


def test_rows_carry_provenance_and_pass_tunegates_reader(tmp_path):
    out, stats, gen = _run(tmp_path, ["Describe the water cycle for a school report.", "Suggest a name for a new bakery in town."],
                           n=2, batch_size=2, seed=3)
    for row in read_jsonl(out):
        assert set(row) == {"id", "messages", "source", "generator", "seed_ids", "prompt_template_sha256", "created_at"}
        assert row["source"] == "synthetic" and row["generator"] == "scripted-model"
        assert row["id"].startswith("synth-") and row["prompt_template_sha256"] == synth.PROMPT_TEMPLATE_SHA256
        assert row["seed_ids"] and set(row["seed_ids"]) <= {"s1", "s2", "s3", "s4"}
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    records, rejected = read_source(SourceConfig(path=out, format="chat"))
    assert not rejected and len(records) == 2
    assert all(r["meta"]["source"] == "synthetic" and r["meta"]["generator"] == "scripted-model" for r in records)
    stats_file = json.loads((tmp_path / "synthetic.jsonl.stats.json").read_text())
    assert stats_file["rows_new"] == 2 and stats_file["generator"] == "scripted-model" and stats_file["rows_per_s"] > 0
    # instructions are sampled (temperature > 0), answers greedy; answers see the seeds as worked examples
    (instr_calls, t_instr), (answer_calls, t_answer) = gen.calls
    assert t_instr > 0 and t_answer == 0.0
    assert len(answer_calls[0]) == 2 * 3 + 1 and answer_calls[0][0]["role"] == "user"


def test_resume_continues_to_n_and_counts_earlier_rows_in_the_filter(tmp_path):
    out, first, _ = _run(tmp_path, ["Describe the water cycle for a school report.", "Suggest a name for a new bakery in town."], n=2, batch_size=2)
    before = read_jsonl(out)
    _, second, _ = _run(tmp_path, [
        "Describe the water cycle for a school report!",  # a near-copy of a first-run row
        "Compose a limerick about a cat who likes jazz.",
        "Outline the main causes of the French Revolution.",
    ], n=4, batch_size=4)
    after = read_jsonl(out)
    assert after[:2] == before and len(after) == 4
    assert second["rows_existing"] == 2 and second["rows_new"] == 2 and second["dropped"] == {"rouge_l": 1}
    _, third, gen = _run(tmp_path, ["never asked"], n=4)
    assert third["stop_reason"] == "already_complete" and third["rows_new"] == 0 and gen.calls == []


def test_seed_system_prompt_is_kept_unless_a_source_instruction_supplied_it(tmp_path):
    system = "Answer in one sentence."
    seeds = [synth.Task(f"s{i}", t.instruction, t.answer, system) for i, t in enumerate(SEEDS)]
    out, _, gen = _run(tmp_path, ["Describe the water cycle for a school report."], n=1, seeds=seeds)
    assert read_jsonl(out)[0]["messages"][0] == {"role": "system", "content": system}
    assert gen.calls[1][0][0][0] == {"role": "system", "content": system}  # the answer call runs under it
    seeds = [synth.Task(t.id, t.instruction, t.answer, system, system_in_row=False) for t in seeds]
    out2 = tmp_path / "b.jsonl"
    synth.synthesize(Scripted(["Describe the water cycle for a school report."]), seeds, 1, out2, progress=False)
    assert [m["role"] for m in read_jsonl(out2)[0]["messages"]] == ["user", "assistant"]


def test_seeds_from_a_project_and_from_a_seed_file(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [chat("Is the shop open on Sunday?", "No, Monday to Saturday.", "t1", system="Be brief."), {"text": "x"}])
    src = SourceConfig(path=tmp_path / "train.jsonl", format="chat")

    class P:
        class data:
            sources = [src]

    tasks = synth.project_seeds(P)
    assert tasks == [synth.Task("t1", "Is the shop open on Sunday?", "No, Monday to Saturday.", "Be brief.", True)]
    f = write_jsonl(tmp_path / "seeds.jsonl", [
        chat("Hi there, who are you?", "An assistant.", "c1"),
        {"prompt": "2+2?", "completion": "4"},
        {"id": "seed_task_0", "instruction": "Sort the list.", "instances": [{"input": "3, 1, 2", "output": "1, 2, 3"}]},
        {"instruction": "Say hello.", "output": "Hello."},
        "not json",
        {"messages": []},
    ])
    got = synth.file_seeds(f)
    assert [(t.id, t.instruction, t.answer) for t in got] == [
        ("c1", "Hi there, who are you?", "An assistant."), ("seeds:2", "2+2?", "4"),
        ("seed_task_0", "Sort the list.\n\n3, 1, 2", "1, 2, 3"), ("seeds:4", "Say hello.", "Hello.")]
    with pytest.raises(TunegateError, match="no usable seed"):
        synth.file_seeds(write_jsonl(tmp_path / "empty.jsonl", ["{}"]))


def test_parse_instruction_strips_labels_lists_and_quotes():
    assert synth.parse_instruction("Request 5: Fix my bike.\nRequest 6: Another one") == "Fix my bike."
    assert synth.parse_instruction('**New request:** "Book a table for two."') == "Book a table for two."
    assert synth.parse_instruction("Sort these numbers: 3, 1, 2.\n\nAnswer: 1, 2, 3") == "Sort these numbers: 3, 1, 2."


def test_bad_output_file_and_no_seeds_are_refused(tmp_path):
    bad = write_jsonl(tmp_path / "synthetic.jsonl", [{"text": "not a chat row"}])
    with pytest.raises(TunegateError, match="cannot resume"):
        synth.synthesize(Scripted([]), SEEDS, 2, bad, progress=False)
    with pytest.raises(TunegateError, match="no seed tasks"):
        synth.synthesize(Scripted([]), [], 2, tmp_path / "x.jsonl", progress=False)


def test_in_process_generator_on_the_tiny_model(tmp_path, tiny_model_dir):
    from tunegate.models import load_inference_model, load_tokenizer

    gen = synth.LocalGenerator(load_inference_model(tiny_model_dir), load_tokenizer(tiny_model_dir), "tiny", batch_size=4)
    out = tmp_path / "synthetic.jsonl"
    stats = synth.synthesize(gen, SEEDS, 2, out, batch_size=4, instruction_tokens=12, max_new_tokens=6,
                             max_attempts=8, min_words=1, progress=False)
    rows = read_jsonl(out)
    assert len(rows) == stats["rows_total"] <= 2
    assert stats["instruction_prompts"] == stats["rows_new"] + stats["dropped_total"] + stats["surplus_instructions"]
    assert stats["generator"] == "tiny" and stats["generator_kind"] == "LocalGenerator"
    for row in rows:
        assert row["generator"] == "tiny" and row["source"] == "synthetic" and len(row["seed_ids"]) == 4
    _, rejected = read_source(SourceConfig(path=out, format="chat"))
    assert not rejected


def test_openai_generator_against_a_fake_server(tmp_path):
    replies = iter(["Request 5: Describe the water cycle for a school report.",
                    "Suggest a name for a new bakery in town."])

    def answer(model, messages):
        if messages[-1]["content"].startswith("Here are"):
            return next(replies)
        return f"{model} says: " + messages[-1]["content"][:20]

    with fake_openai_server(answer) as (url, requests):
        gen = synth.OpenAIGenerator(url, "served-model", api_key="k", concurrency=1)
        stats = synth.synthesize(gen, SEEDS, 2, tmp_path / "o.jsonl", batch_size=2, progress=False)
    rows = read_jsonl(tmp_path / "o.jsonl")
    assert stats["rows_new"] == 2 and [r["generator"] for r in rows] == ["served-model"] * 2
    assert rows[0]["messages"][0]["content"] == "Describe the water cycle for a school report."
    assert rows[0]["messages"][1]["content"].startswith("served-model says:")
    bodies = [b for _, b in requests]
    assert all(b["model"] == "served-model" for b in bodies)
    assert bodies[0]["temperature"] == 0.7 and "seed" in bodies[0] and bodies[-1]["temperature"] == 0
    with fake_openai_server(lambda m, msgs: None) as (url, _):
        with pytest.raises(TunegateError, match="failed"):
            synth.OpenAIGenerator(url, "m").complete([[{"role": "user", "content": "x"}]], 4)
