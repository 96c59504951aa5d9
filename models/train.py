"""Train an interpretable classifier, compare it with a logistic-regression baseline, export it."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from cellexplain import __version__
from cellexplain.models.architectures import Arch, ArchConfig, CellClassifier, ensemble
from cellexplain.models.attribution import AttributionSpec
from cellexplain.models.backed import FileMatrix
from cellexplain.models.card import (
    Architecture,
    Calibration,
    GeneSetsUsed,
    Metrics,
    ModelCard,
    Novelty,
    Preprocessing,
    Scores,
    Split,
    TrainingData,
)
from cellexplain.models.data import IN_MEMORY_VALUES, LabelledData
from cellexplain.models.errors import DataError
from cellexplain.models.export import MAX_CHECK_CELLS, export_model
from cellexplain.models.genesets import program_mask, read_gmt
from cellexplain.models.novelty import (
    DEFAULT_THRESHOLD,
    MAX_VALUES,
    NoveltyReference,
    fit_reference,
)
from cellexplain.models.preprocess import Matrix, gene_mean_var, select_variable_genes

log = logging.getLogger(__name__)

#: standard deviations below this (log1p units) are floored when standardising genes
MIN_STD = 0.1


@dataclass
class TrainConfig:
    """Everything that decides a trained model (recorded in its card)."""

    arch: Arch = "programs"
    name: str = "pbmc-programs"
    n_top_genes: int | None = None  # None: all genes
    first_width: int = 256  # mlp only
    hidden: list[int] | None = None  # default: mlp [128], programs [64]
    n_free: int = 64  # programs: dense units beside the gene programs
    gene_sets: str | None = None  # GMT path; default: bundled Hallmark sets
    min_genes_per_set: int = 5
    dropout: float = 0.2
    lr: float = 1e-3
    weight_decay: float = 1e-4
    #: linear only: the L2 penalty of its convex objective (lambda/2 * |W|^2 beside the
    #: class-weighted mean cross-entropy). 0.01 had the lowest mean validation loss of 0.001,
    #: 0.01 and 0.1 over 4 splits of pbmc68k_reduced (0.835, 0.781, 0.797; best in 3 of 4)
    l2: float = 0.01
    batch_size: int = 128
    max_epochs: int = 300
    patience: int = 30
    seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    min_cells_per_class: int = 5
    unassigned_threshold: float = 0.5
    #: divide the logits by a temperature fitted on the validation split (folded into the
    #: graph's last layer; recorded in the card with the test split's ECE before and after)
    calibrate: bool = True
    #: cells at or above this novelty are labelled Unassigned (reason: novel); 1 never flags
    novelty_threshold: float = DEFAULT_THRESHOLD
    attribution: AttributionSpec = field(default_factory=AttributionSpec)
    precision: Literal["float32", "float16"] = "float32"  # arithmetic inside the served graph
    #: after the split has chosen the epochs (early stopping on validation) and scored the
    #: model on the test cells, fit the exported model on every labelled cell for that many
    #: epochs; False exports the model fitted on the train split
    refit: bool = True
    #: mlp, programs: networks from seeds seed, seed+1, ... averaged in one graph
    ensemble: int = 1
    version: str = "1"

    def __post_init__(self) -> None:
        for name, low in (("max_epochs", 1), ("patience", 1), ("min_cells_per_class", 2)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be at least {low}, got {getattr(self, name)}")
        if self.ensemble < 1:
            raise ValueError(f"ensemble must be at least 1, got {self.ensemble}")
        if self.ensemble > 1 and self.arch == "linear":
            raise ValueError("ensemble is for mlp and programs (linear has a unique optimum)")
        if not 0 < self.l2 < float("inf"):
            raise ValueError(f"l2 must be a finite number above 0, got {self.l2}")
        if not 0 <= self.novelty_threshold <= 1:
            raise ValueError(f"novelty_threshold must be from 0 to 1, got {self.novelty_threshold}")
        if self.n_top_genes is not None and self.n_top_genes < 1:
            raise ValueError(f"n_top_genes must be at least 1, got {self.n_top_genes}")


@dataclass
class SplitIndices:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def check_labels(labels: np.ndarray, min_cells: int) -> list[str]:
    """Classes (sorted) after checking there are at least 2, each with ``min_cells`` cells."""
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise DataError(f"need at least 2 classes to train, found {len(classes)}: {list(classes)}")
    small = [(c, int(n)) for c, n in zip(classes, counts, strict=True) if n < min_cells]
    if small:
        listed = ", ".join(f"{c!r} ({n})" for c, n in small)
        raise DataError(
            f"class(es) with too few cells (need at least {min_cells} per class for a "
            f"stratified train/validation/test split): {listed}; drop or merge them, or lower "
            "--min-cells-per-class"
        )
    return [str(c) for c in classes]


def stratified_split(y: np.ndarray, seed: int, val: float, test: float) -> SplitIndices:
    """Stratified train/validation/test indices with a fixed seed."""
    idx = np.arange(len(y))
    rest, te = train_test_split(idx, test_size=test, stratify=y, random_state=seed)
    tr, va = train_test_split(rest, test_size=val / (1 - test), stratify=y[rest], random_state=seed)
    return SplitIndices(np.sort(tr), np.sort(va), np.sort(te))


def dense(X: Matrix, rows: np.ndarray | None = None, what: str | None = None) -> np.ndarray:
    """Rows of ``X`` (all by default) as a dense float32 array; of a streamed matrix, read
    under a progress bar named ``what`` (when given)."""
    Xs = (
        X.take(rows, what)
        if isinstance(X, FileMatrix) and rows is not None
        else (X if rows is None else X[rows])
    )
    return np.asarray(Xs.toarray() if sp.issparse(Xs) else Xs, dtype=np.float32)


def scores(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> Scores:
    """Accuracy, macro-F1 and per-class F1 of integer predictions."""
    labels = list(range(len(classes)))
    per = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return Scores(
        accuracy=float(accuracy_score(y_true, y_pred)),
        macro_f1=float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        per_class_f1={c: float(f) for c, f in zip(classes, per, strict=True)},
    )


#: values (cells x genes) the baseline densifies to fit: beyond, a random subset of the
#: training cells (all of them on the bundled data: 700 x 765)
BASELINE_VALUES = 20_000_000


def _baseline(
    X: Matrix, y: np.ndarray, train: np.ndarray, test: np.ndarray, seed: int
) -> tuple[np.ndarray, int]:
    """The logistic-regression baseline's test predictions and the cells it was fitted on (a
    seeded subset where the training cells x genes exceed :data:`BASELINE_VALUES`)."""
    n = min(len(train), max(1000, BASELINE_VALUES // max(X.shape[1], 1)))
    rows = (
        np.sort(np.random.default_rng(seed).choice(train, n, replace=False))
        if n < len(train)
        else train
    )
    step = eval_chunk(X.shape[1])
    chunks = [test[i : i + step] for i in range(0, len(test), step)]
    predict = _logistic_regression(dense(X, rows, "baseline: read its cells"), y[rows], seed)
    pred = [predict(dense(X, c)) for c in _bar(X, chunks, "baseline: score the test cells")]
    return (np.concatenate(pred) if pred else np.zeros(0, np.int64)), len(rows)


def _logistic_regression(
    X_train: np.ndarray, y_train: np.ndarray, seed: int
) -> Callable[[np.ndarray], np.ndarray]:
    """CellTypist's model family: z-scored genes (clipped at 10), L2 logistic regression (C=1);
    returns its predict function (class indices)."""
    mean = X_train.mean(axis=0)
    std = X_train.std(axis=0)
    std[std == 0] = 1.0
    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
    clf.fit(np.clip((X_train - mean) / std, -10, 10), y_train)
    return lambda X: np.asarray(clf.predict(np.clip((X - mean) / std, -10, 10)))


def logistic_regression_baseline(
    X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, seed: int
) -> np.ndarray:
    """CellTypist's model family on the same split: z-scored genes (clipped at 10), L2 logistic
    regression (C=1). Returns predicted class indices for ``X_test``."""
    return _logistic_regression(X_train, y_train, seed)(X_test)


#: cells densified at once outside training (validation loss, test predictions, checks)
EVAL_CHUNK = 8192
#: ... and at most this many values (64 MB as float32: 488 cells of 32,786 genes)
EVAL_VALUES = 1 << 24


def eval_chunk(n_genes: int) -> int:
    """Cells densified at once outside training for a model input of ``n_genes`` genes."""
    return max(1, min(EVAL_CHUNK, EVAL_VALUES // max(n_genes, 1)))


def _bar(X: Matrix, chunks: list[np.ndarray], what: str) -> Any:
    """``chunks`` (of rows), under a progress bar when ``X`` streams and shows progress."""
    if not (isinstance(X, FileMatrix) and X.progress):
        return chunks
    return tqdm(chunks, desc=what, unit="chunk")


def _batch(X: Matrix, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Rows of ``X`` (dense or CSR) as a dense float32 tensor on ``device``: the only place
    training densifies, a mini-batch at a time."""
    return torch.from_numpy(dense(X, rows)).to(device)


