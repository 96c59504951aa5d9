"""Novelty: how far a cell lies from every cell type the model was trained on.

A classifier's confidence cannot say that a cell belongs to none of its classes: softmax
spreads a cell of an unseen type over the known ones, often confidently (held out of training,
monocytes are called "Dendritic" at higher confidence than known T subsets). Novelty is measured
beside the classifier, on the cell's expression:

1. each gene is standardised with the reference cells' mean and standard deviation (clipped to
   +-:data:`CLIP`, as ``sc.pp.scale(max_value=10)``), and projected on the reference's first
   :data:`N_COMPONENTS` principal components;
2. the distance to each known class is the Mahalanobis distance to the class's mean in that
   space, under the covariance shared by the classes (the within-class scatter); the cell's
   distance is the smallest, to its nearest known type;
3. ``novelty`` is the share of *calibration* cells that lie nearer to a known type than this
   cell: 0.99 means the cell lies further from every known type than 99% of known cells do.
   The calibration distances are cross-fitted (:func:`fit_reference`): each labelled cell's
   distance to a reference fitted without it.

Everything is a constant of the exported graph, which computes ``novelty`` for every cell
(:func:`add_to_graph`); :func:`novelty` computes the same in numpy (float64), which the export
checks compare it with. Measured on held-out cell types of pbmc68k_reduced
(``python -m benchmarks.novelty``): docs/attributions.md, "Novelty".
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class GraphBuilder(Protocol):
    """What :func:`add_to_graph` needs of the graph writer (``attribution._GraphBuilder``)."""

    def const(self, prefix: str, value: np.ndarray) -> str: ...

    def op(
        self, op_type: str, inputs: Sequence[str], out: str | None = None, **attrs: Any
    ) -> str: ...


#: principal components kept. On held-out types of pbmc68k_reduced (5 types x 2 splits),
#: 5 / 10 / 20 / 50 components gave AUROC 0.844 / 0.910 / 0.915 / 0.916; but the components
#: are fitted to the reference cells, whose own distances come out larger than new cells' (at a
#: threshold of 0.98: 2.3% / 4.5% / 14% / 53% of the training cells flagged, against 1.5% of
#: new cells of the known types): 10 keeps the model's own training data mostly unflagged
N_COMPONENTS = 10
#: standardised values are clipped to +-CLIP (a rare gene's outlier moves no distance alone)
CLIP = 10.0
#: floor of a gene's standard deviation (log1p units, as the classifiers' standardisation):
#: genes almost constant in the reference are not blown up into the distance by a single count
MIN_SCALE = 0.1
#: values (cells x genes) of the reference and of the calibration cells held dense at once:
#: at most ~400 MB each as float64 (all cells of pbmc68k_reduced; 1,500 at 33k genes)
MAX_VALUES = 50_000_000
#: added to the covariance's diagonal (principal-component units) so that it inverts
RIDGE = 1e-3
#: calibration distances kept in the graph (quantiles when there are more cells)
MAX_CALIBRATION = 1000
#: parts of the cross-fitted calibration
FOLDS = 5
#: the default flag: cells further from every known type than this share of known cells. On
#: held-out types of pbmc68k_reduced, 0.9 / 0.95 / 0.98 / 0.99 flagged 74% / 62% / 35% / 19% of
#: the unseen type's cells and 9.3% / 4.9% / 1.5% / 0.7% of new cells of the known types
#: (benchmarks.novelty): the default costs few known cells; a request may lower it
DEFAULT_THRESHOLD = 0.98


@dataclass(frozen=True)
class NoveltyReference:
    """The constants of the novelty score (float64).

    ``center`` and ``inv_scale`` ``[G]`` standardise; ``projection`` ``[G, k]`` projects on the
    principal components and whitens by the shared covariance, so that Euclidean distance there
    is Mahalanobis distance; ``centroids`` ``[C, k]`` are the class means in that space;
    ``calibration`` ``[m]`` the sorted squared distances of the calibration cells."""

    center: np.ndarray
    inv_scale: np.ndarray
    projection: np.ndarray
    centroids: np.ndarray
    calibration: np.ndarray
    n_reference: int
    n_calibration: int

    @property
    def n_components(self) -> int:
        return int(self.projection.shape[1])


def _standardise(
    ref: NoveltyReference | tuple[np.ndarray, np.ndarray], x: np.ndarray
) -> np.ndarray:
    center, inv_scale = (ref.center, ref.inv_scale) if isinstance(ref, NoveltyReference) else ref
    z = np.subtract(x, center, dtype=np.float64)  # one array, worked on in place
    z *= inv_scale
    return np.clip(z, -CLIP, CLIP, out=z)


def _top_components(z: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` leading principal directions ``[G, k]`` of centred cells ``z`` ``[n, G]``,
    from the eigenvectors of the smaller of their two Gram matrices (``G x G`` or ``n x n``):
    the right singular vectors of ``z`` without its left ones, which a thin SVD of 25,000
    cells x 2,000 genes holds as 400 MB and ~10 s."""
    if z.shape[0] >= z.shape[1]:
        _, v = np.linalg.eigh(z.T @ z)
        return np.ascontiguousarray(v[:, ::-1][:, :k])
    w, u = np.linalg.eigh(z @ z.T)
    w, u = w[::-1][:k], u[:, ::-1][:, :k]
    return np.ascontiguousarray((z.T @ u) / np.sqrt(np.maximum(w, 1e-300)))


