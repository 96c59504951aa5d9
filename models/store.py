"""The BentoML model store: import exported artifacts, list them, find their files.

Only ``model.onnx`` and ``model.json`` are stored (no pickled objects); the ONNX sha256 is checked
against the card on import and again whenever a model is loaded.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from cellexplain.models.card import CARD_FILE, ONNX_FILE, ModelCard, sha256_file
from cellexplain.models.errors import StoreError

#: label that marks our models in a shared BentoML store
FRAMEWORK_LABEL = "cellexplain"
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")


def check_name(name: str) -> str:
    """Model names are BentoML tag names: lowercase letters, digits, ``-``, ``_``, ``.``."""
    if not NAME_RE.match(name):
        raise StoreError(
            f"invalid model name {name!r}: use 1-63 lowercase letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return name


def verify_artifact(directory: str | Path) -> ModelCard:
    """Read the card of an artifact folder and check the ONNX file's sha256 against it."""
    d = Path(directory)
    for f in (ONNX_FILE, CARD_FILE):
        if not (d / f).is_file():
            raise StoreError(f"{d} is not a model artifact: {f} is missing")
    card = ModelCard.read(d)
    digest = sha256_file(d / ONNX_FILE)
    if digest != card.onnx.sha256:
        raise StoreError(
            f"{d / ONNX_FILE} has sha256 {digest} but the card says {card.onnx.sha256}"
        )
    return card


def content_version(directory: str | Path) -> str:
    """The store version of an artifact folder: the first 16 hex digits of the sha256 of its
    graph and card. The same files get the same version on every machine, so a deployment can
    name the exact model it serves (``pbmc-programs:<version>``) before the store holds it."""
    h = hashlib.sha256()
    for f in (ONNX_FILE, CARD_FILE):
        h.update(hashlib.sha256((Path(directory) / f).read_bytes()).digest())
    return h.hexdigest()[:16]


def import_model(directory: str | Path, name: str | None = None, replace: bool = False) -> str:
    """Save an artifact folder into the BentoML model store; returns the tag ``name:version``
    (the version is :func:`content_version`: importing the same files again changes nothing).

    A new version of a name the store holds becomes that name's ``latest``, the tag a server
    given ``NAME`` serves: only with ``replace`` (the other versions stay).

    Raises:
        StoreError: the name holds other versions and ``replace`` is false.
    """
    card = verify_artifact(directory)
    model_name = check_name(name or card.name)
    import bentoml  # the `serve` extra (checking a name needs none)

    tag = f"{model_name}:{content_version(directory)}"
    try:
        return str(bentoml.models.get(tag).tag)  # these very files are stored already
    except bentoml.exceptions.NotFound:
        pass
    try:
        held = [str(m.tag) for m in bentoml.models.list(model_name)]
    except bentoml.exceptions.NotFound:  # a name the store has never held
        held = []
    if held and not replace:
        raise StoreError(
            f"the store already holds {model_name} ({len(held)} version(s), latest "
            f"{bentoml.models.get(model_name).tag}): this model would become {model_name}:latest,"
            f" the tag a server given {model_name!r} serves. Pass --force to add it as the "
            "latest version (the others stay), or choose another --name"
        )
    with bentoml.models.create(
        tag,
        labels={"framework": FRAMEWORK_LABEL, "arch": card.architecture.kind},
        metadata={
            "card_version": card.version,
            "n_genes": len(card.genes),
            "n_classes": len(card.classes),
            "attribution": card.attribution.method,
            "origin": card.origin.kind if card.origin is not None else "trained",
            "onnx_sha256": card.onnx.sha256,
            **(
                {"test_macro_f1": round(card.metrics.model.macro_f1, 4)}
                if card.metrics is not None
                else {}
            ),
        },
    ) as bento_model:
        for f in (ONNX_FILE, CARD_FILE):
            shutil.copyfile(Path(directory) / f, Path(bento_model.path) / f)
    return str(bento_model.tag)