def predict_rows(
    model: CellClassifier, X: Matrix, rows: np.ndarray, chunk: int | None = None
) -> np.ndarray:
    """Logits ``[len(rows), n_classes]`` of ``model`` (on its device) on rows of ``X``, in
    chunks of ``chunk`` cells (default: :func:`eval_chunk`)."""
    device = next(model.parameters()).device
    model.eval()
    chunk = chunk or eval_chunk(X.shape[1])
    out = []
    chunks = [rows[start : start + chunk] for start in range(0, len(rows), chunk)]
    with torch.no_grad():
        for r in _bar(X, chunks, "predict"):
            out.append(model(_batch(X, r, device)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.n_classes), np.float32)


def class_weights(y: np.ndarray, n_classes: int, device: torch.device) -> torch.Tensor:
    """Balanced class weights ``[n_classes]`` of the labels ``y``: cells / (classes x the
    class's cells), as scikit-learn's ``class_weight='balanced'``."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return torch.as_tensor(
        counts.sum() / (n_classes * np.maximum(counts, 1)), dtype=torch.float32, device=device
    )


def _epoch(
    X: Matrix,
    y: np.ndarray,
    rows: np.ndarray,
    batch_size: int,
    gen: torch.Generator,
    rng: np.random.Generator,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch's mini-batches (inputs, labels) of ``X[rows]``: the rows in a random order
    (``gen``); of a :class:`~cellexplain.models.backed.FileMatrix`, its blocks in a random
    order and their cells shuffled together (``rng``)."""
    if isinstance(X, FileMatrix):
        for r, Xb in X.shuffled_batches(rows, batch_size, rng):
            yield torch.from_numpy(dense(Xb)).to(device), torch.from_numpy(y[r]).to(device)
        return
    perm = torch.randperm(len(rows), generator=gen).numpy()
    for start in range(0, len(perm), batch_size):
        r = rows[perm[start : start + batch_size]]
        yield _batch(X, r, device), torch.from_numpy(y[r]).to(device)


