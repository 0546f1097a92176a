"""Release stage: the last stage of `tunegate run`, the PASSed run's signed, servable bundle.

The pipeline runs it only when the eval verdict is PASS (a FAIL stops after the report). The body is
`tunegate.release.write_bundle`, written into the stage's partial folder so that the folder swap publishes the
bundle whole: `runs/<id>/release/bundle/` (`tunegate.release.bundle_dir`), beside the stage's manifest.json.

Signing key (`release:` in the project file): `release.key`, or `release.sigstore`, or else the project-local
pair `.tunegate/keys/private.pem` (0600, ignored by git) and `public.pem`, made on first use
(`tunegate.release.project_keys`). The key is made by `prepare`, which the pipeline calls just before it
fingerprints a release that is about to run, so the run that makes it and the next one fingerprint the same public
key; the config view only reads (`tunegate runs` and stale checks make no key).

Fingerprint: the manifests of data, train, eval and report (upstream), `release.merge`, `release.sigstore`,
`release.gguf` with the pinned llama.cpp, and the sha256 of the signing key's public part; never the private key's
bytes or path.
"""

from __future__ import annotations

from typing import Any

from tunegate.core.stage import Stage, StageResult, StageSpec
from tunegate.release import BUNDLED_STAGES, bundle_dir, signing_key, signing_public_sha256, write_bundle


def config(project) -> dict[str, Any]:
    """The settings that change the bundle. Reads only: never makes a key (`tunegate runs` calls it for every run)."""
    r = project.release
    out = {"merge": r.merge, "sigstore": r.sigstore, "public_key_sha256": signing_public_sha256(project)}
    if r.gguf is not None:  # the GGUF files and their parity gate, made by one pinned llama.cpp (tunegate.llama_env)
        from tunegate.llama_env import LLAMA_CPP_PYTHON

        out["gguf"] = {**r.gguf.model_dump(), "llama_cpp": LLAMA_CPP_PYTHON}
    return out


def prepare(project) -> None:
    """Before the fingerprint of a release that is about to run: make the project-local key pair when no key is
    configured (`signing_key`), so that its public part is what the fingerprint holds from the first run on."""
    signing_key(project)


def requires(project) -> None:
    """With `release.gguf`: the llama.cpp environment (tunegate.llama_env), checked before the run's first stage."""
    if project.release.gguf is not None:
        from tunegate.llama_env import find_venv

        find_venv()


def run(st: Stage) -> StageResult:
    p = st.project
    info = write_bundle(p, st.run_dir, st.dir / bundle_dir(st.run_dir).name, private_key=signing_key(p),
                        merge=p.release.merge, sigstore=p.release.sigstore, stages=BUNDLED_STAGES)
    return StageResult(metrics={
        "bundle": "bundle/",
        "adapter_type": info["adapter_type"],
        "servable_as_lora": info["vllm"]["servable_as_lora"],
        "merged": info["vllm"]["merged"],
        "signing": info["signing"]["method"],
        "gguf": sorted(info["gguf"]) if info.get("gguf") else None,
        "public_key_sha256": info["signing"]["public_key_sha256"],
    })


SPEC = StageSpec(name="release", run=run, upstream=BUNDLED_STAGES, config=config, prepare=prepare, requires=requires)
