"""Read a CellTypist model (``.pkl``) without executing anything from the file.

A CellTypist model is a pickled dict: ``{"Model": LogisticRegression | SGDClassifier (with a
``features`` attribute), "Scaler_": StandardScaler, "description": {...}}``. ``pickle.load``
would import scikit-learn and numpy and call whatever the file names, so a hostile ``.pkl``
runs code. Here the pickle is read by an unpickler whose ``find_class`` knows a short list of
names, and returns for each a stand-in of this module, never the real class or function:

* the scikit-learn estimators CellTypist stores become :class:`_Estimator` records of their
  attribute dict (nothing of scikit-learn is imported or run);
* numpy's array reconstruction (``_reconstruct``, ``ndarray``, ``dtype``, ``scalar``) becomes
  :class:`_Array` / :class:`_DType` records, turned into arrays by ``np.frombuffer`` for numeric
  dtypes and into lists of ``str`` for object arrays (anything else in one is refused).

Any other name, or a reduce call on anything but these stand-ins, is refused with
:class:`CellTypistModelError` naming it: the file is not a CellTypist model, nothing of it ran.
"""

from __future__ import annotations

import io
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

#: pickles above this size are refused before reading (CellTypist's largest published model,
#: Immune_All_High/Low, is ~10 MB; a whole-body atlas model under 100 MB)
MAX_BYTES = 512 * 1024**2
#: numpy dtypes an array in a CellTypist model may have: floats, integers, booleans, objects
#: (its classes and features, as str) and fixed-width unicode
_DTYPE_RE = re.compile(r"^[<>|=]?(f[248]|i[1248]|u[1248]|b1|O8|U\d{1,6})$")


class CellTypistModelError(ValueError):
    """The file is not a CellTypist model this reader accepts; nothing of it was executed."""


class _Estimator:
    """A scikit-learn estimator's attributes, as the pickle stores them (``kind``: its class)."""

    kind = ""

    def __init__(self, *args: Any) -> None:
        if args:
            raise CellTypistModelError(f"{self.kind} is created with arguments in this file")
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise CellTypistModelError(f"{self.kind}'s state is not a dict of attributes")
        self.state = dict(state)


def _estimator(kind: str) -> type[_Estimator]:
    return type(kind, (_Estimator,), {"kind": kind})