def _fit(
    model: CellClassifier,
    X: Matrix,
    y: np.ndarray,
    train_rows: np.ndarray,
    val: tuple[Matrix, np.ndarray] | None,
    cfg: TrainConfig,
    progress: bool,
    epochs: int | None = None,
) -> tuple[int, int]:
    """AdamW with class-weighted cross-entropy on mini-batches of ``X[train_rows]`` (dense,
    CSR or a :class:`~cellexplain.models.backed.FileMatrix` streamed from disk: a batch is
    densified at a time, never the matrix); early stopping on the loss of the validation cells
    ``val`` (their model input and labels), or, without them, exactly ``epochs`` epochs (the
    refit on every cell). Runs on torch's CUDA device when there is one. The progress bar counts
    cells (cells/s).

    Returns (epochs trained, best epoch); the model ends, on the CPU, with the best epoch's
    weights.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    ytr = y[train_rows]
    weights = class_weights(ytr, model.config.n_classes, device)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights)
    val_loss_fn = torch.nn.CrossEntropyLoss(weight=weights, reduction="sum")
    # fused: one kernel for every parameter's update, 7x faster than the per-tensor loop on the
    # CPU (5 vs 36 ms a step for a 32,786-gene mlp's 8.4M parameters; the same update to
    # float32 rounding)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    validate = val is not None
    best = (float("inf"), 0, copy.deepcopy(model.state_dict()))
    epoch = 0
    total = cfg.max_epochs if validate else int(epochs or 0)
    what = f"train {cfg.arch}" if validate else f"refit {cfg.arch} on all {len(ytr)} cells"
    bar = tqdm(
        total=total * len(ytr),
        desc=what,
        unit="cell",
        unit_scale=True,
        disable=not progress,
        smoothing=0.05,
    )
    for epoch in range(total):
        model.train()
        for xb, yb in _epoch(X, y, train_rows, cfg.batch_size, gen, rng, device):
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            bar.update(len(yb))
        model.eval()
        if val is None:
            bar.set_postfix(epoch=epoch + 1)
            continue
        Xv, y_val = val
        summed, weight = 0.0, 0.0
        with torch.no_grad():
            step = eval_chunk(Xv.shape[1])
            for start in range(0, len(y_val), step):
                r = np.arange(start, min(start + step, len(y_val)))
                yv = torch.from_numpy(y_val[r]).to(device)
                summed += float(val_loss_fn(model(_batch(Xv, r, device)), yv))
                weight += float(weights[yv].sum())
        val_loss = summed / max(weight, 1e-12)
        if val_loss < best[0] - 1e-6:
            best = (val_loss, epoch, copy.deepcopy(model.state_dict()))
        bar.set_postfix(epoch=epoch + 1, val_loss=f"{val_loss:.3f}", best_epoch=best[1] + 1)
        if epoch - best[1] >= cfg.patience:
            # stopped early: the bar ends full at the epochs run, not at a share of the most
            bar.total = bar.n
            bar.set_description(f"{what} (early stop at epoch {epoch + 1})")
            bar.refresh()
            break
    bar.close()
    if validate:
        model.load_state_dict(best[2])
    model.to("cpu").eval()
    return (epoch + 1, best[1] + 1) if validate else (total, total)


#: L-BFGS iterations at most per fit (a pass over the train cells each, plus line searches)
LBFGS_MAX_ITER = 500
#: times L-BFGS is restarted from where it stopped short of the optimum
LBFGS_ROUNDS = 3


#: the fit has reached the optimum when the bound that strong convexity gives on its distance
#: to it, |gradient| / l2, is at most this share of |W|
CONVERGED_REL = 0.01


def _fit_convex(
    model: CellClassifier, X: Matrix, y: np.ndarray, rows: np.ndarray, l2: float, progress: bool
) -> tuple[int, float]:
    """Fit the linear model to the unique minimum of its convex objective: class-weighted mean
    cross-entropy over ``X[rows]`` plus ``l2 / 2 * |W|^2`` (the bias is not penalised), by
    full-batch L-BFGS from zero weights, the gradient summed over chunks of rows (dense or CSR:
    one chunk densified at a time, never the matrix). Nothing depends on the seed: its top
    genes are the objective's, not a random start's. The loss is summed in float64, so that
    L-BFGS stops on a small gradient, not on float32's resolution, and its gradient tolerance
    scales with ``l2`` (a small ``l2`` needs many iterations: the data are nearly separable,
    the objective flat). Returns (L-BFGS iterations, |gradient| / (l2 |W|) where it stopped:
    a bound on its relative distance to the optimum, converged when at most
    :data:`CONVERGED_REL`); the model ends on the CPU.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()  # no dropout in a linear model: a deterministic objective
    (layer,) = [m for m in model.net if isinstance(m, torch.nn.Linear)]
    weights = class_weights(y[rows], model.config.n_classes, device)
    total = float(weights[torch.from_numpy(y[rows]).to(device)].sum())
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
    opt = torch.optim.LBFGS(
        [layer.weight, layer.bias],
        lr=1.0,
        max_iter=LBFGS_MAX_ITER,
        history_size=20,
        tolerance_grad=1e-4 * l2,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )
    bar = tqdm(desc=f"fit linear (L2 {l2:g})", unit="pass", disable=not progress)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        summed = 0.0
        step = eval_chunk(X.shape[1])
        for start in range(0, len(rows), step):
            r = rows[start : start + step]
            yt = torch.from_numpy(y[r]).to(device)
            part = torch.nn.functional.cross_entropy(
                model(_batch(X, r, device)), yt, weight=weights, reduction="sum"
            ) / max(total, 1e-12)
            part.backward()
            summed += float(part.detach())
        reg = 0.5 * l2 * (layer.weight**2).sum()
        reg.backward()
        bar.update(1)
        return torch.tensor(summed + float(reg.detach()), dtype=torch.float64)

    iterations = 0
    for _ in range(LBFGS_ROUNDS):  # L-BFGS may stop on its line search: restart from there
        opt.step(closure)
        iterations = int(opt.state[layer.weight].get("n_iter", 0))
        closure()  # the gradient where it stopped
        squares = [float((p.grad.double() ** 2).sum()) for p in (layer.weight, layer.bias)
                   if p.grad is not None]  # fmt: skip
        norm = float(layer.weight.detach().double().norm())
        distance = math.sqrt(math.fsum(squares)) / (l2 * max(norm, 1e-12))
        if distance <= CONVERGED_REL:
            break
    bar.close()
    model.to("cpu").eval()
    return iterations, distance


