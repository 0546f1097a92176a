"""Signed release bundles: a PASSed run's adapter, evidence and manifest chain, signed as one directory.

A library module: it takes the run folder (and the stages whose manifests go into the bundle) as arguments and
imports no pipeline. The release stage (tunegate.stages.release, the last stage of `tunegate run`) writes the
bundle into its own folder, `runs/<id>/release/bundle/` (`bundle_dir`); `build_bundle` writes one anywhere else
(`tunegate release --out DIR`).

A release is refused unless the run's eval gate said PASS, the eval scored the train stage that is in the run
folder now, and the adapter on disk still has the sha256 its train manifest recorded. The bundle is built in a
hidden folder (the stage's `.release.partial/`, or a staging sibling of `--out`) and swapped into place at the
end (core.io.publish_dir), so a crash leaves no half-written bundle, and what a kill leaves beside it is deleted
by the next release. Layout:

    release.json          what was released (project, run, base model and the sha256 of its weights, the data sources
                          by project-relative path with their sha256, method, adapter settings, scores, vLLM fit,
                          `classify`: a classification head's labels and abstain threshold (train.method classify),
                          `abstain`: a generating candidate's abstain threshold (eval.abstain, tunegate.evals.abstain),
                          stop_token_ids: the eos and end-of-turn ids generation stops at; vocab_size and
                          added_tokens: the embedding rows and train.added_tokens it trained with)
    adapter/              the PEFT adapter files exactly as trained (with generation_config.json: the stop ids)
    merged/               only when vLLM cannot serve the adapter as a LoRA (DoRA, modules_to_save, added tokens, bias, rank):
                          the merged model from `tunegate.export` (checked against the adapter, case C13 in docs/cases.md);
                          never for a classification head (train.method classify: served by the embedded engine)
    gguf/                 only with release.gguf: GGUF files, Modelfile and the parity gate's verdict.json (tunegate.gguf_export);
                          the release is refused unless every file's parity gate passed
    manifests/<stage>.json  the manifests of data, train, eval and report, byte for byte (the lineage chain)
    eval/verdict.json, eval/scores.json (+ eval.html; + abstain.json with eval.abstain), report/report.md
    MODEL_CARD.md, article25.md, dpia.md   from `tunegate.report.release_docs` when that module is installed
    files.json            sha256 of every file above, keyed by path relative to the bundle
    model.sig             the signature over every file in the bundle, written last

Signing follows the OpenSSF model signing specification as implemented by `model-signing` 1.1.x
(github.com/sigstore/model-transparency): every file is hashed (sha256), the manifest of (path, digest) pairs
goes into an in-toto statement, and the statement is signed into a Sigstore bundle (DSSE envelope) with an
elliptic-curve key (P-256 here; offline) or, with `sigstore=True`, keyless through Sigstore's public instance
(OIDC login, Fulcio certificate, Rekor transparency log: needs the network). Verification checks that
signature and, independently, every file against `files.json` and every manifest's recorded output hashes
against the bundle's files, so a failure names each added, removed or changed file.

Keys: `release.key` in the project file, `--sigstore` / `release.sigstore`, or else the project-local pair
`.tunegate/keys/private.pem` (0600, ignored by git through `.tunegate/keys/.gitignore`) and `public.pem`,
created on first use (`project_keys`). Bundles of a project verify with `public_key_for(project)` (serve.public_key,
else release.key's public part, else the project-local public.pem).

torch and model-signing are imported inside the functions that need them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from tunegate import TunegateError, __version__
from tunegate.config import LOCAL_KEYS
from tunegate.core.console import console
from tunegate.core.io import atomic_write_bytes, atomic_write_json, atomic_write_text, clean_stale, publish_dir, staging_dir
from tunegate.core.paths import inside, project_relative
from tunegate.core.manifest import MANIFEST, Manifest, manifest_hash, sha256_file
from tunegate.evals.abstain import ABSTAIN_FILE, read_rule
from tunegate.run_chain import BUNDLED_STAGES, check_releasable, check_run, run_manifests

RELEASE = "release.json"
FILES = "files.json"
SIGNATURE = "model.sig"
PRIVATE_KEY = "private.pem"
PUBLIC_KEY = "public.pem"
DOC_NAMES = ("MODEL_CARD.md", "article25.md", "dpia.md")
# The stages whose manifests a bundle carries: the chain the adapter descends from, and the report on it. The
# release stage lists them as its upstream stages, so their manifests are its fingerprint.
# The values vLLM accepts for --max-lora-rank (vllm.config.LoRAConfig). An adapter whose rank is one of them is
# served at that rank as it is; any other rank is merged (the rule this project applies, see vllm_compatibility).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values
_INSTALL = 'pip install "model-signing>=1.1,<1.2" pyopenssl'


# ---------------------------------------------------------------------------------------------- keys


def generate_keys(out_dir: Path) -> tuple[Path, Path]:
    """Write a new elliptic-curve P-256 (secp256r1) key pair as PEM: `private.pem` (PKCS#8, unencrypted, mode
    0600) and `public.pem` (SubjectPublicKeyInfo) in `out_dir`.

    Returns:
        (private key path, public key path).

    Raises:
        TunegateError: either file exists already (nothing is overwritten or written).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out_dir = Path(out_dir)
    private, public = out_dir / PRIVATE_KEY, out_dir / PUBLIC_KEY
    existing = [str(p) for p in (private, public) if p.exists()]
    if existing:
        raise TunegateError(f"{', '.join(existing)}: key file exists; rule: keys are never overwritten (choose another --out)")
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # O_EXCL: never replace a key
    except FileExistsError:
        raise TunegateError(f"{private}: key file exists; rule: keys are never overwritten") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "wb") as f:
            f.write(private_pem)
            f.flush()
            os.fsync(f.fileno())
        with open(public, "xb") as f:
            f.write(public_pem)
    except BaseException:
        private.unlink(missing_ok=True)
        raise
    return private, public


