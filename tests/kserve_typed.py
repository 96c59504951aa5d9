"""Check KServe objects against the typed models of the ``kserve`` package (its OpenAPI API).

Run by the ``kserve`` venv's Python (``benchmarks.peers.peer_python("kserve")``), not ours:

    python tests/kserve_typed.py FILE.yaml ...

Every document is walked against the generated model of its ``kind`` (``V1alpha1ServingRuntime``,
``V1beta1InferenceService``; the core types they hold, such as ``V1Container``, from the
``kubernetes`` client they import), strictly, as ``kubectl apply`` validates against a CRD
schema: a field the model does not have is an error, a value of the wrong type is an error, and
each object is built with its generated constructor, which refuses a missing required field and
a value outside an enum. Prints a JSON list of ``"doc N (Kind): path: problem"`` lines (empty:
valid) and exits 1 when there is any.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import kserve.models as km
import kubernetes.client.models as k8s
import yaml

PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "datetime": (str,),
    "date": (str,),
}


def model_class(name: str) -> type:
    cls = getattr(km, name, None) or getattr(k8s, name, None)
    if cls is None:
        raise LookupError(f"no typed model {name}")
    return cls


def build(value: Any, typ: str, path: str, errors: list[str]) -> Any:
    """``value`` as ``typ`` (a generated model name, ``list[T]``, ``dict(str, T)`` or a
    primitive), recording each problem in ``errors``; returns the built object or ``None``."""
    if typ.startswith(("list[", "List[")):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {type(value).__name__}")
            return None
        return [build(v, typ[5:-1], f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if typ.startswith(("dict(", "Dict[")):  # the kserve and kubernetes clients' spellings
        inner = typ[typ.index(",") + 1 : -1].strip()
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return None
        return {k: build(v, inner, f"{path}.{k}", errors) for k, v in value.items()}
    if typ == "object":
        return value
    if typ in PRIMITIVES:
        ok = isinstance(value, PRIMITIVES[typ]) and not (typ != "bool" and isinstance(value, bool))
        if not ok:
            errors.append(f"{path}: expected {typ}, got {value!r}")
        return value
    if typ.endswith("Quantity") and not hasattr(km, typ):
        # a Kubernetes quantity (int or string), which the generated SDK names but leaves out
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            errors.append(f"{path}: expected a quantity (int or string), got {value!r}")
        return value
    cls = model_class(typ)
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a {typ} object, got {value!r}")
        return None
    by_json = {j: attr for attr, j in cls.attribute_map.items()}
    kwargs: dict[str, Any] = {}
    for key, v in value.items():
        if key not in by_json:
            errors.append(f"{path}.{key}: unknown field of {typ}")
            continue
        attr = by_json[key]
        kwargs[attr] = build(v, cls.openapi_types[attr], f"{path}.{key}", errors)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        errors.append(f"{path}: {e}")
        return None


KINDS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}


def check(doc: dict[str, Any]) -> list[str]:
    """Problems of one document (empty: valid)."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in KINDS:
        return [f"not a KServe object this checks: apiVersion/kind {key}"]
    errors: list[str] = []
    build(doc, KINDS[key], "", errors)  # type: ignore[index]
    return errors


def main(paths: list[str]) -> int:
    problems: list[str] = []
    for path in paths:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for i, doc in enumerate(docs):
            problems += [f"{path} doc {i} ({doc.get('kind')}): {p}" for p in check(doc)]
    print(json.dumps(problems, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