@dataclass
class Fitted:
    """A trained model with what its export needs: the card's fields, model input ``[n_test,
    n_genes]`` for the export checks (the test split's cells), and the mean of the cells it was
    fitted on (``mean`` baseline)."""

    model: CellClassifier
    card_fields: dict[str, Any]
    test_x: np.ndarray
    mean: np.ndarray
    novelty: NoveltyReference | None = None


def train(
    data: LabelledData,
    cfg: TrainConfig,
    out_dir: str | Path,
    progress: bool = True,
) -> ModelCard:
    """Train ``cfg.arch`` on ``data``, evaluate it and the baseline on the test split, export.

    Writes ``out_dir/model.onnx`` and ``out_dir/model.json`` and returns the card.

    Raises:
        DataError: fewer than 2 classes, a class with too few cells, no gene-set overlap.
    """
    f = fit(data, cfg, progress)
    return export_model(
        f.model,
        cfg.attribution,
        f.card_fields,
        out_dir,
        check_x=f.test_x,
        mean=f.mean,
        precision=cfg.precision,
        novelty=f.novelty,
    )


@dataclass
class _Built:
    model: CellClassifier
    arch_cfg: ArchConfig
    gene_sets_used: GeneSetsUsed | None
    n_programs: int
    mean: np.ndarray
    mask: np.ndarray | None = None