def public_key_sha256(public_pem: bytes) -> str:
    """sha256 of a public key's PEM SubjectPublicKeyInfo: the key hint model-signing writes into model.sig."""
    import hashlib

    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(public_pem)
    raw = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(raw).hexdigest()


def public_pem_of(private_key: Path) -> bytes:
    """The PEM SubjectPublicKeyInfo of an elliptic-curve private key file.

    Raises:
        TunegateError: not an unencrypted PEM private key, or not an elliptic-curve key.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_private_key(Path(private_key).read_bytes(), None)
    except (ValueError, TypeError) as exc:
        raise TunegateError(f"{private_key}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TunegateError(f"{private_key}: not an elliptic-curve key; make one with `tunegate keys generate`")
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def project_keys(project) -> tuple[Path, Path]:
    """The project-local signing key pair, `<project root>/.tunegate/keys/private.pem` and `public.pem`, created
    on first use (`generate_keys`: P-256, private key mode 0600, never overwritten) together with a `.gitignore`
    there that ignores private.pem. Both paths are printed when the pair is created.

    Returns:
        (private key path, public key path).

    Raises:
        TunegateError: `.tunegate/keys` leads outside the project (a link), or one key of the pair exists without
            the other (nothing is overwritten; the message says which is missing).
    """
    folder = inside(project.root, project.root / LOCAL_KEYS, str(LOCAL_KEYS))
    private, public = folder / PRIVATE_KEY, folder / PUBLIC_KEY
    if private.is_file() and public.is_file():
        return private, public
    if private.exists() or public.exists():
        missing = public if private.exists() else private
        raise TunegateError(f"{missing}: missing, but its pair {private if missing == public else public} exists; rule: signing "
                            "keys are never overwritten (restore the file, or move both away to make a new pair)")
    generate_keys(folder)
    atomic_write_text(folder / ".gitignore", f"# tunegate: the private signing key never goes into git\n{PRIVATE_KEY}\n")
    console.print(f"- release: made the project's signing key pair: {private} (private, mode 0600, ignored by git) "
                  f"and {public} (public: `tunegate verify --key`, serve.public_key)", markup=False, highlight=False, soft_wrap=True)
    return private, public


def signing_public_sha256(project) -> str | None:
    """sha256 of the public part of the key the release stage signs with (`public_key_sha256`), read without
    creating anything (the release stage's fingerprint; `tunegate runs` takes it for every run): of `release.key`
    when set; of the project-local `.tunegate/keys/public.pem` when it exists (also without its private.pem, as
    after a clone); None with `release.sigstore`, or before the project-local pair is made (the release stage
    makes it before it is fingerprinted, so the run that makes it and the next one agree).

    Raises:
        TunegateError: release.key missing or not an EC private key; public.pem not a PEM public key; or
            `.tunegate/keys` leads outside the project.
    """
    r = project.release
    if r.sigstore:
        return None
    if r.key is not None:
        return public_key_sha256(public_pem_of(_configured_key(project)))
    public = inside(project.root, project.root / LOCAL_KEYS, str(LOCAL_KEYS)) / PUBLIC_KEY
    if not public.is_file():
        return None
    try:
        return public_key_sha256(public.read_bytes())
    except (ValueError, TypeError) as exc:
        raise TunegateError(f"{public}: not a PEM public key ({exc})") from None


def signing_key(project) -> Path | None:
    """The private key the release stage signs with: `release.key` when set, None with `release.sigstore`, else the
    project-local key (`project_keys`, created on first use). Raises TunegateError when release.key is missing."""
    r = project.release
    if r.sigstore:
        return None
    if r.key is not None:
        return _configured_key(project)
    return project_keys(project)[0]


def _configured_key(project) -> Path:
    """`release.key`; raises TunegateError naming the project file when it is not a file."""
    if not Path(project.release.key).is_file():
        raise TunegateError(f"{project.source_file}: release.key {project.release.key} not found (make one with `tunegate keys generate`)")
    return Path(project.release.key)


# The public part of `release.key`, written here when no public.pem of that key sits beside it (`public_key_for`).
RELEASE_KEY_PUBLIC = "release-key.pub.pem"


def public_key_for(project) -> Path | None:
    """The public key this project's bundles verify with: `serve.public_key` when set; else, with `release.key`,
    that key's public part: the `public.pem` beside it when it is that key's pair, else the public part written
    to `.tunegate/keys/release-key.pub.pem` (atomic, rewritten only when it changes); else the project-local
    `.tunegate/keys/public.pem` when it exists; else None. Never creates a key pair.

    Raises:
        TunegateError: release.key is set but missing or not an elliptic-curve private key, or `.tunegate/keys`
            leads outside the project.
    """
    if project.serve is not None and project.serve.public_key is not None:
        return Path(project.serve.public_key)
    if getattr(getattr(project, "release", None), "key", None) is not None:
        key = _configured_key(project)
        public_pem = public_pem_of(key)
        beside = Path(key).with_name(PUBLIC_KEY)
        if beside.is_file() and _same_public_key(beside.read_bytes(), public_pem):
            return beside
        out = inside(project.root, project.root / LOCAL_KEYS, str(LOCAL_KEYS)) / RELEASE_KEY_PUBLIC
        if not out.is_file() or out.read_bytes() != public_pem:
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out, public_pem)
        return out
    local = project.root / LOCAL_KEYS / PUBLIC_KEY
    return local if local.is_file() else None


def _same_public_key(pem: bytes, public_pem: bytes) -> bool:
    try:
        return public_key_sha256(pem) == public_key_sha256(public_pem)
    except (ValueError, TypeError):  # not a PEM public key: not the pair
        return False


def bundle_dir(run_dir: Path) -> Path:
    """Where the release stage puts a run's signed bundle: `runs/<id>/release/bundle/`."""
    return Path(run_dir) / "release" / "bundle"


# ---------------------------------------------------------------------------------------------- files


def list_files(root: Path, skip: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """Every entry below `root`, hidden ones included: (regular files, other entries such as symlinks), each as a
    sorted list of paths relative to `root` (posix). Paths in `skip` are left out."""
    files, other = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in dirnames:  # os.walk lists a symlink to a folder as a folder and does not enter it
            if (base / name).is_symlink():
                other.append((base / name).relative_to(root).as_posix())
        for name in filenames:
            p = base / name
            rel = p.relative_to(root).as_posix()
            if rel in skip:
                continue
            (files if p.is_file() and not p.is_symlink() else other).append(rel)
    return sorted(files), sorted(other)


def _require_files(directory: Path, action: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Case C24: model-signing signs and verifies a folder without files (an empty manifest); refuse it first."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TunegateError(f"{directory}: no such folder to {action}")
    files, _ = list_files(directory, skip)
    if not files:
        raise TunegateError(
            f"{directory}: no regular files to {action}; rule: an empty folder is never signed or verified "
            "(its signature would vouch for nothing)"
        )
    return files


def _hashing_config(signature_rel: str | None):
    from model_signing import hashing

    # Git files are signed like any other file: nothing in a bundle is exempt.
    return hashing.Config().set_ignored_paths(paths=[signature_rel] if signature_rel else [], ignore_git_paths=False)


def _import_model_signing():
    try:
        import model_signing.signing
        import model_signing.verifying
        import OpenSSL  # noqa: F401  model-signing needs pyOpenSSL without declaring it
    except ImportError as exc:
        raise TunegateError(f"signing needs model-signing and pyopenssl ({exc}); install them with: {_INSTALL}") from None
    import model_signing

    return model_signing


def _relative_inside(directory: Path, path: Path) -> str | None:
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(directory)).as_posix()
    except ValueError:
        return None


def sign_directory(directory: Path, signature: Path, private_key: Path | None = None, sigstore: bool = False) -> None:
    """Sign every regular file below `directory` into `signature` (a Sigstore bundle, JSON), with model-signing.

    Args:
        directory: the folder to sign; a `signature` inside it is left out of what is signed.
        signature: where the signature goes.
        private_key: PEM elliptic-curve private key (P-256/384/521), offline signing.
        sigstore: sign keyless through Sigstore instead (OIDC login in a browser; needs the network).

    Raises:
        TunegateError: the folder holds no regular file (case C24), no key given, the key is unusable, or
            model-signing/pyopenssl are not installed.
    """
    directory, signature = Path(directory), Path(signature)
    rel = _relative_inside(directory, signature)
    _require_files(directory, "sign", skip=(rel,) if rel else ())
    ms = _import_model_signing()
    config = ms.signing.Config().set_hashing_config(_hashing_config(rel))
    if sigstore:
        config.use_sigstore_signer()
    else:
        if private_key is None:
            raise TunegateError("no signing key: pass a PEM private key (`tunegate keys generate`) or use Sigstore")
        if not Path(private_key).is_file():
            raise TunegateError(f"{private_key}: private key not found (make one with `tunegate keys generate`)")
        public_pem_of(Path(private_key))
        try:
            config.use_elliptic_key_signer(private_key=Path(private_key))
        except ValueError as exc:
            raise TunegateError(f"{private_key}: {exc}") from None
    config.sign(directory, signature)


def verify_signature(directory: Path, signature: Path, public_key: Path | None = None,
                     sigstore_identity: str | None = None, sigstore_issuer: str | None = None) -> None:
    """Check `signature` (written by `sign_directory`) against the files below `directory`, with model-signing.

    Give `public_key` (PEM, the pair of the signing key) for a key signature, or `sigstore_identity` (the
    signer's e-mail or workload identity) and `sigstore_issuer` (the OIDC issuer URL) for a Sigstore one.

    Raises:
        TunegateError: the folder holds no regular file (case C24), the signature is missing, made by another
            key or identity, or does not match the files (the message names the files model-signing reports).
    """
    directory, signature = Path(directory), Path(signature)
    rel = _relative_inside(directory, signature)
    _require_files(directory, "verify", skip=(rel,) if rel else ())
    if not signature.is_file():
        raise TunegateError(f"{signature}: no signature; rule: an unsigned bundle is never trusted")
    ms = _import_model_signing()
    from cryptography.exceptions import InvalidSignature

    config = ms.verifying.Config().set_hashing_config(_hashing_config(rel))
    if sigstore_identity or sigstore_issuer:
        if not (sigstore_identity and sigstore_issuer):
            raise TunegateError("Sigstore verification needs both the signer identity and the OIDC issuer")
        config.use_sigstore_verifier(identity=sigstore_identity, oidc_issuer=sigstore_issuer)
        who = f"Sigstore identity {sigstore_identity} ({sigstore_issuer})"
    else:
        if public_key is None or not Path(public_key).is_file():
            raise TunegateError(f"{public_key}: public key not found")
        try:
            config.use_elliptic_key_verifier(public_key=Path(public_key))
        except (ValueError, TypeError) as exc:
            raise TunegateError(f"{public_key}: not a PEM elliptic-curve public key ({exc})") from None
        who = f"public key {public_key}"
    try:
        config.verify(directory, signature)
    except (ValueError, TypeError, KeyError, OSError, InvalidSignature) as exc:  # what model-signing raises
        msg = str(exc) or type(exc).__name__
        if msg.startswith("Signature mismatch"):  # the signature itself verified: its file list is authentic
            names = _diff_against_signed(directory, signature, rel)
            if names:
                msg = "files differ from the signed ones: " + "; ".join(names)
        raise TunegateError(f"{signature}: signature does not verify with {who}: {msg}") from None


def _diff_against_signed(directory: Path, signature: Path, signature_rel: str | None) -> list[str]:
    """Added, removed and changed files against the (path, sha256) list inside a model-signing signature.

    The signature is a Sigstore bundle whose DSSE envelope carries an in-toto statement; its predicate lists
    `resources` [{name, digest, algorithm}] (OpenSSF model signing, file serialization). Read only after
    model-signing has checked the envelope's signature. Returns [] when the list cannot be read.
    """
    import base64

    try:
        envelope = json.loads(signature.read_text(encoding="utf-8"))["dsseEnvelope"]
        statement = json.loads(base64.b64decode(envelope["payload"]))
        signed = {r["name"]: r["digest"] for r in statement["predicate"]["resources"] if r.get("algorithm") == "sha256"}
    except (OSError, ValueError, KeyError, TypeError):
        return []
    files, _ = list_files(directory, skip=(signature_rel,) if signature_rel else ())
    out = []
    added = sorted(set(files) - set(signed))
    removed = sorted(set(signed) - set(files))
    changed = sorted(f for f in set(files) & set(signed) if sha256_file(directory / f) != signed[f])
    for label, names in (("added", added), ("removed", removed), ("changed", changed)):
        if names:
            out.append(f"{label}: {', '.join(names)}")
    return out


# ---------------------------------------------------------------------------------------------- vLLM fit


def vllm_compatibility(adapter_config: dict[str, Any]) -> tuple[bool, list[str]]:
    """Whether vLLM can serve a PEFT adapter as a LoRA (`--enable-lora --lora-modules`), and why not.

    vLLM refuses DoRA magnitude vectors, `modules_to_save`, trained token rows (`trainable_token_indices`, written
    for `train.added_tokens`), trained biases (`bias` other than "none",
    `lora_bias`), and ranks above its largest --max-lora-rank value (VLLM_LORA_RANKS; docs/design.md#vllm).
    A rank between the allowed values (e.g. 24) is served: the server's --max-lora-rank is the smallest
    allowed value at or above the largest rank it registers (case C14, `max_lora_rank_for`).

    Args:
        adapter_config: the adapter's adapter_config.json as a dict.

    Returns:
        (servable as a LoRA, reasons it is not: one sentence each; empty when servable).
    """
    reasons = []
    if adapter_config.get("use_dora"):
        reasons.append("DoRA: vLLM does not load magnitude vectors (lora_magnitude_vector)")
    if adapter_config.get("modules_to_save"):
        reasons.append(f"modules_to_save {sorted(adapter_config['modules_to_save'])}: vLLM loads LoRA matrices only")
    if adapter_config.get("trainable_token_indices"):
        reasons.append("added tokens (train.added_tokens: trainable_token_indices): vLLM loads LoRA matrices only, "
                       "not an adapter's embedding rows")
    if adapter_config.get("bias", "none") != "none" or adapter_config.get("lora_bias"):
        reasons.append(f"trained biases (bias: {adapter_config.get('bias')}, lora_bias: {bool(adapter_config.get('lora_bias'))}): vLLM loads no LoRA biases")
    ranks = {adapter_config.get("r")} | set((adapter_config.get("rank_pattern") or {}).values())
    bad = sorted(r for r in ranks if r is not None and r > max(VLLM_LORA_RANKS))
    if bad:
        reasons.append(f"rank {', '.join(map(str, bad))} is above vLLM's largest --max-lora-rank ({max(VLLM_LORA_RANKS)})")
    if adapter_config.get("peft_type", "LORA") != "LORA":
        reasons.append(f"peft_type {adapter_config.get('peft_type')}: vLLM serves LoRA adapters only")
    return not reasons, reasons


def max_lora_rank_for(ranks: list[int]) -> int:
    """vLLM's --max-lora-rank for adapters of these ranks: the smallest allowed value >= the largest (case C14).

    Raises:
        ValueError: a rank above the largest allowed value (such an adapter is released merged instead).
    """
    top = max(ranks)
    for allowed in VLLM_LORA_RANKS:
        if allowed >= top:
            return allowed
    raise ValueError(f"rank {top} is above vLLM's largest --max-lora-rank ({max(VLLM_LORA_RANKS)})")


# ---------------------------------------------------------------------------------------------- build


def _classify_head(adapter_dir: Path) -> dict[str, Any] | None:
    """A classify run's head file (tunegate.recipes.classify.CLASSIFY_FILE), or None for a generation adapter."""
    from tunegate.recipes.classify import is_classifier, read_head

    return read_head(adapter_dir) if is_classifier(adapter_dir) else None


def _copy_recorded(src_stage: Path, manifest: Manifest, rel: str, dest: Path) -> None:
    """Copy one output of a stage and check the copy against the sha256 its manifest recorded."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src_stage / rel, dest)
    if sha256_file(dest) != manifest.outputs[rel]:
        raise TunegateError(f"{src_stage / rel}: changed since the {manifest.stage} manifest was written; nothing was released")


def _release_docs(run_dir: Path, project, merged: str | None, gguf: dict[str, Any] | None) -> dict[str, str]:
    try:
        from tunegate.report.release_docs import render_release_docs
    except ImportError:
        console.print("[yellow]- release: tunegate.report.release_docs is not installed; "
                      f"{', '.join(DOC_NAMES)} not written[/yellow]")
        return {}
    # the card points at merged/ and lists gguf/ when the bundle has them
    docs = render_release_docs(run_dir, project, merged=merged, **({"gguf": gguf} if gguf else {}))
    bad = [name for name in docs if name not in DOC_NAMES]
    if bad:
        raise TunegateError(f"release docs: unexpected file names {bad}; expected {', '.join(DOC_NAMES)}")
    return docs


def base_model_sha256(base_model: str) -> str | None:
    """sha256 of a local or embedded base model's weights: of its one `*.safetensors` (else `*.bin`) file, or, for
    several shards, of the lines `<sha256>  <file name>` (sorted by name; what `sha256sum` prints). None for a hub id
    (its files are not on this machine by a path) or a folder without weight files."""
    import hashlib

    from tunegate.models import EMBEDDED, resolve_base_model

    if base_model not in EMBEDDED and not Path(base_model).expanduser().is_dir():
        return None
    folder = Path(resolve_base_model(base_model, progress=False))
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if len(weights) == 1:
        return sha256_file(weights[0])
    lines = "".join(f"{sha256_file(w)}  {w.name}\n" for w in weights)
    return hashlib.sha256(lines.encode()).hexdigest() if weights else None


def build_bundle(project, run_id: str = "default", private_key: Path | None = None, out_dir: Path | None = None,
                 merge: bool = True, sigstore: bool = False, force: bool = False,
                 stages: Sequence[str] = BUNDLED_STAGES) -> Path:
    """Build and sign the release bundle of a PASSed run in `out_dir` (`tunegate release --out`; layout in the
    module docstring). It appears whole, signed, or not at all: built in a staging sibling (core.io.staging_dir)
    and swapped into place (core.io.publish_dir). The run's own bundle is the release stage's (`bundle_dir`).

    Args:
        project: the loaded project (`tunegate.config.load_project`).
        run_id: the run under `runs/`.
        private_key: PEM elliptic-curve private key (`tunegate keys generate`); not used with `sigstore`.
        out_dir: the bundle folder (default `bundle_dir(run folder)`, without the release stage's manifest).
        merge: when vLLM cannot serve the adapter as a LoRA, put the merged model in merged/ (False: record
            why not, merge nothing).
        sigstore: sign keyless through Sigstore (needs the network and an OIDC login) instead of a key.
        force: replace an existing bundle at `out_dir` (the old one is kept until the new one is complete), or a
            bundle an earlier tunegate set aside (`.NAME.old-PID`) while `out_dir` is missing.
        stages: the stages whose manifests go into manifests/ (those finished; train and eval must be).

    Returns:
        The bundle folder.

    Raises:
        TunegateError: as `write_bundle`; the bundle exists (without `force`), or an earlier tunegate's set-aside
            bundle is there while `out_dir` is missing (without `force`).
    """
    run_dir = project.run_dir(run_id)
    if not run_dir.is_dir():
        raise TunegateError(f"{run_dir}: no such run (run `tunegate run` first)")
    out = Path(out_dir) if out_dir is not None else bundle_dir(run_dir)
    notes: list[str] = []
    clean_stale(out, say=notes.append)  # what a killed release left beside the bundle (core.io); never restores one
    if notes and not force:  # an earlier tunegate's set-aside bundle, and none in place: the user decides
        raise TunegateError(f"{notes[0]}; or pass --force to build a new bundle")
    for note in notes:
        console.print(f"- release: {note}", style="yellow", markup=False, highlight=False)
    if out.exists() and not force:
        raise TunegateError(f"{out}: a release bundle exists; pass --force to replace it, or --out for another folder")
    check_releasable(run_dir, stages)  # before anything is written beside `out`
    tmp = staging_dir(out)
    try:
        write_bundle(project, run_dir, tmp, private_key=private_key, merge=merge, sigstore=sigstore, stages=stages)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_bundle(project, run_dir: Path, dest: Path, *, private_key: Path | None = None, merge: bool = True,
                 sigstore: bool = False, stages: Sequence[str] = BUNDLED_STAGES) -> dict[str, Any]:
    """Write and sign the release bundle of the PASSed run in `run_dir` into the folder `dest` (created; it must
    be new or empty). The caller swaps `dest` into place: the release stage writes it inside its partial folder.

    Args:
        project: the loaded project.
        run_dir: the run folder (`runs/<id>`); its name is the run id release.json records.
        dest: where the bundle's files go.
        private_key, merge, sigstore: as `build_bundle`.
        stages: the stages whose manifests go into manifests/ (those finished; train and eval must be).

    Returns:
        release.json's contents.

    Raises:
        TunegateError: no finished train/eval stage, verdict not PASS (the message names it and the failing
            rules), stages from different chains, the adapter changed since training, an empty adapter (C24),
            no key or an unusable one, or the merge check failed (tunegate.export).
    """
    from tunegate.models import VOCAB_RECORD

    run_dir, tmp = Path(run_dir), Path(dest)
    run_id = run_dir.name
    if not sigstore:
        if private_key is None:
            raise TunegateError("no signing key: pass --key PRIVATE.pem (make one with `tunegate keys generate`) or --sigstore")
        if not Path(private_key).is_file():
            raise TunegateError(f"{private_key}: private key not found (make one with `tunegate keys generate`)")
        public_pem = public_pem_of(Path(private_key))
    manifests = run_manifests(run_dir, stages)
    check_run(run_dir, manifests)
    _import_model_signing()
    tmp.mkdir(parents=True, exist_ok=True)
    if any(tmp.iterdir()):
        raise TunegateError(f"{tmp}: not empty; a bundle is written into a new folder")

    train, ev = manifests["train"], manifests["eval"]
    full = any(r.startswith("model/") for r in train.outputs)
    classify = _classify_head(run_dir / "train" / "adapter")
    # The weights as trained (full fine-tune: the whole model goes to merged/).
    for rel in sorted(r for r in train.outputs if r.startswith(("adapter/", "model/"))):
        dest_file = tmp / ("merged/" + rel[len("model/"):] if full else rel)
        _copy_recorded(run_dir / "train", train, rel, dest_file)
    if not full:
        _require_files(tmp / "adapter", "sign")
    for stage in manifests:
        (tmp / "manifests").mkdir(exist_ok=True)
        shutil.copyfile(run_dir / stage / MANIFEST, tmp / "manifests" / f"{stage}.json")
        if manifest_hash(run_dir / stage) != sha256_file(tmp / "manifests" / f"{stage}.json"):
            raise TunegateError(f"{run_dir / stage / MANIFEST}: changed while the release was built")
    for name in ("verdict.json", "scores.json", "eval.html", ABSTAIN_FILE):
        if name in ev.outputs:
            _copy_recorded(run_dir / "eval", ev, name, tmp / "eval" / name)
    for name in ("verdict.json", "scores.json"):
        if not (tmp / "eval" / name).is_file():
            raise TunegateError(f"{run_dir / 'eval' / MANIFEST}: records no {name}; rerun `tunegate eval`")
    if "report" in manifests and "report.md" in manifests["report"].outputs:
        _copy_recorded(run_dir / "report", manifests["report"], "report.md", tmp / "report" / "report.md")

    abstain = read_rule(tmp / "eval")  # eval.abstain: the threshold the gate measured; the embedded server applies it
    trained_on = train.config.get("base_model", project.base_model)
    if full:
        adapter_cfg: dict[str, Any] = {}
        servable, reasons, merged = False, ["full fine-tune: a whole model, served from merged/ as a base model"], "merged/"
    else:
        adapter_cfg = json.loads((tmp / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
        servable, reasons = vllm_compatibility(adapter_cfg)
        merged = None
        if classify is not None:  # not merged: tunegate.export checks merges of generation adapters only
            reasons.append("a classification head (train.method classify): vLLM's LoRA adapters are for generation; "
                           "the bundle is served by the embedded engine (`tunegate serve`), not merged")
            console.print(f"[dim]- release: classification head: not merged (release.merge does not apply); {reasons[-1]}[/dim]")
        elif abstain is not None:  # vLLM refuses it (tunegate.serve.vllm): a merged copy would serve without the threshold
            servable = False
            reasons.append(f"eval.abstain: answers under a confidence of {abstain['threshold']:g} become "
                           f"{abstain['abstain_label']!r}; vLLM cannot apply that threshold, the embedded engine does")
            console.print(f"[dim]- release: not merged; {reasons[-1]}[/dim]")
        elif not servable and merge:
            from tunegate.export import merge_run

            console.print(f"[dim]- release: vLLM cannot serve this adapter as a LoRA ({'; '.join(reasons)}); merging[/dim]")
            with console.status("release: merging the adapter into the base model and checking the merge in fp32"):
                merge_run(project, run_dir, tmp / "merged")
            merged = "merged/"
        elif not servable:
            console.print(f"[yellow]- release: no merge: vLLM cannot serve this adapter as a LoRA ({'; '.join(reasons)})[/yellow]")

    gguf = None
    if project.release.gguf is not None:  # GGUF files, each through its parity gate (tunegate.gguf_export)
        from tunegate.gguf_export import release_gguf

        gguf = release_gguf(project, run_dir, tmp, merged=tmp / "merged" if merged else None)

    for name, text in _release_docs(run_dir, project, merged, gguf).items():
        (tmp / name).write_text(text, encoding="utf-8")

    train_cfg = train.config.get("train", {})
    weights_rel = "adapter/adapter_model.safetensors"
    # The eos ids the bundle's generation_config.json lists (eos and end of turn; models.write_stop_tokens):
    # what any engine serving the bundle must stop at. None for a run trained before they were written.
    gen_cfg = next((tmp / d / "generation_config.json" for d in ("merged", "adapter")
                    if (tmp / d / "generation_config.json").is_file()), None)
    stop_ids = json.loads(gen_cfg.read_text(encoding="utf-8")).get("eos_token_id") if gen_cfg else None
    # The vocabulary it trained with (train.added_tokens and the embedding rows they need); None: not recorded
    vocab_file = next((tmp / d / VOCAB_RECORD for d in ("adapter", "merged") if (tmp / d / VOCAB_RECORD).is_file()), None)
    vocab = json.loads(vocab_file.read_text(encoding="utf-8")) if vocab_file else {}
    data = manifests.get("data")
    release = {
        "project": project.name,
        "run_id": run_id,
        "base_model": project_relative(trained_on, project.root),
        "base_model_sha256": base_model_sha256(trained_on),
        # what the data stage read (sources, golden set, ...): project-relative path -> sha256
        "sources": {project_relative(p, project.root): digest for p, digest in sorted(data.inputs.items())} if data else {},
        "method": train_cfg.get("method"),
        "adapter_type": "full" if full else ("dora" if adapter_cfg.get("use_dora") else "lora"),
        "lora_rank": adapter_cfg.get("r"),
        "lora_alpha": adapter_cfg.get("lora_alpha"),
        "target_modules": sorted(adapter_cfg["target_modules"]) if isinstance(adapter_cfg.get("target_modules"), list) else adapter_cfg.get("target_modules"),
        "modules_to_save": adapter_cfg.get("modules_to_save"),
        # train.method classify: the head's labels and abstention (adapter/tunegate_classify.json); None otherwise
        "classify": classify,
        # eval.abstain: the generating candidate's abstention rule (eval/abstain.json); None otherwise
        "abstain": abstain,
        "stop_token_ids": [stop_ids] if isinstance(stop_ids, int) else stop_ids,
        "vocab_size": vocab.get("vocab_size"),  # embedding rows: the base model's plus the added tokens'
        "added_tokens": vocab.get("added_tokens", {}),  # train.added_tokens -> token id
        "adapter_sha256": train.outputs.get(weights_rel) if not full else train.outputs.get("model/model.safetensors"),
        "verdict": "PASS",
        "scores": json.loads((tmp / "eval" / "scores.json").read_text(encoding="utf-8")),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "tunegate_version": __version__,
        "vllm": {"servable_as_lora": servable, "reasons": reasons, "merged": merged},
        # GGUF files (release.gguf): each passed its parity gate; gguf/verdict.json holds the rules
        "gguf": {t: {k: f[k] for k in ("file", "bytes", "sha256", "verdict")} for t, f in gguf["types"].items()} if gguf else None,
        "signing": {"method": "sigstore" if sigstore else "ec-key",
                    "public_key_sha256": None if sigstore else public_key_sha256(public_pem),
                    "spec": "OpenSSF model signing (model-signing 1.1)"},
    }
    atomic_write_json(tmp / RELEASE, release)
    files, other = list_files(tmp)
    if other:
        raise TunegateError(f"{tmp}: not regular files (links?) in the bundle: {', '.join(other)}")
    atomic_write_json(tmp / FILES, {rel: sha256_file(tmp / rel) for rel in files})
    sign_directory(tmp, tmp / SIGNATURE, private_key=private_key, sigstore=sigstore)
    if not sigstore:  # read it back before publishing: a bundle that does not verify is never renamed into place
        with tempfile.TemporaryDirectory() as keydir:
            (Path(keydir) / PUBLIC_KEY).write_bytes(public_pem)
            verify_bundle(tmp, Path(keydir) / PUBLIC_KEY)
    console.print(f"[green]- release: signed bundle[/green] (vLLM as LoRA: {servable}"
                  + ("; merged model in merged/" if merged else "") + ")")
    return release


# ---------------------------------------------------------------------------------------------- verify


def _check_files(bundle: Path) -> list[str]:
    """Every file against files.json: one line per added, removed or changed file, and per non-regular entry."""
    problems = []
    try:
        recorded = json.loads((bundle / FILES).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{FILES}: missing or unreadable ({exc})"]
    files, other = list_files(bundle, skip=(FILES, SIGNATURE))
    actual = set(files)
    added = sorted(actual - set(recorded))
    removed = sorted(set(recorded) - actual)
    changed = sorted(rel for rel in actual & set(recorded) if sha256_file(bundle / rel) != recorded[rel])
    if added:
        problems.append(f"added: {', '.join(added)}")
    if removed:
        problems.append(f"removed: {', '.join(removed)}")
    if changed:
        problems.append(f"changed: {', '.join(changed)}")
    if other:
        problems.append(f"not regular files (links?): {', '.join(other)}")
    return problems


def _in_bundle(stage: str, rel: str, full: bool) -> str | None:
    """Where a stage's recorded output lives in the bundle (None: not part of a bundle)."""
    if stage == "train" and rel.startswith("adapter/") and not full:
        return rel
    if stage == "train" and rel.startswith("model/") and full:
        return "merged/" + rel[len("model/"):]
    if stage == "eval" and rel in ("verdict.json", "scores.json", "eval.html"):
        return f"eval/{rel}"
    if stage == "report" and rel == "report.md":
        return "report/report.md"
    return None


def _check_chain(bundle: Path, release: dict[str, Any]) -> list[str]:
    """Each manifest's recorded output hashes against the bundle's copies where present, the upstream links
    between the manifests, and release.json's verdict and adapter sha256 against them."""
    problems, manifests = [], {}
    full = release.get("adapter_type") == "full"
    for p in sorted((bundle / "manifests").glob("*.json")):
        try:
            manifests[p.stem] = Manifest.model_validate_json(p.read_text(encoding="utf-8"))
        except ValueError as exc:
            problems.append(f"manifests/{p.name}: not a stage manifest ({str(exc).splitlines()[0]})")
    for stage in ("train", "eval"):
        if stage not in manifests:
            problems.append(f"manifests/{stage}.json: missing")
    for stage, m in manifests.items():
        for up, digest in m.upstream.items():
            p = bundle / "manifests" / f"{up}.json"
            if not p.is_file():
                problems.append(f"manifests/{up}.json: missing, but manifests/{stage}.json lists it upstream")
            elif sha256_file(p) != digest:
                problems.append(f"manifests/{up}.json: sha256 differs from the one manifests/{stage}.json records")
        for rel, digest in m.outputs.items():
            target = _in_bundle(stage, rel, full)
            if target is not None and (bundle / target).is_file() and sha256_file(bundle / target) != digest:
                problems.append(f"{target}: sha256 differs from the one manifests/{stage}.json records")
    required = ["eval/verdict.json", "eval/scores.json"] + ([] if full else ["adapter/adapter_model.safetensors"])
    problems += [f"{rel}: missing" for rel in required if not (bundle / rel).is_file()]
    if full and not list((bundle / "merged").glob("*.safetensors")):
        problems.append("merged/: no model weights (*.safetensors) for a full fine-tune")
    ev, train = manifests.get("eval"), manifests.get("train")
    if ev is not None and ev.verdict != "PASS":
        problems.append(f"manifests/eval.json: verdict {ev.verdict}, not PASS")
    if release.get("verdict") != "PASS":
        problems.append(f"{RELEASE}: verdict {release.get('verdict')}, not PASS")
    if train is not None:
        recorded = train.outputs.get("model/model.safetensors" if full else "adapter/adapter_model.safetensors")
        if release.get("adapter_sha256") != recorded:
            problems.append(f"{RELEASE}: adapter_sha256 differs from the one manifests/train.json records")
    problems += _check_gguf(bundle, release)
    check = bundle / "merged" / "merge_check.json"
    if check.is_file() and not full:
        try:
            merged_from = json.loads(check.read_text(encoding="utf-8")).get("adapter_sha256", {})
        except ValueError:
            merged_from = {}
            problems.append("merged/merge_check.json: unreadable")
        for name, digest in merged_from.items():
            if (bundle / "adapter" / name).is_file() and sha256_file(bundle / "adapter" / name) != digest:
                problems.append(f"merged/merge_check.json: merged from another adapter/{name} than the bundle's")
    return problems


def _check_gguf(bundle: Path, release: dict[str, Any]) -> list[str]:
    """gguf/ (release.gguf): its verdict.json says PASS for every file, names the files release.json lists, and
    each file has the sha256 the parity gate measured."""
    listed, verdict_path = release.get("gguf") or {}, bundle / "gguf" / "verdict.json"
    if not listed and not verdict_path.exists():
        return []
    try:
        verdict = json.loads(verdict_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ["gguf/verdict.json: missing or unreadable"]
    problems = [] if verdict.get("verdict") == "PASS" else [f"gguf/verdict.json: parity verdict {verdict.get('verdict')}, not PASS"]
    gated = verdict.get("types") or {}
    if sorted(gated) != sorted(listed):
        problems.append(f"gguf/verdict.json: types {sorted(gated)}, release.json lists {sorted(listed)}")
    for t, f in gated.items():
        path = bundle / "gguf" / str(f.get("file", ""))
        if not path.is_file() or path.parent != bundle / "gguf":
            problems.append(f"gguf/{f.get('file')}: missing")
        elif sha256_file(path) != f.get("sha256") or (listed.get(t) or {}).get("sha256") != f.get("sha256"):
            problems.append(f"gguf/{f.get('file')}: sha256 differs from the one its parity gate measured")
    return problems


def verify_bundle(bundle_dir: Path, public_key: Path | None = None, *, sigstore_identity: str | None = None,
                  sigstore_issuer: str | None = None) -> dict[str, Any]:
    """Verify a release bundle: the model-signing signature (model.sig), every file against files.json, and the
    manifest chain (each stage manifest's recorded output hashes against the bundle's files, the upstream
    links between manifests, release.json's verdict and adapter sha256).

    Args:
        bundle_dir: the bundle folder (`build_bundle`'s output).
        public_key: PEM public key of the signing key pair; or, for a Sigstore-signed bundle, give
            `sigstore_identity` and `sigstore_issuer` instead (needs the network for the trust root).

    Returns:
        release.json's contents.

    Raises:
        TunegateError: an empty bundle (C24), an unsigned bundle, a wrong key, or tampering; the message names
            every added, removed or changed file and every broken link of the chain.
    """
    bundle = Path(bundle_dir)
    _require_files(bundle, "verify", skip=(SIGNATURE,))
    if not (bundle / SIGNATURE).is_file():
        raise TunegateError(f"{bundle / SIGNATURE}: not found; rule: an unsigned bundle is never trusted")
    problems = _check_files(bundle)
    try:
        verify_signature(bundle, bundle / SIGNATURE, public_key, sigstore_identity, sigstore_issuer)
    except TunegateError as exc:
        problems.append(str(exc))
    release: dict[str, Any] = {}
    try:
        release = json.loads((bundle / RELEASE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problems.append(f"{RELEASE}: missing or unreadable ({exc})")
    if release:
        problems += _check_chain(bundle, release)
    if problems:
        raise TunegateError(f"{bundle}: release bundle does not verify:\n  " + "\n  ".join(dict.fromkeys(problems)))
    return release
