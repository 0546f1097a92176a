"""Runs inside the llama.cpp environment (tunegate.llama_env), by path, with that environment's python: it imports
the standard library and llama_cpp only (tunegate is not installed there). tunegate.gguf_export starts it:

    .venv-llama/bin/python llama_worker.py REQUEST.json OUT.jsonl

REQUEST.json is {"task": "quantize", "input": F16.gguf, "output": OUT.gguf, "type": "q4_k_m", "threads": N}, or
{"task": "answer", "model": X.gguf, "rows": [{"id", "messages" | "prompt"}], "max_tokens", "n_ctx", "threads"}.
`answer` writes one header line (llama.cpp's own view of the file: chat format, template, eos and bos) and then
one line per row: the answer, why it ended ("stop": an end-of-generation token or the template's stop string;
"length": max_tokens), the tokens generated, and the prompt token ids llama.cpp fed the model, taken from
`Llama.generate`'s argument, so they are what the model saw, not a re-rendering.

Chat rows go through `Llama.create_chat_completion`, the call a llama-cpp-python user makes: the chat handler
llama-cpp-python picks for the file (the GGUF's own `tokenizer.chat_template`, or a built-in format it guesses
from it), greedy (temperature 0), repeat penalty 1.
"""

import json
import sys
import time


def quantize(req: dict) -> dict:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + req["type"].upper())
    params.nthread = int(req.get("threads") or 0)
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(req["input"].encode(), req["output"].encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({req['input']} -> {req['type']}) returned {rc}")
    return {"quantize_s": round(time.perf_counter() - t0, 2)}


def answer(req: dict, out) -> None:
    import llama_cpp
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(req["model"], n_ctx=int(req["n_ctx"]), n_threads=int(req["threads"]), seed=0, verbose=False)
    fed: list[list[int]] = []
    generate = llm.generate

    def recording_generate(tokens, *args, **kwargs):
        fed.append([int(t) for t in tokens])
        return generate(tokens, *args, **kwargs)

    llm.generate = recording_generate  # create_completion calls self.generate(prompt_tokens, ...)
    eos, bos = llm.token_eos(), llm.token_bos()
    header = {
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),  # the CPU features built in
        "chat_format": llm.chat_format,
        "chat_template": llm.metadata.get("tokenizer.chat_template"),
        "eos_token_id": eos,
        "bos_token_id": bos,
        "add_bos_token": llm.metadata.get("tokenizer.ggml.add_bos_token"),
        "eot_token_id": llm.metadata.get("tokenizer.ggml.eot_token_id"),
        "load_s": round(time.perf_counter() - t0, 2),
    }
    out.write(json.dumps(header) + "\n")
    max_tokens = int(req["max_tokens"])
    for row in req["rows"]:
        fed.clear()
        t = time.perf_counter()
        if "messages" in row:
            r = llm.create_chat_completion(messages=row["messages"], max_tokens=max_tokens, temperature=0.0,
                                           repeat_penalty=1.0)
            text = r["choices"][0]["message"]["content"] or ""
        else:
            r = llm.create_completion(prompt=row["prompt"], max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0)
            text = r["choices"][0]["text"]
        out.write(json.dumps({
            "id": row["id"],
            "output": text,
            "finish_reason": r["choices"][0]["finish_reason"],
            "completion_tokens": r["usage"]["completion_tokens"],
            "prompt_token_ids": fed[0] if fed else None,
            "seconds": round(time.perf_counter() - t, 3),
        }) + "\n")
        out.flush()


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise SystemExit("usage: llama_worker.py REQUEST.json OUT.jsonl")
    with open(argv[1], encoding="utf-8") as f:
        req = json.load(f)
    with open(argv[2], "w", encoding="utf-8") as out:
        if req["task"] == "quantize":
            out.write(json.dumps(quantize(req)) + "\n")
        elif req["task"] == "answer":
            answer(req, out)
        else:
            raise SystemExit(f"unknown task {req['task']!r}")


if __name__ == "__main__":
    main(sys.argv)