def _build(
    genes: list[str], X: Matrix, rows: np.ndarray | None, n_classes: int, cfg: TrainConfig
) -> _Built:
    """A fresh network for these genes, standardised on ``X[rows]`` (the cells it is fitted
    on; one streaming pass, no copy of them)."""
    torch.manual_seed(cfg.seed)
    mean64, var = gene_mean_var(X, rows)
    mean = mean64.astype(np.float32)
    scale = (1.0 / np.maximum(np.sqrt(var), MIN_STD)).astype(np.float32)

    gene_sets_used: GeneSetsUsed | None = None
    mask = None
    hidden = cfg.hidden
    n_programs = 0
    if cfg.arch == "programs":
        gs = read_gmt(cfg.gene_sets)
        pm = program_mask(gs, genes, cfg.min_genes_per_set)
        mask = pm.mask
        n_programs = len(pm.names)
        gene_sets_used = GeneSetsUsed(
            source=gs.source,
            sha256=gs.sha256,
            n_sets_in_file=len(gs.names),
            programs=pm.names,
            program_sizes=pm.sizes,
            n_genes_covered=pm.n_genes_covered,
        )
        log.info(
            "%d gene programs over %d of %d genes, plus %d free units",
            n_programs,
            pm.n_genes_covered,
            len(genes),
            cfg.n_free,
        )
        hidden = [64] if hidden is None else hidden
    elif cfg.arch == "mlp":
        hidden = [128] if hidden is None else hidden
    else:
        hidden = []
    arch_cfg = ArchConfig(
        arch=cfg.arch,
        n_genes=len(genes),
        n_classes=n_classes,
        first_width=cfg.first_width if cfg.arch == "mlp" else None,
        hidden=list(hidden),
        n_programs=n_programs,
        n_free=cfg.n_free if cfg.arch == "programs" else 0,
        dropout=cfg.dropout,
    )
    model = CellClassifier(arch_cfg, mean, scale, mask)
    return _Built(model, arch_cfg, gene_sets_used, n_programs, mean, mask)


def _members(
    first: CellClassifier,
    built: _Built,
    genes: list[str],
    X: Matrix,
    y: np.ndarray,
    rows: np.ndarray | None,
    cfg: TrainConfig,
    epochs: int,
    progress: bool,
) -> CellClassifier:
    """With ``cfg.ensemble`` > 1: the network ``first`` and ``ensemble - 1`` more, each
    from seed ``cfg.seed + k``, fitted on ``rows`` (None: every cell) for ``epochs`` epochs,
    held side by side in one network that averages their logits."""
    if cfg.ensemble == 1:
        return first
    members = [first]
    every = np.arange(len(y)) if rows is None else rows
    for k in range(1, cfg.ensemble):
        member_cfg = dataclasses.replace(cfg, seed=cfg.seed + k)
        member = _build(genes, X, rows, int(y.max()) + 1, member_cfg).model
        _fit(member, X, y, every, None, member_cfg, progress, epochs=epochs)
        members.append(member)
    return ensemble(members, built.mask)


