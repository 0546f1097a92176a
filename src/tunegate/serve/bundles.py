"""Which release bundles a server may load, checked once for both engines.

An adapter is served only from a release bundle (tunegate.release) whose signature verifies with
`serve.public_key`, whose release.json verdict is PASS and which was trained on this server's base model. Each
bundle is copied to a private folder and verified there (`copy_verified`), and the engine loads that copy: the
bytes that were verified are the bytes that are loaded. At start-up every configured bundle is checked before
a model loads (`verify_bundles`), and one refusal stops the server, listing every refused bundle with its reason.
"""

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunegate import TunegateError
from tunegate.core.paths import check_identifier


@dataclass
class ServedAdapter:
    """An adapter an engine serves: its model name, the bundle folder it came from, and that bundle's release.json.

    A registry version (tunegate.serve.production) is loaded once under its `slot` (the engine's own adapter name,
    `NAME-vN`) and may be served under several public names; `version` is the label responses and traces carry.
    A bundle of serve.bundles is loaded under its own name: slot and version None mean `name`.
    """

    name: str
    bundle: Path
    release: dict[str, Any]
    slot: str | None = None
    version: str | None = None

    @property
    def engine_name(self) -> str:
        """The adapter's name inside the engine (PEFT adapter name, vLLM LoRA name)."""
        return self.slot or self.name

    @property
    def label(self) -> str:
        """What answered, for the response header and the trace: `NAME-vN`, or the bundle's name."""
        return self.version or self.name


def bundle_name(b) -> str:
    """A configured bundle's (config.BundleConfig) adapter name: its `name`, else the bundle folder's name.

    Raises TunegateError when that name is not an identifier (core.paths): it names the bundle's verified copy.
    """
    return check_identifier("adapter name", b.name or Path(b.path).name)


def base_model_name(project) -> str:
    """The base model's name in the API: the configured name, or a local folder's name."""
    name = project.base_model
    if name.startswith((".", "/", "~")) or Path(name).expanduser().is_dir():
        return Path(name).expanduser().resolve().name
    return name


def _same_base(recorded: Any, project) -> bool:
    """Whether release.json's `base_model` is the base model this server serves: the same name, or the same folder.
    A relative recorded path is read against the project folder (release.json names a folder inside the project
    relative to it, core.paths.project_relative); the project's own `base_model` as the model loader reads it
    (the current folder) or against the project folder."""
    if not recorded:
        return False
    if str(recorded) == project.base_model:
        return True
    root = Path(project.root)
    try:
        a = _existing(Path(str(recorded)).expanduser(), root)
        mine = Path(project.base_model).expanduser()
        return a is not None and any(b.exists() and a == b.resolve() for b in (mine, root / mine))
    except OSError:
        return False


def _existing(path: Path, root: Path) -> Path | None:
    full = path if path.is_absolute() else root / path
    return full.resolve() if full.exists() else None


def check_bundle(bundle_dir: Path, public_key: Path | None, project) -> dict[str, Any]:
    """Why a bundle may not be served, as a TunegateError; its release.json when it may.

    Refused: no public key configured; no bundle folder, release.json or adapter; no model.sig (unsigned);
    a signature that does not verify or a changed file (tunegate.release.verify_bundle names it); a verdict
    other than PASS (ungated); an adapter trained on another base model.
    """
    bundle_dir = Path(bundle_dir)
    if public_key is None:
        raise TunegateError(f"{bundle_dir}: refused: serve.public_key is not set, and unsigned adapters are never served")
    if not Path(public_key).is_file():
        raise TunegateError(f"{bundle_dir}: refused: serve.public_key {public_key} not found")
    if not bundle_dir.is_dir():
        raise TunegateError(f"{bundle_dir}: refused: no such bundle folder")
    if not (bundle_dir / "release.json").is_file():
        raise TunegateError(f"{bundle_dir}: refused: no release.json (not a release bundle; make one with the release stage)")
    if not (bundle_dir / "model.sig").is_file():
        raise TunegateError(f"{bundle_dir}: refused: unsigned (no model.sig)")
    if not (bundle_dir / "adapter" / "adapter_config.json").is_file():
        raise TunegateError(f"{bundle_dir}: refused: no adapter/adapter_config.json in the bundle")
    from tunegate.release import verify_bundle

    try:
        release = verify_bundle(bundle_dir, Path(public_key))
    except TunegateError as exc:
        raise TunegateError(f"{bundle_dir}: refused: signature check failed: {exc}") from None
    verdict = release.get("verdict")
    if verdict != "PASS":
        raise TunegateError(f"{bundle_dir}: refused: ungated: release.json verdict is {verdict!r}, not PASS")
    if not _same_base(release.get("base_model"), project):
        raise TunegateError(f"{bundle_dir}: refused: the adapter was trained on base model {release.get('base_model')!r}, "
                            f"this server serves {project.base_model!r}")
    return release


def copy_verified(bundle: Path, copy: Path, public_key: Path | None, project) -> dict[str, Any]:
    """Copy the bundle folder `bundle` to `copy` (a new folder; a link stays a link) and verify the copy.

    Returns:
        The bundle's release.json (`check_bundle` on the copy).

    Raises:
        TunegateError: no such folder, or the copy is refused; the message names `bundle`, not the private copy.
    """
    try:
        if not Path(bundle).is_dir():
            raise TunegateError(f"{bundle}: refused: no such bundle folder")
        shutil.copytree(bundle, copy, symlinks=True)
        return check_bundle(copy, public_key, project)
    except TunegateError as exc:
        raise TunegateError(str(exc).replace(str(copy), str(bundle))) from None


def verify_bundles(project, bundles: list, public_key: Path | None, into: Path) -> dict[str, ServedAdapter]:
    """Check the names of the configured bundles (config.BundleConfig), then copy each to `into`/NAME and verify it.

    Every bundle is checked before the caller loads a model: fail fast, with every refusal at once.

    Returns:
        adapter name -> ServedAdapter (`bundle` the configured folder), in the order given; each verified copy is
        the folder `into`/NAME.

    Raises:
        TunegateError: two bundles share a name, a bundle is named like the base model, or bundles are refused
            (one line per refused bundle, naming its configured folder and the reason).
    """
    names = [bundle_name(b) for b in bundles]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TunegateError(f"serve.bundles: adapter name(s) {', '.join(dup)} used twice; give each bundle a `name`")
    base_name = base_model_name(project)
    if base_name in names:
        raise TunegateError(f"serve.bundles: adapter name {base_name} is the base model's name; give the bundle another `name`")
    verified: dict[str, ServedAdapter] = {}
    problems = []
    for b, name in zip(bundles, names, strict=True):
        try:
            verified[name] = ServedAdapter(name, Path(b.path), copy_verified(Path(b.path), Path(into) / name, public_key, project))
        except TunegateError as exc:
            problems.append(str(exc))
    if problems:
        raise TunegateError("\n".join(problems))
    return verified