class _DType:
    """``numpy.dtype(spec, align, copy)`` and its pickled state: only the byte order is read."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = True) -> None:
        if not isinstance(spec, str) or not _DTYPE_RE.match(spec):
            raise CellTypistModelError(f"array dtype {spec!r} is not one a CellTypist model has")
        self.spec = spec
        self.order = "="

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in "<>|=":
            raise CellTypistModelError("an array dtype's pickled state is not numpy's")
        self.order = state[1]

    def resolve(self) -> np.dtype[Any]:
        dtype = np.dtype(self.spec)
        if self.order == "<":
            return dtype.newbyteorder("<")
        return dtype.newbyteorder(">") if self.order == ">" else dtype


class _NdarrayClass:
    """Stands for ``numpy.ndarray`` (only ever passed to ``_reconstruct``)."""


class _Array:
    """``numpy._core.multiarray._reconstruct(ndarray, shape, b'b')`` and its state."""

    def __init__(self) -> None:
        self.value: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise CellTypistModelError("an array's pickled state is not numpy's")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _DType) or not isinstance(shape, tuple):
            raise CellTypistModelError("an array's shape or dtype is not numpy's")
        if not all(isinstance(d, int) and 0 <= d < 2**31 for d in shape):
            raise CellTypistModelError(f"an array's shape {shape!r} is not a shape")
        order: Literal["C", "F"] = "F" if fortran else "C"
        dims = tuple(int(d) for d in shape)
        size = int(np.prod(shape, dtype=np.int64))
        kind = dtype.resolve()
        if kind.kind == "O":
            if not isinstance(raw, list) or len(raw) != size:
                raise CellTypistModelError("an object array's values are not a list")
            if not all(isinstance(v, str) for v in raw):
                raise CellTypistModelError("an object array holds something other than text")
            self.value = np.array(raw, dtype=object).reshape(dims, order=order)
            return
        if not isinstance(raw, bytes | bytearray) or len(raw) != size * kind.itemsize:
            raise CellTypistModelError("an array's bytes do not match its shape and dtype")
        self.value = np.frombuffer(bytes(raw), dtype=kind).reshape(dims, order=order).copy()


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _Array:
    if cls is not _NdarrayClass:
        raise CellTypistModelError("numpy's _reconstruct is called on something else than ndarray")
    return _Array()


def _scalar(dtype: Any, raw: Any = None) -> Any:
    if not isinstance(dtype, _DType):
        raise CellTypistModelError("a numpy scalar's dtype is not numpy's")
    kind = dtype.resolve()
    if kind.kind == "O" or not isinstance(raw, bytes) or len(raw) != kind.itemsize:
        raise CellTypistModelError("a numpy scalar is not a number")
    return np.frombuffer(raw, dtype=kind)[0].item()


class _Loss:
    """An SGDClassifier's loss object (``sklearn.linear_model._sgd_fast.Log`` and the like):
    not needed to score, kept as its name; built only from numbers."""

    def __init__(self, *args: Any) -> None:
        if not all(isinstance(a, int | float) for a in args):
            raise CellTypistModelError("an SGD loss is built from something else than numbers")

    def __setstate__(self, state: Any) -> None:
        if state is not None and not isinstance(state, dict | tuple):
            raise CellTypistModelError("an SGD loss's pickled state is not a loss's")


#: the losses a fitted SGDClassifier pickles (scikit-learn's Cython loss classes)
_SGD_LOSSES = ("Log", "Hinge", "ModifiedHuber", "SquaredHinge", "SquaredLoss", "Huber",
               "EpsilonInsensitive", "SquaredEpsilonInsensitive")  # fmt: skip

_ESTIMATORS = {
    "LogisticRegression": ("sklearn.linear_model._logistic", "sklearn.linear_model.logistic"),
    "SGDClassifier": (
        "sklearn.linear_model._stochastic_gradient",
        "sklearn.linear_model.stochastic_gradient",
    ),
    "StandardScaler": ("sklearn.preprocessing._data", "sklearn.preprocessing.data"),
}
#: (module, name) -> the stand-in ``find_class`` returns; numpy moved ``core`` to ``_core`` in 2.0
_ALLOWED: dict[tuple[str, str], Any] = {
    **{(m, name): _estimator(name) for name, mods in _ESTIMATORS.items() for m in mods},
    **{(f"numpy.{c}.multiarray", "_reconstruct"): _reconstruct for c in ("core", "_core")},
    **{(f"numpy.{c}.multiarray", "scalar"): _scalar for c in ("core", "_core")},
    ("numpy", "ndarray"): _NdarrayClass,
    ("numpy", "dtype"): _DType,
    **{
        (f"sklearn.linear_model.{m}", loss): _Loss
        for m in ("_sgd_fast", "sgd_fast")
        for loss in _SGD_LOSSES
    },
}


#: scikit-learn 1.6+'s Cython losses an SGDClassifier pickles (CyHalfBinomialLoss, ...)
_CY_LOSS = re.compile(r"^Cy[A-Za-z]+Loss$")


class _Unpickler(pickle.Unpickler):
    """Returns stand-ins made for this read alone: a pickle's BUILD may set attributes on
    whatever ``find_class`` returned, and none of this module's own classes or functions is
    ever handed to it."""

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        marker = type("ndarray", (_NdarrayClass,), {})

        def reconstruct(cls: Any, shape: Any, typecode: Any) -> _Array:
            if cls is not marker:
                raise CellTypistModelError(
                    "numpy's _reconstruct is called on something else than ndarray"
                )
            return _Array()

        def fresh(found: Any) -> Any:
            if found is _NdarrayClass:
                return marker
            if found is _reconstruct:
                return reconstruct
            if isinstance(found, type):
                return type(found.__name__, (found,), {})
            return lambda *args: found(*args)

        self._allowed = {key: fresh(found) for key, found in _ALLOWED.items()}
        self._loss = fresh(_Loss)

    def find_class(self, module: str, name: str) -> Any:
        if module == "sklearn._loss._loss" and _CY_LOSS.match(name):
            return self._loss
        found = self._allowed.get((module, name))
        if found is None:
            raise CellTypistModelError(
                f"the file names {module}.{name}, which a CellTypist model does not hold: "
                "refused (nothing of the file was run)"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise CellTypistModelError("the file uses pickle's persistent ids: refused")


@dataclass
class CellTypistModel:
    """What the service needs of a CellTypist model: a linear classifier over standardised
    log1p CP10k expression.

    ``decision = clip((x - mean) / scale, max=10) @ coef.T + intercept`` for ``x`` the log1p
    CP10k values of ``features`` (CellTypist's ``annotate``), the class with the largest
    decision is the label.
    """

    features: list[str]  # [G]
    classes: list[str]  # [C]
    coef: np.ndarray  # [C, G] float64 (binary models: the two rows -s and s)
    intercept: np.ndarray  # [C]
    mean: np.ndarray  # [G] (zeros when the scaler did not centre)
    scale: np.ndarray  # [G]
    estimator: str
    description: dict[str, Any] = field(default_factory=dict)


def _arrays(state: dict[str, Any], names: tuple[str, ...], what: str) -> list[np.ndarray]:
    out = []
    for name in names:
        value = state.get(name)
        if not isinstance(value, _Array) or value.value is None:
            raise CellTypistModelError(f"the {what} has no {name} array")
        out.append(value.value)
    return out


def read_celltypist(path: str | Path) -> CellTypistModel:
    """Read a CellTypist ``.pkl`` (see the module docstring); nothing in it is executed.

    Raises:
        CellTypistModelError: not a CellTypist model, or a name outside the allowed ones (the
            message names it), or arrays whose shapes do not agree.
    """
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise CellTypistModelError(f"{path} is {size} bytes, more than a CellTypist model")
    data = path.read_bytes()
    try:
        obj = _Unpickler(io.BytesIO(data)).load()
    except CellTypistModelError:
        raise
    except Exception as e:  # a damaged or foreign pickle
        raise CellTypistModelError(
            f"{path} is not a readable CellTypist model: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(obj, dict) or not {"Model", "Scaler_"} <= set(obj):
        raise CellTypistModelError(f"{path} is a pickle, but not of a CellTypist model")
    model, scaler = obj["Model"], obj["Scaler_"]
    if not isinstance(model, _Estimator) or model.kind == "StandardScaler":
        raise CellTypistModelError("its Model is not a LogisticRegression or SGDClassifier")
    if not isinstance(scaler, _Estimator) or scaler.kind != "StandardScaler":
        raise CellTypistModelError("its Scaler_ is not a StandardScaler")
    coef, intercept, classes, features = _arrays(
        model.state, ("coef_", "intercept_", "classes_", "features"), model.kind
    )
    (scale,) = _arrays(scaler.state, ("scale_",), "StandardScaler")
    with_mean = scaler.state.get("with_mean", True) is not False
    mean = _arrays(scaler.state, ("mean_",), "StandardScaler")[0] if with_mean else None
    G = len(features)
    coef = np.asarray(coef, dtype=np.float64)
    intercept = np.asarray(intercept, dtype=np.float64).reshape(-1)
    if coef.ndim != 2 or coef.shape[1] != G or len(scale) != G:
        raise CellTypistModelError(
            f"coef_ {coef.shape}, scale_ {scale.shape} and {G} features do not agree"
        )
    if coef.shape[0] == 1 and len(classes) == 2:  # binary: CellTypist scores (-s, s)
        coef, intercept = np.vstack([-coef, coef]), np.concatenate([-intercept, intercept])
    if coef.shape[0] != len(classes) or len(intercept) != len(classes):
        raise CellTypistModelError(f"coef_ {coef.shape} for {len(classes)} classes")
    description = obj.get("description")
    return CellTypistModel(
        features=[str(f) for f in features],
        classes=[str(c) for c in classes],
        coef=coef,
        intercept=intercept,
        mean=np.zeros(G) if mean is None else np.asarray(mean, dtype=np.float64),
        scale=np.asarray(scale, dtype=np.float64),
        estimator=model.kind,
        description=_plain(description) if isinstance(description, dict) else {},
    )


#: a description's bounds: CellTypist's is a flat dict of a few strings and numbers
MAX_DESCRIPTION_DEPTH = 8
MAX_DESCRIPTION_ITEMS = 10_000


def _plain(value: Any, depth: int = 0, budget: list[int] | None = None) -> Any:
    """The description as JSON-ready values (str, numbers, lists, dicts), within
    :data:`MAX_DESCRIPTION_DEPTH` levels and :data:`MAX_DESCRIPTION_ITEMS` values: a pickle can
    nest a list in itself, or share one list so that it expands exponentially.

    Raises:
        CellTypistModelError: past either bound."""
    budget = [MAX_DESCRIPTION_ITEMS] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DESCRIPTION_DEPTH:
        raise CellTypistModelError(
            f"the model's description is nested deeper than {MAX_DESCRIPTION_DEPTH} levels or "
            f"holds more than {MAX_DESCRIPTION_ITEMS} values: not a CellTypist description"
        )
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1, budget) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, depth + 1, budget) for v in value]
    if isinstance(value, _Array) and value.value is not None:
        if value.value.size > MAX_DESCRIPTION_ITEMS:
            raise CellTypistModelError("the model's description holds too large an array")
        return _plain(value.value.tolist(), depth + 1, budget)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


#: CellTypist's clip of standardised expression (``annotate``: ``X[X > 10] = 10``)
CLIP = 10.0
#: synthetic cells the export checks the graph on (from the scaler's own statistics)
CHECK_CELLS = 512


def export_celltypist(model: CellTypistModel, source: Path, name: str, out_dir: Path) -> Any:
    """Write ``model.onnx`` and ``model.json`` for ``model`` read from ``source``: the linear
    graph on CellTypist's clipped standardisation (``build_graph(input_clip=...)``), exact
    attributions ``coef_t x z`` against the mean baseline, no novelty score (it needs the
    training cells, which a CellTypist model does not carry). The graph is checked in float32
    and float64 against numpy's float64 decision on synthetic cells drawn from the scaler's
    statistics; returns the :class:`~cellexplain.models.card.ModelCard`.

    Raises:
        ExportError: the graph disagrees with the numpy reference.
    """
    import datetime
    import hashlib

    from cellexplain import __version__
    from cellexplain.models.attribution import OPSET, AttributionSpec, build_graph
    from cellexplain.models.card import (
        Architecture,
        Attribution,
        ExportChecks,
        ModelCard,
        OnnxInfo,
        Origin,
        Preprocessing,
    )
    from cellexplain.models.errors import ExportError
    from cellexplain.models.export import _atomic_write, _rel_error, _run

    G, C = len(model.features), len(model.classes)
    clip = (model.mean, model.scale, CLIP)
    layers = [(model.coef, model.intercept)]
    spec = AttributionSpec(baseline="mean")

    def graph(dtype: type[np.floating[Any]]) -> Any:
        return build_graph(layers, spec, model.mean, name=name, dtype=dtype, input_clip=clip)

    rng = np.random.default_rng(0)
    x = np.maximum(model.mean + model.scale * rng.standard_normal((CHECK_CELLS, G)), 0)
    z = np.minimum((x - model.mean) / model.scale, CLIP)
    decision = z @ model.coef.T + model.intercept  # CellTypist's, in float64
    best = decision.argmax(axis=1)
    attr_ref = model.coef[best] * z
    onnx_model = graph(np.float32)
    onnx_bytes = onnx_model.SerializeToString()
    out32 = _run(onnx_bytes, x.astype(np.float32))
    out64 = _run(graph(np.float64).SerializeToString(), x)
    rise = decision[np.arange(CHECK_CELLS), best] - model.intercept[best]
    completeness = np.abs(out32["attributions"].sum(axis=1) - rise)
    probs = np.exp(decision - decision.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    err32 = _rel_error(out32["attributions"], attr_ref)
    per_cell = np.abs(out32["attributions"] - attr_ref).sum(1) / np.maximum(
        np.abs(attr_ref).sum(1), 1e-12
    )
    checks = ExportChecks(
        n_cells=CHECK_CELLS,
        captum_method="none: the exact linear reference coef_t x z, numpy float64",
        captum_max_abs_error=float(np.abs(out32["attributions"] - attr_ref).max()),
        captum_rel_error=err32,
        captum_rel_error_p99=float(np.quantile(per_cell, 0.99)),
        float64_graph_rel_error=_rel_error(out64["attributions"], attr_ref),
        completeness_max_abs_error=float(completeness.max()),
        completeness_rel_error=float(completeness.max() / max(np.abs(rise).mean(), 1e-12)),
        completeness_tolerance=1e-3,
        probabilities_max_abs_error=float(np.abs(out32["probabilities"] - probs).max()),
        passed=False,
    )
    # float32 logits move by their rounding; a softmax by at most half of that: large decision
    # scores (an SGD fit's) allow more absolute error than 1e-5 in the probabilities
    logit_err = float(np.abs(out32["logits"] - decision).max())
    checks.passed = bool(
        checks.float64_graph_rel_error < 1e-9
        and err32 < 1e-4
        and logit_err / max(float(np.abs(decision).max()), 1.0) < 1e-5
        and checks.completeness_rel_error < checks.completeness_tolerance
        and checks.probabilities_max_abs_error < max(1e-5, logit_err)
        and (out32["explained_class"] == best).mean() > 0.999
    )
    if not checks.passed:
        raise ExportError(f"the graph of {source} failed its checks: {checks.model_dump()}")
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    card = ModelCard(
        name=name,
        version=sha[:16],
        created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        cellexplain_version=__version__,
        description=f"CellTypist model {source.name}, imported",
        genes=model.features,
        classes=model.classes,
        preprocessing=Preprocessing(
            detected_training_input="log1p_cp10k",
            detection_reason="CellTypist models read log1p CP10k expression",
            gene_selection="all",
            n_genes_in_training_data=G,
        ),
        architecture=Architecture(
            kind="linear", layer_sizes=[G, C], n_parameters=int(model.coef.size + C)
        ),
        attribution=Attribution(
            method="integrated_gradients",
            n_steps=0,
            rule="none",
            baseline="mean",
            exact=True,
            completeness="exact: coef_t x z, z = clip((x - mean) / scale, max=10): the "
            "attributions sum to the decision score minus the intercept",
        ),
        origin=Origin(
            kind="celltypist",
            file=source.name,
            sha256=sha,
            estimator=model.estimator,
            description=model.description,
            standardisation="clip((x - mean) / scale, max=10), as CellTypist's annotate",
            missing_fill=[float(v) for v in model.mean],
        ),
        checks=checks,
        onnx=OnnxInfo(
            sha256=hashlib.sha256(onnx_bytes).hexdigest(),
            precision="float32",
            opset=OPSET,
            inputs=[i.name for i in onnx_model.graph.input],
            outputs=list(out32),
        ),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / "model.onnx", onnx_bytes)
    _atomic_write(out_dir / "model.json", (card.model_dump_json(indent=2) + "\n").encode())
    return card