#: validation cells kept in memory when the matrix streams from disk (a stratified sample: each
#: epoch's validation loss and the calibration's temperature are computed on them)
STREAM_VAL_CELLS = 20_000


def _model_input(X: Matrix, keep: np.ndarray) -> Matrix:
    """The columns ``keep`` of the normalised matrix. A streamed
    :class:`~cellexplain.models.backed.FileMatrix` whose selected genes store at most
    :data:`~cellexplain.models.data.IN_MEMORY_VALUES` values is read into memory (training then
    runs as on a matrix read whole, with the same result); a larger one stays on disk."""
    selected = X if len(keep) == X.shape[1] else X[:, keep]
    if not isinstance(selected, FileMatrix):
        return selected
    if selected.stored_values <= IN_MEMORY_VALUES:
        log.info(
            "the model input (%d genes, %d stored values) fits in memory: read whole",
            selected.shape[1], selected.stored_values,
        )  # fmt: skip
        return selected.take(np.arange(selected.shape[0]))
    log.info(
        "the model input (%d genes, %d stored values) streams from disk, a block of rows at "
        "a time", selected.shape[1], selected.stored_values,
    )  # fmt: skip
    return selected


def fit(data: LabelledData, cfg: TrainConfig, progress: bool = True) -> Fitted:
    """Train and evaluate (model and baseline, on the test split), without exporting."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    classes = check_labels(data.labels, cfg.min_cells_per_class)
    y = np.searchsorted(np.asarray(classes), data.labels).astype(np.int64)
    split = stratified_split(y, cfg.seed, cfg.val_fraction, cfg.test_fraction)

    if cfg.n_top_genes is not None:
        keep = select_variable_genes(data.X, cfg.n_top_genes, split.train)
        selection = f"highly_variable:{len(keep)}"
    else:
        keep = np.arange(len(data.genes))
        selection = "all"
    genes = [data.genes[i] for i in keep]
    X = _model_input(data.X, keep)
    yte = y[split.test]
    # the validation cells, in memory: all of them, or a stratified sample when X streams
    val_rows = split.val
    if isinstance(X, FileMatrix):
        val_rows = _sample(split.val, y, STREAM_VAL_CELLS, np.random.default_rng(cfg.seed))
    Xv = X.take(val_rows, "validation sample") if isinstance(X, FileMatrix) else X[val_rows]
    yv = y[val_rows]

    built = _build(genes, X, split.train, len(classes), cfg)
    model = built.model
    l2: float | None = None
    converged: bool | None = None
    if cfg.arch == "linear":  # convex: fitted to its unique solution, no epochs
        l2 = cfg.l2
        if isinstance(X, FileMatrix):
            log.warning(
                "linear reads the streamed file once per L-BFGS iteration (up to %d): on a "
                "matrix this size mlp or programs train in a few passes, or --n-top-genes "
                "shrinks the model input until it fits in memory",
                LBFGS_MAX_ITER * LBFGS_ROUNDS,
            )
        epochs, distance = _fit_convex(model, X, y, split.train, l2, progress)
        best_epoch = epochs
        converged = distance <= CONVERGED_REL
        if not converged:
            log.warning(
                "the linear fit stopped after %d L-BFGS iterations short of the optimum "
                "(up to %.0f%% of |W| away): a larger --l2 converges",
                epochs, 100 * distance,
            )  # fmt: skip
    else:
        epochs, best_epoch = _fit(model, X, y, split.train, (Xv, yv), cfg, progress)
        model = _members(model, built, genes, X, y, split.train, cfg, best_epoch, progress)

    test_logits = predict_rows(model, X, split.test)
    pred = test_logits.argmax(1)
    calibration: Calibration | None = None
    if cfg.calibrate:
        every_val = np.arange(len(yv))
        calibration = _calibrate(predict_rows(model, Xv, every_val), yv, test_logits, yte)
    model_scores = scores(yte, pred, classes)
    lr_pred, lr_cells = _baseline(X, y, split.train, split.test, cfg.seed)
    lr_scores = scores(yte, lr_pred, classes)
    log.info(
        "test macro-F1: %s %.3f, logistic regression %.3f (fitted on %d cells)",
        cfg.arch,
        model_scores.macro_f1,
        lr_scores.macro_f1,
        lr_cells,
    )
    chosen_on_val = (
        f"to the optimum of its convex objective, L2 {l2:g}, in {epochs} L-BFGS iterations; "
        f"the {len(split.val)} validation cells unused: there are no epochs to choose"
        if converged
        else f"L2 {l2:g}, stopped after {epochs} L-BFGS iterations SHORT OF the optimum of its "
        "convex objective"
        if l2 is not None
        else f"early stopping on the {len(split.val)} validation cells"
        if len(val_rows) == len(split.val)
        else f"early stopping on {len(val_rows)} of the {len(split.val)} validation cells (a "
        "stratified sample kept in memory: the matrix streamed from disk)"
    )
    how = (
        f"a model fitted on the train split ({len(split.train)} cells, {chosen_on_val}), "
        f"scored on the {len(split.test)} test cells"
    )
    refit_cells: int | None = None
    check_x = dense(X, split.test[:MAX_CHECK_CELLS])
    if cfg.refit:
        # the split chose the epochs and scored the recipe; the exported model is the same
        # recipe fitted on every labelled cell for that many epochs (gene selection and
        # standardisation computed on all of them too: no labels involved)
        if cfg.n_top_genes is not None:
            keep = select_variable_genes(data.X, cfg.n_top_genes)
            genes = [data.genes[i] for i in keep]
            X = _model_input(data.X, keep)
        every = np.arange(len(y))
        built = _build(genes, X, None, len(classes), cfg)
        model = built.model
        if l2 is not None:
            refit_iterations, distance = _fit_convex(model, X, y, every, l2, progress)
            converged = converged and distance <= CONVERGED_REL
            recipe = (
                f"with the same objective (L2 {l2:g}), "
                + ("to its optimum" if distance <= CONVERGED_REL else "SHORT OF its optimum")
                + f" in {refit_iterations} L-BFGS iterations"
            )
        else:
            _fit(model, X, y, every, None, cfg, progress, epochs=best_epoch)
            model = _members(model, built, genes, X, y, None, cfg, best_epoch, progress)
            recipe = f"for the {best_epoch} epochs the split chose"
        refit_cells = len(y)
        check_x = dense(X, split.test[:MAX_CHECK_CELLS])  # the checks need inputs, not unseen
        how += (
            f"; the exported model is that recipe refit on all {len(y)} cells {recipe} (no "
            "cell left out, so these test scores estimate it: it has seen more cells than the "
            "scored model)"
        )
    n_programs, arch_cfg, gene_sets_used = built.n_programs, built.arch_cfg, built.gene_sets_used
    if calibration is not None:  # folded into the exported model's last layer
        last = [m for m in model.net if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.weight.div_(calibration.temperature)
            last.bias.div_(calibration.temperature)
    fitted_rows = np.arange(len(y)) if cfg.refit else split.train
    reference, novelty_card = _novelty(X, y, fitted_rows, cfg)

    widths = [len(genes)] + [m.out_features for m in model.net if isinstance(m, torch.nn.Linear)]
    train_counts = np.bincount(y, minlength=len(classes))
    base_card = dict(
        name=cfg.name,
        version=cfg.version,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        cellexplain_version=__version__,
        description=f"{cfg.arch} classifier of {data.label_key} trained on {data.source}",
        genes=genes,
        classes=classes,
        unassigned_threshold=cfg.unassigned_threshold,
        preprocessing=Preprocessing(
            detected_training_input=data.detection.kind,
            detection_reason=data.detection.reason,
            gene_selection=selection,
            n_genes_in_training_data=len(data.genes),
        ),
        architecture=Architecture(
            kind=cfg.arch,
            layer_sizes=widths,
            n_programs=n_programs,
            n_free_units=arch_cfg.n_free,
            dropout=cfg.dropout,
            n_parameters=int(sum(p.numel() for p in model.parameters())),
            ensemble=cfg.ensemble,
            l2=l2,
            converged=converged,
        ),
        gene_sets=gene_sets_used,
        novelty=novelty_card,
        training_data=TrainingData(
            source=data.source,
            sha256=data.sha256,
            n_cells=len(y),
            n_genes=len(data.genes),
            label_key=data.label_key,
            layer=data.layer,
            gene_key=data.gene_key,
        ),
        split=Split(
            seed=cfg.seed,
            train=len(split.train),
            validation=len(split.val),
            test=len(split.test),
            class_counts={c: int(n) for c, n in zip(classes, train_counts, strict=True)},
            refit_cells=refit_cells,
        ),
        calibration=calibration,
        metrics=Metrics(
            model=model_scores,
            logistic_regression=lr_scores,
            epochs_trained=epochs,
            best_epoch=best_epoch,
            how_obtained=how,
        ),
    )
    return Fitted(model, base_card, check_x, built.mean, reference)


#: equal-width confidence bins of the expected calibration error
ECE_BINS = 15


def expected_calibration_error(
    confidence: np.ndarray, right: np.ndarray, n_bins: int = ECE_BINS
) -> float:
    """ECE of the top class (``confidence``: its probability per cell; ``right``: whether it
    is the true class): |accuracy - mean confidence| over equal-width confidence bins,
    weighted by the bins' shares of the cells."""
    conf = np.asarray(confidence, dtype=np.float64)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        inside = bins == b
        total += inside.mean() * abs(right[inside].mean() - conf[inside].mean())
    return float(total)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _calibrate(
    val_logits: np.ndarray, y_val: np.ndarray, test_logits: np.ndarray, y_test: np.ndarray
) -> Calibration:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising the validation cells'
    negative log-likelihood of softmax(logits / T); judged by the test split's ECE."""
    from scipy.optimize import minimize_scalar

    lv = val_logits.astype(np.float64)

    def nll(log_t: float) -> float:
        z = lv / np.exp(log_t)
        z = z - z.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y_val)), y_val]))

    best = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    t = float(np.exp(best.x))
    lt = test_logits.astype(np.float64)
    return Calibration(
        temperature=t,
        fitted_on=f"the {len(y_val)} validation cells' logits of the model fitted on the "
        "train split",
        n_bins=ECE_BINS,
        ece_test_before=expected_calibration_error(_softmax(lt).max(1), lt.argmax(1) == y_test),
        ece_test_after=expected_calibration_error(_softmax(lt / t).max(1), lt.argmax(1) == y_test),
    )


