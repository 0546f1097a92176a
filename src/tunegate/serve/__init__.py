"""`tunegate serve`: an OpenAI-compatible endpoint over a base model and its verified release bundles' adapters.

    bundles     which release bundles may be served (signature, PASS verdict, base model), checked once
    engine      the Engine protocol and the embedded engine (transformers + PEFT in this process)
    vllm        the vLLM engine: launch preflight, the process, the proxy backend, runtime adapters
    vllm_setup  `tunegate serve-setup vllm`: vLLM's own virtual environment
    smoke       the smoke test against the PEFT reference (case C17 in docs/cases.md)
    db          the serving database: tenants, traces, feedback
    production  the registry's production version served as the project name, switched on promote/rollback
    api         the FastAPI app (`create_app`), `serve` (the foreground server) and `start_background`

`create_app`, `serve` and `start_background` are importable from here; they load tunegate.serve.api (and
FastAPI) on first use, so `import tunegate.serve.db` stays light.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunegate.serve.api import create_app, serve, start_background

__all__ = ["create_app", "serve", "start_background"]


def __getattr__(name: str):
    if name in __all__:
        from tunegate.serve import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