def _fit(x: np.ndarray, y: np.ndarray, n_components: int) -> NoveltyReference:
    """The constants from cells ``x`` (float32 or float64) of classes ``y``, without
    calibration; the centroids of the classes present."""
    center = x.mean(0, dtype=np.float64)
    squares = np.zeros(x.shape[1])
    step = max(1, (1 << 22) // max(x.shape[1], 1))  # 32 MB of deviations at a time, not x's
    for start in range(0, len(x), step):
        squares += np.square(x[start : start + step] - center).sum(0)
    inv_scale = 1.0 / np.maximum(np.sqrt(squares / max(len(x), 1)), MIN_SCALE)
    z = _standardise((center, inv_scale), x)
    z_mean = z.mean(0)
    z -= z_mean
    k = max(1, min(n_components, min(z.shape) - 1))
    pcs = _top_components(z, k)  # [G, k]
    scores = z @ pcs
    present = np.unique(y)
    means = np.stack([scores[y == c].mean(0) for c in present])
    within = scores - means[np.searchsorted(present, y)]
    cov = within.T @ within / len(within) + RIDGE * np.eye(k)
    # whiten: cov = L L^T, distances under cov^-1 are Euclidean after multiplying by L^-T
    whiten = np.linalg.inv(np.linalg.cholesky(cov)).T  # [k, k]
    projection = pcs @ whiten
    # the standardised mean folds into the centroids: (z - z_mean) P = z P - z_mean P
    centroids = means @ whiten + z_mean @ projection
    return NoveltyReference(center, inv_scale, projection, centroids, np.zeros(0), len(x), 0)


def fit_reference(
    x: np.ndarray,
    y: np.ndarray,
    n_components: int = N_COMPONENTS,
    folds: int = FOLDS,
    seed: int = 0,
) -> NoveltyReference:
    """Fit the novelty score's constants on labelled cells, and calibrate it by cross-fitting:
    the cells are split in ``folds`` parts (stratified by class), and each part's distances
    are measured to a reference fitted on the other parts, so every calibration distance is
    that of a known-type cell the reference did not see.

    Args:
        x: ``[n, G]`` model input (log1p CP10k) of labelled cells.
        y: ``[n]`` their class indices.
        n_components: principal components kept (at most ``min(n, G) - 1``).
        folds: parts of the cross-fitting.
        seed: of the parts' random assignment.
    """
    from sklearn.model_selection import StratifiedKFold

    x = np.asarray(x)  # float32 stays float32: each part is standardised into float64
    if x.dtype.kind != "f":
        x = x.astype(np.float64)
    y = np.asarray(y)
    _, counts = np.unique(y, return_counts=True)
    k_folds = max(2, min(folds, int(counts.max())))
    d = np.empty(len(x))
    with warnings.catch_warnings():  # classes with fewer cells than folds: fine here
        warnings.simplefilter("ignore", UserWarning)
        parts = StratifiedKFold(k_folds, shuffle=True, random_state=seed).split(x, y)
        for rest, part in parts:
            d[part] = distances(_fit(x[rest], y[rest], n_components), x[part])
    d = np.sort(d)
    if len(d) > MAX_CALIBRATION:
        d = np.quantile(d, np.linspace(0, 1, MAX_CALIBRATION))
    full = _fit(x, y, n_components)
    return dataclasses.replace(full, calibration=d, n_calibration=len(x))


def distances(ref: NoveltyReference, x: np.ndarray) -> np.ndarray:
    """``[n]`` squared Mahalanobis distance of each cell of ``x`` ``[n, G]`` to its nearest
    known class (float64)."""
    y = _standardise(ref, x) @ ref.projection
    return np.min(((y[:, None, :] - ref.centroids[None]) ** 2).sum(-1), axis=1)


def novelty(ref: NoveltyReference, x: np.ndarray) -> np.ndarray:
    """``[n]`` the share of calibration cells nearer to a known type than each cell of ``x``."""
    d = distances(ref, x)
    return (d[:, None] > ref.calibration[None, :]).mean(1)


def add_to_graph(b: GraphBuilder, x: str, ref: NoveltyReference, dtype: Any) -> str:
    """Add the ``novelty`` output ``[n]`` (computed from input ``x``, in ``dtype``) to a graph
    under construction; returns its name."""
    f = np.dtype(dtype)
    axis1 = b.const("axis1", np.array([1], np.int64))
    axis2 = b.const("axis2", np.array([2], np.int64))
    z = b.op("Mul", [b.op("Sub", [x, b.const("nov_center", ref.center.astype(f))]),
                     b.const("nov_inv_scale", ref.inv_scale.astype(f))])  # fmt: skip
    z = b.op(
        "Clip", [z, b.const("nov_lo", np.array(-CLIP, f)), b.const("nov_hi", np.array(CLIP, f))]
    )
    y = b.op("MatMul", [z, b.const("nov_projection", ref.projection.astype(f))])  # [n, k]
    diff = b.op(
        "Sub", [b.op("Unsqueeze", [y, axis1]), b.const("nov_centroids", ref.centroids.astype(f))]
    )
    d = b.op("ReduceSum", [b.op("Mul", [diff, diff]), axis2], keepdims=0)  # [n, C]
    nearest = b.op("ReduceMin", [d], axes=[1], keepdims=1)  # [n, 1] (opset 17: axes attribute)
    beyond = b.op(
        "Cast",
        [b.op("Greater", [nearest, b.const("nov_calibration", ref.calibration.astype(f))])],
        to=_elem(f),
    )
    return b.op("ReduceMean", [beyond], out="novelty", axes=[1], keepdims=0)


def _elem(f: np.dtype[Any]) -> int:
    from onnx import TensorProto  # the train extra's (the model card imports this module)

    return {np.dtype(np.float64): TensorProto.DOUBLE, np.dtype(np.float32): TensorProto.FLOAT}[f]