def _sample(rows: np.ndarray, y: np.ndarray, n_max: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``n_max`` of ``rows`` (when ``n_max`` is at least 5 per class), each class in
    proportion (at least 5 of each, or all of a smaller class), sorted."""
    if len(rows) <= n_max:
        return rows
    classes, sizes = np.unique(y[rows], return_counts=True)
    take = np.minimum(sizes, np.maximum(5, np.round(n_max * sizes / len(rows)).astype(int)))
    while take.sum() > n_max and (take > 5).any():  # rounding up: trim the largest shares
        take[np.argmax(np.where(take > 5, take, -1))] -= 1
    parts = [rng.choice(rows[y[rows] == c], size=int(k), replace=False)
             for c, k in zip(classes, take, strict=True)]  # fmt: skip
    return np.sort(np.concatenate(parts))


def _novelty(
    X: Matrix, y: np.ndarray, rows: np.ndarray, cfg: TrainConfig
) -> tuple[NoveltyReference, Novelty]:
    """The novelty score's reference, fitted on the cells the exported model was fitted on
    (``rows``; at most :data:`~cellexplain.models.novelty.MAX_VALUES` values dense, each class
    in proportion), with its cross-fitted calibration."""
    rng = np.random.default_rng(cfg.seed)
    ref_rows = _sample(rows, y, max(200, MAX_VALUES // X.shape[1]), rng)
    x_ref = dense(X, ref_rows, "novelty reference")
    reference = fit_reference(x_ref, y[ref_rows], seed=cfg.seed)
    # the calibration cells' own novelty (each a share of the others: ~1 - threshold)
    share = np.searchsorted(reference.calibration, reference.calibration, side="left")
    flagged = float((share / len(reference.calibration) >= cfg.novelty_threshold).mean())
    log.info(
        "novelty: %d principal components of %d cells; %.1f%% of them at or above %g "
        "(cross-fitted)",
        reference.n_components, len(ref_rows), 100 * flagged, cfg.novelty_threshold,
    )  # fmt: skip
    card = Novelty(
        n_components=reference.n_components,
        reference_cells=len(ref_rows),
        calibration_cells=reference.n_calibration,
        calibration_flagged=flagged,
        threshold=cfg.novelty_threshold,
    )
    return reference, card