@dataclass(frozen=True)
class StoredModel:
    tag: str
    path: Path
    card: ModelCard


def list_models() -> list[StoredModel]:
    """cellexplain models in the store, newest first."""
    found = []
    import bentoml

    for m in bentoml.models.list():
        if m.info.labels.get("framework") != FRAMEWORK_LABEL:
            continue
        found.append(
            (m.creation_time, StoredModel(str(m.tag), Path(m.path), ModelCard.read(m.path)))
        )
    return [s for _, s in sorted(found, key=lambda p: p[0], reverse=True)]


def delete_model(tag: str, all_versions: bool = False) -> list[str]:
    """Delete a stored cellexplain model: ``name:version``, or every version of ``name`` with
    ``all_versions``; returns the tags deleted.

    Raises:
        StoreError: not in the store, not a cellexplain model, or a bare name without
            ``all_versions``.
    """
    import bentoml

    if ":" not in tag and not all_versions:
        raise StoreError(
            f"{tag!r} names every version of a model: give NAME:VERSION (cellexplain models "
            "list), or pass --all-versions"
        )
    try:
        models = [bentoml.models.get(tag)] if ":" in tag else list(bentoml.models.list(tag))
    except bentoml.exceptions.NotFound as e:
        raise StoreError(f"model {tag!r} is not in the BentoML store") from e
    if not models:
        raise StoreError(f"model {tag!r} is not in the BentoML store")
    foreign = [str(m.tag) for m in models if m.info.labels.get("framework") != FRAMEWORK_LABEL]
    if foreign:
        raise StoreError(f"{foreign[0]} is not a cellexplain model: not deleted")
    deleted = []
    for m in models:
        bentoml.models.delete(m.tag)
        deleted.append(str(m.tag))
    return deleted


def get_model(tag: str) -> StoredModel:
    """A stored model by ``name`` (latest) or ``name:version``; its sha256 is verified.

    Read from the store's files when they are laid out as BentoML's local store lays them out
    (:func:`stored_files`), without importing BentoML (half a second of a ``--local`` run's
    start); else, and for anything unexpected, through BentoML's API."""
    found = stored_files(tag)
    if found is not None:
        full_tag, path = found
        return StoredModel(full_tag, path, verify_artifact(path))
    import bentoml

    try:
        m = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound as e:
        raise StoreError(f"model {tag!r} is not in the BentoML store") from e
    if m.info.labels.get("framework") != FRAMEWORK_LABEL:
        raise StoreError(f"model {tag!r} is not a cellexplain model")
    card = verify_artifact(m.path)
    return StoredModel(str(m.tag), Path(m.path), card)


#: the ``model.yaml`` lines BentoML writes that the fast lookup reads (name, version, label)
_YAML_LINE = re.compile(r"^(name|version|  framework): (\S+)$", re.MULTILINE)


def stored_files(tag: str) -> tuple[str, Path] | None:
    """``(name:version, folder)`` of a cellexplain model in BentoML's default local store
    (``$BENTOML_HOME/models/NAME/VERSION``, ``NAME/latest`` naming the newest), read from its
    files; ``None`` when BentoML's configuration may move the store (``BENTOML_CONFIG``), or
    the files are not exactly as BentoML 1.x writes them: the caller then asks BentoML.
    tests/unit/test_store.py checks that both give the same answer."""
    if os.environ.get("BENTOML_CONFIG") or not NAME_RE.match(tag.split(":", 1)[0]):
        return None
    home = Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml")
    name, _, version = tag.partition(":")
    folder = home / "models" / name
    try:
        if version in ("", "latest"):
            version = (folder / "latest").read_text().strip()
        if not re.fullmatch(r"[a-z0-9]{1,64}", version):
            return None
        path = folder / version
        fields = dict(_YAML_LINE.findall((path / "model.yaml").read_text()))
    except (OSError, UnicodeDecodeError):
        return None
    expected = {"name": name, "version": version, "  framework": FRAMEWORK_LABEL}
    if fields != expected:
        return None
    return f"{name}:{version}", path
