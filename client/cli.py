"""The ``cellexplain`` command line.

Imports only what the base install has at start; each command imports its layer when run
(``annotate --local`` the server's core, ``train`` torch), and a missing extra is an error that
names the ``pip install`` to run.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from cellexplain.models.card import ModelCard
from cellexplain.models.errors import CellexplainError

if TYPE_CHECKING:
    from cellexplain.models.attribution import AttributionSpec
    from cellexplain.models.data import LabelledData
    from cellexplain.models.train import TrainConfig

log = logging.getLogger("cellexplain")


#: third-party modules of the optional layers -> the extra that installs them
EXTRAS = {
    "onnxruntime": "serve",
    "bentoml": "serve",
    "fastapi": "serve",
    "starlette": "serve",
    "prometheus_client": "serve",
    "simdjson": "serve",
    "orjson": "serve",
    "grpc_health": "serve",
    "grpc_reflection": "serve",
    "torch": "train",
    "captum": "train",
    "scanpy": "train",
    "sklearn": "train",
    "onnx": "train",
    "matplotlib": "report",
}


def _with_field(message: str, field: str | None) -> str:
    """An error's message, led by its field unless the message names it already."""
    return message if not field or field in message else f"{field}: {message}"


class CLIError(Exception):
    """A user error: printed as ``error: ...`` with exit status 2."""


def _at_least(low: int) -> Any:
    """An argparse type: an integer of at least ``low`` (a clear usage error otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from e
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _number(within: Callable[[float], bool], what: str) -> Callable[[str], float]:
    """An argparse type: a number for which ``within`` holds (a usage error naming ``what``
    otherwise)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from e
        if not within(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


#: a dropout probability
_fraction = _number(lambda v: 0 <= v < 1, "in [0, 1)")
#: a penalty
_positive = _number(lambda v: 0 < v < float("inf"), "a finite number above 0")


def _hidden(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths, got {text!r}") from e
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError("widths must be positive")
    return sizes


def _add_training_args(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data")
    data.add_argument(
        "--data",
        help="labelled .h5ad or AnnData .zarr (default: scanpy's bundled pbmc68k_reduced); a "
        "matrix too big for memory streams from disk, a block of rows at a time",
    )
    data.add_argument("--label-key", help="obs column with cell-type labels (default bulk_labels)")
    data.add_argument("--gene-key", help="var column with gene symbols (default: var_names)")
    data.add_argument("--layer", help="'raw' for .raw, a layer name, or omit for X")
    data.add_argument(
        "--n-top-genes", type=_at_least(1), help="keep the N most variable genes (default all)"
    )
    # the stratified train/validation/test split needs 2 cells of a class at the very least
    data.add_argument("--min-cells-per-class", type=_at_least(2), default=5)
    model = p.add_argument_group("model")
    model.add_argument("--gene-sets", help="GMT file for programs (default: bundled Hallmark)")
    model.add_argument("--n-free", type=_at_least(0), default=64, help="programs: free dense units")
    model.add_argument(
        "--hidden", type=_hidden, help="hidden widths after the first layer, e.g. 64"
    )
    model.add_argument("--dropout", type=_fraction, default=0.2)
    model.add_argument(
        "--l2",
        type=_positive,
        help="linear: the L2 penalty of its convex objective (default 0.01; above 0)",
    )
    model.add_argument(
        "--max-epochs",
        type=_at_least(1),
        default=300,
        help="mlp, programs (linear is fitted to its convex optimum by L-BFGS)",
    )
    model.add_argument(
        "--patience", type=_at_least(1), default=30, help="early-stopping patience (epochs)"
    )
    model.add_argument("--seed", type=int, default=0)
    model.add_argument(
        "--ensemble",
        type=_at_least(1),
        default=1,
        help="mlp, programs: average this many networks trained from seeds --seed, --seed+1, "
        "... in one graph (3: top-10 genes agree between independent ensembles at Jaccard "
        "0.63-0.67, against 0.46-0.53 between single networks; serving is 4.6-5.4x "
        "slower)",
    )
    model.add_argument(
        "--no-refit",
        dest="refit",
        action="store_false",
        help="export the model fitted on the train split (default: after the split has chosen "
        "the epochs and scored it, refit on every labelled cell)",
    )
    attr = p.add_argument_group("attribution (computed inside the ONNX graph)")
    attr.add_argument(
        "--attribution",
        choices=["integrated_gradients", "deeplift", "gradient_x_input"],
        default="integrated_gradients",
    )
    attr.add_argument("--steps", type=int, default=32, help="integrated-gradients steps")
    attr.add_argument(
        "--rule",
        default="riemann_middle",
        choices=[
            "riemann_middle",
            "riemann_trapezoid",
            "riemann_left",
            "riemann_right",
            "gausslegendre",
        ],
        help="integration rule (Captum's names)",
    )
    attr.add_argument("--baseline", choices=["zero", "mean"], default="zero")
    attr.add_argument(
        "--precision",
        choices=["float32", "float16"],
        default="float32",
        help="arithmetic inside the served graph; float16 halves GPU memory traffic and is "
        "checked against float32 at export (the error is recorded in the model card)",
    )


def _config(args: argparse.Namespace, arch: str, name: str) -> TrainConfig:
    from cellexplain.models.train import TrainConfig

    spec = _spec(args)
    return TrainConfig(
        arch=arch,  # type: ignore[arg-type]
        name=name,
        n_top_genes=args.n_top_genes,
        hidden=args.hidden,
        n_free=args.n_free,
        gene_sets=args.gene_sets,
        dropout=args.dropout,
        **({} if getattr(args, "l2", None) is None else {"l2": args.l2}),
        max_epochs=args.max_epochs,
        patience=args.patience,
        seed=args.seed,
        min_cells_per_class=args.min_cells_per_class,
        attribution=spec,
        precision=args.precision,
        refit=getattr(args, "refit", True),
        ensemble=getattr(args, "ensemble", 1),
    )


def _check_train_args(args: argparse.Namespace, out: Path) -> None:
    """What can be told of the training's files before any is read (and before torch loads):
    the data file, the gene sets, and a place where ``out`` can be written."""
    if args.data is not None:
        if args.label_key is None:
            raise CLIError("--label-key is required with --data (the obs column holding labels)")
        data = Path(args.data)
        if not data.exists():
            raise CLIError(f"data file not found: {args.data}")
        if not data.is_file():
            raise CLIError(f"--data: {args.data} is a folder, not an .h5ad file")
        import h5py

        if not h5py.is_hdf5(data):
            raise CLIError(f"--data: {args.data} is not an .h5ad file (not HDF5)")
    if args.l2 is not None and args.arch != "linear":
        raise CLIError(f"--l2 is for --arch linear, not {args.arch}")
    if args.ensemble > 1 and args.arch == "linear":
        raise CLIError(
            "--ensemble is for mlp and programs: the linear model is its objective's unique "
            "optimum, the same from every seed"
        )
    if args.gene_sets is not None:
        if args.arch != "programs":
            raise CLIError(f"--gene-sets is for --arch programs, not {args.arch}")
        if not Path(args.gene_sets).is_file():
            raise CLIError(f"gene-set file not found: {args.gene_sets}")
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out: {out} exists and is not a folder")
    # the nearest folder that exists must take a file (tried: permissions say nothing to root
    # or of a read-only or special file system)
    where = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    try:
        with tempfile.TemporaryFile(dir=where, prefix=".cellexplain-"):
            pass
    except OSError as e:
        raise CLIError(f"--out: cannot write {out} ({where}: {e.strerror or e})") from e


def _spec(args: argparse.Namespace) -> AttributionSpec:
    """The attribution the flags ask for (onnx, not torch); a bad value is a CLIError."""
    from cellexplain.models.attribution import AttributionSpec

    try:
        return AttributionSpec(
            method=args.attribution, n_steps=args.steps, rule=args.rule, baseline=args.baseline
        )
    except ValueError as e:
        raise CLIError(str(e)) from e


def _load(args: argparse.Namespace) -> LabelledData:
    from cellexplain.models.data import load_labelled

    if args.data is not None and args.label_key is None:
        raise CLIError("--label-key is required with --data (the obs column holding labels)")
    return load_labelled(
        args.data,
        args.label_key,
        args.gene_key,
        args.layer,
        progress=not getattr(args, "quiet", True),
    )


def default_name(args: argparse.Namespace) -> str:
    """A model's name when ``--name`` is not given: ``pbmc-ARCH`` for the bundled data, else
    made from the data file and the label key (``lung-atlas-cell_type-programs``): a model of a
    lab's own data never takes the demo's name, the one the default server serves."""
    if args.data is None:
        return f"pbmc-{args.arch}"
    stem = f"{Path(args.data).stem}-{args.label_key}-{args.arch}".lower()
    name = re.sub(r"[^a-z0-9._-]+", "-", stem).strip("-._")[:63].strip("-._")
    return name or f"model-{args.arch}"


def cmd_train(args: argparse.Namespace) -> int:
    from cellexplain.models.store import check_name, import_model

    # the arguments are checked before torch is imported (seconds), so a mistake is told at once
    name = check_name(args.name or default_name(args))
    out = Path(args.out or Path("artifacts") / name)
    _check_train_args(args, out)
    _spec(args)
    from cellexplain.models.train import train

    data = _load(args)
    print(
        f"data: {data.source}: {len(data.labels)} cells x {len(data.genes)} genes; "
        f"input detected as {data.detection.kind} ({data.detection.reason})"
    )
    card = train(data, _config(args, args.arch, name), out, progress=not args.quiet)
    _print_card_summary(card, out)
    if args.import_:
        print(f"imported into the BentoML store as {import_model(out, replace=args.force)}")
    return 0


def _print_card_summary(card: ModelCard, out: Path) -> None:
    m = card.metrics
    assert m is not None  # a model trained here
    c = card.checks
    print(f"wrote {out / 'model.onnx'} and {out / 'model.json'}")
    arch = card.architecture
    how = (
        f"best epoch {m.best_epoch}/{m.epochs_trained}"
        if arch.l2 is None
        else f"fitted to its convex optimum (L2 {arch.l2:g})"
        if arch.converged
        else f"fit stopped SHORT of its convex optimum (L2 {arch.l2:g}): try a larger --l2"
    )
    print(
        f"  {card.architecture.kind}: {len(card.genes)} genes -> {len(card.classes)} classes, "
        f"{card.architecture.n_parameters} parameters, {how}"
    )
    print(
        f"  test accuracy {m.model.accuracy:.3f}, macro-F1 {m.model.macro_f1:.3f} "
        f"(logistic regression: {m.logistic_regression.accuracy:.3f}, "
        f"{m.logistic_regression.macro_f1:.3f})"
    )
    print(
        f"  attributions: {card.attribution.method}, vs {c.captum_method}: rel. error "
        f"{c.captum_rel_error:.1e}; completeness error {c.completeness_rel_error:.1e} "
        f"(relative); probabilities max error {c.probabilities_max_abs_error:.1e}"
    )


def cmd_compare(args: argparse.Namespace) -> int:
    """Train every architecture on the same splits over several seeds; print a table."""
    from cellexplain.models.train import train

    data = _load(args)
    args.refit = False  # the split's scores are what is compared; no model is kept
    rows: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            args.seed = seed
            for arch in args.archs:
                card = train(
                    data, _config(args, arch, f"cmp-{arch}"), Path(tmp) / arch, progress=False
                )
                m = card.metrics
                assert m is not None  # trained here
                rows.setdefault(arch, []).append((m.model.accuracy, m.model.macro_f1))
                if arch == args.archs[0]:
                    rows.setdefault("logistic regression (baseline)", []).append(
                        (m.logistic_regression.accuracy, m.logistic_regression.macro_f1)
                    )
                print(
                    f"seed {seed} {arch}: macro-F1 {m.model.macro_f1:.3f} "
                    f"(logistic regression {m.logistic_regression.macro_f1:.3f})",
                    flush=True,
                )
    print(f"\n(mean ± sd over {args.seeds} seeds)")
    print("\n".join(score_table(rows)))
    return 0


def score_table(rows: dict[str, list[tuple[float, float]]]) -> list[str]:
    """A Markdown table of (accuracy, macro-F1) per model over seeds: mean ± sd."""
    import numpy as np

    lines = [
        "| model | test accuracy (mean ± sd) | test macro-F1 (mean ± sd) |",
        "|---|---:|---:|",
    ]
    for name, vals in rows.items():
        a = np.asarray(vals)
        lines.append(
            f"| {name} | {a[:, 0].mean():.3f} ± {a[:, 0].std():.3f} "
            f"| {a[:, 1].mean():.3f} ± {a[:, 1].std():.3f} |"
        )
    return lines


def cmd_models_import(args: argparse.Namespace) -> int:
    from cellexplain.models.store import import_model

    print(import_model(args.dir, args.name, replace=args.force))
    return 0


def cmd_models_import_celltypist(args: argparse.Namespace) -> int:
    """A CellTypist model (.pkl), read without executing it, exported and imported."""
    from cellexplain.models.celltypist import (
        CellTypistModelError,
        export_celltypist,
        read_celltypist,
    )
    from cellexplain.models.errors import StoreError
    from cellexplain.models.store import check_name, import_model

    src = Path(args.model)
    if not src.is_file():
        raise CLIError(f"no CellTypist model at {src}")
    name = args.name or re.sub(r"[^a-z0-9._-]+", "-", src.stem.lower()).strip("-._") or "celltypist"
    try:
        check_name(name)
        model = read_celltypist(src)
    except (CellTypistModelError, StoreError) as e:
        raise CLIError(str(e)) from e
    out = Path(args.out or Path("artifacts") / name)
    card = export_celltypist(model, src, name, out)
    print(
        f"read {src.name}: {model.estimator}, {len(card.genes)} genes, {len(card.classes)} "
        f"cell types; wrote {out / 'model.onnx'} and {out / 'model.json'} (graph checked: "
        f"attributions {card.checks.captum_rel_error:.1e} from numpy's float64)"
    )
    print(f"imported into the BentoML store as {import_model(out, replace=args.force)}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    """The store's models, or with ``--url`` (or without the ``serve`` extra, which the
    store needs) the models a running service serves."""
    import importlib.util

    header = f"{'tag':<40} {'arch':<9} {'genes':>6} {'classes':>7} {'macro-F1':>8}  attribution"
    if args.url is not None or importlib.util.find_spec("bentoml") is None:
        return _list_served(args.url, header)
    from cellexplain.models.store import list_models

    models = list_models()
    if not models:
        print("no cellexplain models in the BentoML store (cellexplain models import DIR)")
        return 0
    print(header)
    for m in models:
        c = m.card
        print(
            f"{m.tag:<40} {c.architecture.kind:<9} {len(c.genes):>6} {len(c.classes):>7} "
            f"{_macro_f1(c):>8}  {c.attribution.method}"
        )
    return 0


def _list_served(url: str | None, header: str) -> int:
    from cellexplain.client.remote import Client, ClientError, default_url

    try:
        with Client(url, retries=0) as client:
            listed = client.models().models
    except ClientError as e:  # unreachable too
        raise CLIError(f"{e} (status {e.status})") from e
    print(f"served by {url or default_url()}:")
    print(header + "  default")
    for m in listed:
        print(
            f"{m.tag:<40} {m.architecture:<9} {m.n_genes:>6} {len(m.classes):>7} "
            f"{'-' if m.test_macro_f1 is None else f'{m.test_macro_f1:.3f}':>8}  "
            f"{m.attribution_method:<21}  {'yes' if m.default else ''}"
        )
    return 0


def _macro_f1(card: ModelCard) -> str:
    """A stored model's held-out macro-F1, or ``-`` for an imported one."""
    return "-" if card.metrics is None else f"{card.metrics.model.macro_f1:.3f}"


def cmd_models_delete(args: argparse.Namespace) -> int:
    from cellexplain.models.store import delete_model

    for tag in delete_model(args.tag, args.all_versions):
        print(f"deleted {tag}")
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    from cellexplain.models.store import get_model

    stored = get_model(args.tag)
    card = stored.card
    if args.json:
        print(card.model_dump_json(indent=2))
        return 0
    a = card.architecture
    if card.metrics is not None and card.training_data is not None:
        m, data = card.metrics.model, card.training_data
        baseline = card.metrics.logistic_regression.macro_f1
        source = [
            ("training data", f"{data.source} ({data.n_cells} cells, labels {data.label_key})"),
            ("held-out scores", f"accuracy {m.accuracy:.3f}, macro-F1 {m.macro_f1:.3f} "
                                f"(logistic regression {baseline:.3f})"),
        ]  # fmt: skip
    elif card.origin is not None:
        o = card.origin
        version = o.description.get("version") or "no version"
        source = [("imported", f"{o.kind} model {o.file} ({o.estimator}, {version}), "
                               f"sha256 {o.sha256[:16]}; held-out scores: none")]  # fmt: skip
    else:
        source = []
    rows = [
        ("tag", stored.tag),
        ("description", card.description),
        ("created", f"{card.created_at} (cellexplain {card.cellexplain_version})"),
        ("architecture", f"{a.kind} {a.layer_sizes}" + (f", {a.ensemble} networks averaged"
                                                         if a.ensemble > 1 else "")),
        ("genes", f"{len(card.genes)}: {', '.join(card.genes[:8])}, ..."),
        ("classes", f"{len(card.classes)}: {', '.join(card.classes)}"),
        *source,
        ("attributions", card.attribution.completeness if card.attribution.exact
                         else f"{card.attribution.method}, {card.attribution.n_steps} steps, "
                              f"baseline {card.attribution.baseline}"),
        ("thresholds", f"confidence {card.unassigned_threshold:g}"
                       + (f", novelty {card.novelty.threshold:g}" if card.novelty else "")),
        ("calibration", "none" if card.calibration is None
                        else f"temperature {card.calibration.temperature:.3f}"),
        ("export checks", "passed" if card.checks.passed else "FAILED"),
        ("onnx", f"{card.onnx.precision}, opset {card.onnx.opset}, sha256 {card.onnx.sha256[:16]}"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(f"(the whole card: cellexplain models show {args.tag} --json)")
    return 0


#: --max-missing-fraction's default (measured: service/core.py, WARN_MISSING_SHARE)
MAX_MISSING_FRACTION = 0.5

#: the annotation options' flags: made from AnnotateOptions' fields (their types, choices,
#: defaults and descriptions), named as below where the flag is not the field's name
OPTION_FLAGS = {"unassigned_threshold": "--threshold"}
#: options the command does not take, and why
NOT_FLAGS = {"return_probabilities": "the annotated file always holds every class's probability"}
#: what the file gets, said beside a flag's description
FLAG_NOTES = {
    "attributions": "top_k: obs['cellexplain_top_genes']; full also writes "
    "obsm['cellexplain_attributions'] (cells x genes) and the program attributions",
}


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per annotation option (:class:`~cellexplain.api.schemas.AnnotateOptions`), but
    those of :data:`NOT_FLAGS`."""
    from cellexplain.api.schemas import AnnotateOptions

    for name, field in AnnotateOptions.model_fields.items():
        if name in NOT_FLAGS:
            continue
        flag = OPTION_FLAGS.get(name, "--" + name.replace("_", "-"))
        kind = field.annotation
        args = get_args(kind)
        kw: dict[str, Any] = {"dest": name, "default": field.default}
        if args and all(isinstance(a, str) for a in args):  # a Literal: its values
            kw["choices"] = list(args)
        else:
            kw["metavar"] = flag.lstrip("-").upper().replace("-", "_")
            if kind is int:
                kw["type"] = int
            elif float in (kind, *args):
                kw["type"] = float
        help_text = FLAG_NOTES.get(name, field.description or "")
        default = "" if field.default is None else " (default: %(default)s)"
        parser.add_argument(flag, help=help_text.replace("%", "%%") + default, **kw)


def options_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~cellexplain.api.schemas.AnnotateOptions` the flags give (validated)."""
    from cellexplain.api.schemas import AnnotateOptions

    given = {n: getattr(args, n) for n in AnnotateOptions.model_fields if n not in NOT_FLAGS}
    return AnnotateOptions(**given)


def _validation_message(e: ValueError) -> str:
    errors = getattr(e, "errors", None)
    if not callable(errors):
        return str(e)
    parts = []
    for err in errors():
        name = str(err["loc"][0]) if err.get("loc") else ""
        flag = OPTION_FLAGS.get(name, "--" + name.replace("_", "-"))
        parts.append(f"{flag}: {err['msg']}")
    return "; ".join(parts)


def cmd_annotate(args: argparse.Namespace) -> int:
    """Annotate an .h5ad file of any size, through a running service or in-process."""
    import asyncio

    from cellexplain.api.errors import ServiceError
    from cellexplain.client.pipeline import LocalBackend, annotate_file, cancel_on_sigterm
    from cellexplain.client.remote import ClientError

    try:
        options = options_from_args(args)
    except ValueError as e:  # pydantic's, for a value argparse could not check (a range)
        raise CLIError(_validation_message(e)) from e

    async def run() -> int:
        cancel_on_sigterm()
        backend: Any
        if args.local:
            from cellexplain.service.core import Annotator
            from cellexplain.service.settings import Settings, SettingsError

            settings = Settings(
                models=[] if args.model_dir else [args.model or "pbmc-programs"],
                model_dirs=[args.model_dir] if args.model_dir else [],
                max_cells_per_request=max(args.chunk_size or 10_000, 1),
                workers=1,  # this process alone: onnxruntime gets every usable CPU
            )
            try:
                backend = LocalBackend(Annotator.from_settings(settings))
            except SettingsError as e:  # the server's variable names, said as this command's flags
                text = str(e).replace("CELLEXPLAIN_MODEL_DIRS:", "--model-dir:")
                raise CLIError(text.replace("CELLEXPLAIN_MODELS:", "--model:")) from e
        else:
            from cellexplain.client.remote import AsyncClient

            backend = AsyncClient(
                args.url,
                transport=args.transport,
                grpc_target=args.grpc,
                api_key=os.environ.get("CELLEXPLAIN_CLIENT_API_KEY") or None,
            )
        try:
            stats = await annotate_file(
                backend,
                args.input_file,
                args.out,
                options,
                gene_key=args.gene_key,
                layer=args.layer,
                chunk_size=args.chunk_size,
                concurrency=args.concurrency,
                cluster_key=args.cluster_key,
                overwrite=args.force,
                allow_external=args.allow_external_data,
                progress=not args.quiet,
                max_missing_fraction=args.max_missing_fraction,
                transpose=args.transpose,
                genome=args.genome,
            )
        finally:
            await backend.close()
        for warning in stats.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(
            f"annotated {stats.n_cells} cells in {stats.seconds:.1f} s "
            f"({stats.cells_per_second:,.0f} cells/s) -> {stats.output}"
        )
        return 0

    try:
        return asyncio.run(run())
    except ServiceError as e:
        raise CLIError(_with_field(e.message, e.field)) from e
    except ClientError as e:
        raise CLIError(f"{e} (status {e.status})") from e
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: no output written", file=sys.stderr)
        return 130


#: the formats a command reads, as its help says
READABLE_HELP = (
    ".h5ad; an AnnData .zarr store; a 10x Genomics HDF5 (.h5, Cell Ranger 2 or 3+); a 10x "
    "Matrix Market folder or its matrix.mtx.gz; .loom; .csv/.tsv (cells x genes, .gz too). "
    "Told from the content, not the name"
)


def _add_reader_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--transpose",
        action="store_true",
        help="a .csv/.tsv holds genes as rows and cells as columns",
    )
    p.add_argument("--genome", help="a 10x HDF5 file of several genomes: the one to read")


def cmd_convert(args: argparse.Namespace) -> int:
    """Any readable file of cells to an .h5ad (what the server's upload door takes)."""
    from cellexplain.api.errors import ServiceError
    from cellexplain.client.readers import read

    src, dst = Path(args.input_file), Path(args.out)
    if dst.suffix != ".h5ad":
        raise CLIError(f"--out: write an .h5ad (got {dst.name})")
    if dst.exists() and not args.force:
        raise CLIError(f"{dst} exists; pass --force to replace it")
    try:
        adata = read(src, transpose=args.transpose, genome=args.genome)
    except ServiceError as e:
        raise CLIError(_with_field(e.message, e.field)) from e
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {adata.n_obs} cells x {adata.n_vars} genes -> {dst}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Pictures of an annotated file: an HTML page, or PNG files with --png."""
    from cellexplain.api.errors import ServiceError
    from cellexplain.client.report import write_pngs, write_report

    try:
        if args.png:
            for p in write_pngs(args.input_file, args.out, args.top):
                print(p)
        else:
            print(write_report(args.input_file, args.out, args.top))
    except ServiceError as e:
        raise CLIError(e.message) from e
    return 0


class _WithDefaults(argparse.HelpFormatter):
    """Help that shows each flag's default (not the empty ones: None, False), unless its text
    already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.default is None or action.default is False or not action.option_strings
        if "%(default)" in text or quiet or action.default == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """:class:`_WithDefaults` for ``parser`` and every subcommand's parser, at any depth."""
    parser.formatter_class = _WithDefaults
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _show_defaults(sub)


def build_parser() -> argparse.ArgumentParser:
    from cellexplain import __version__

    parser = argparse.ArgumentParser(
        prog="cellexplain",
        description="Interpretable cell-type annotation: train, export, serve.",
    )
    parser.add_argument("--version", action="version", version=f"cellexplain {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a classifier and export it (ONNX + model card)")
    p.add_argument("--arch", choices=["linear", "mlp", "programs"], default="programs")
    p.add_argument(
        "--name",
        help="model name (default: pbmc-ARCH for the bundled data; with --data, made from the "
        "file's name, the label key and the architecture)",
    )
    p.add_argument("--out", help="output folder (default artifacts/NAME)")
    p.add_argument(
        "--import",
        dest="import_",
        action="store_true",
        help="also import the result into the BentoML model store",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --import: add this model as the latest version of a name the store already "
        "holds (refused otherwise: servers given the name serve its latest)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_training_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="held-out scores of every architecture vs the baseline")
    p.add_argument(
        "--archs",
        nargs="+",
        default=["linear", "mlp", "programs"],
        choices=["linear", "mlp", "programs"],
    )
    p.add_argument("--seeds", type=int, default=5, help="number of random splits")
    _add_training_args(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "annotate",
        help="annotate a file of cells (.h5ad of any size, .zarr, 10x .h5 or Matrix Market, "
        ".loom, .csv/.tsv) into a new file",
    )
    p.add_argument("input_file", metavar="IN", help=f"the cells: {READABLE_HELP}")
    p.add_argument(
        "--out",
        help="output .h5ad (or .zarr), written atomically (default: beside IN, "
        "IN.cellexplain.h5ad; .zarr for a .zarr input)",
    )
    _add_reader_args(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--url",
        default=None,
        help="service REST URL (default: $CELLEXPLAIN_URL, else http://localhost:3000)",
    )
    where.add_argument("--local", action="store_true", help="run the ONNX graph in-process")
    p.add_argument(
        "--transport", choices=["rest", "grpc"], default="rest", help="how chunks are sent"
    )
    p.add_argument("--grpc", help="gRPC target host:port (default: the URL's host, 50051)")
    # the API key, when the service needs one, comes from CELLEXPLAIN_CLIENT_API_KEY (not a flag:
    # command lines end up in shell history and process lists)
    add_option_flags(p)
    p.add_argument("--model-dir", help="with --local: an artifact folder instead of the store")
    p.add_argument(
        "--chunk-size",
        type=int,
        help="cells per request (default: as many as fill half the server's announced body "
        "limit, measured on the first rows; in-process, 32 MiB of the matrix)",
    )
    p.add_argument("--concurrency", type=int, default=2, help="chunks in flight")
    p.add_argument("--gene-key", help="var column with gene symbols or Ensembl IDs")
    p.add_argument("--layer", help="'raw', a layer name, or omit for X")
    p.add_argument("--cluster-key", help="obs column of clusters: add majority voting")
    p.add_argument(
        "--max-missing-fraction",
        type=_number(lambda v: 0 <= v <= 1, "from 0 to 1"),
        default=MAX_MISSING_FRACTION,
        help="stop, writing nothing, when more than this share of the model's genes is missing "
        "from the file (default %(default)s: with half the genes missing at random, 92%% of "
        "the default model's labels stay the same; 62%% with 80%% missing); 1 never stops",
    )
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--allow-external-data",
        action="store_true",
        help="read an input whose objects take their data from other files (external links, "
        "external storage, virtual datasets); refused by default: what is read is copied into "
        "the output",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_annotate)

    p = sub.add_parser("convert", help="convert a file of cells to .h5ad (the upload's format)")
    p.add_argument("input_file", metavar="IN", help=f"the cells: {READABLE_HELP}")
    p.add_argument("out", metavar="OUT.h5ad")
    _add_reader_args(p)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("report", help="HTML report (or PNGs) of an annotated .h5ad")
    p.add_argument("input_file", metavar="ANNOTATED.h5ad")
    p.add_argument("--out", required=True, help="report.html, or a folder with --png")
    p.add_argument("--png", action="store_true", help="write PNG files into --out instead")
    p.add_argument("--top", type=int, default=10, help="genes per cell type")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("models", help="the BentoML model store")
    msub = p.add_subparsers(dest="models_command", required=True)
    q = msub.add_parser("import", help="save an exported model folder into the store")
    q.add_argument("dir")
    q.add_argument("--name", help="store name (default: the card's name)")
    q.add_argument(
        "--force",
        action="store_true",
        help="add it as the latest version of a name the store already holds",
    )
    q.set_defaults(func=cmd_models_import)
    q = msub.add_parser("delete", help="delete a stored model version (or all of a name's)")
    q.add_argument("tag", help="NAME:VERSION, or NAME with --all-versions")
    q.add_argument("--all-versions", action="store_true", help="every version of NAME")
    q.set_defaults(func=cmd_models_delete)
    q = msub.add_parser(
        "list", help="list cellexplain models in the store, or those a service serves (--url)"
    )
    q.add_argument(
        "--url",
        help="list what the service at this REST URL serves (the default without the serve "
        "extra, at $CELLEXPLAIN_URL, else http://localhost:3000)",
    )
    q.set_defaults(func=cmd_models_list)
    q = msub.add_parser(
        "import-celltypist",
        help="import a CellTypist model (.pkl, read without executing it) into the store",
    )
    q.add_argument("model", metavar="MODEL.pkl")
    q.add_argument("--name", help="store name (default: from the file name)")
    q.add_argument("--out", help="artifact folder (default artifacts/NAME)")
    q.add_argument("--force", action="store_true", help="add a new version of an existing name")
    q.set_defaults(func=cmd_models_import_celltypist)
    q = msub.add_parser("show", help="a stored model's card, in brief (--json: all of it)")
    q.add_argument("tag", help="NAME or NAME:VERSION")
    q.add_argument("--json", action="store_true", help="print the whole card as JSON")
    q.set_defaults(func=cmd_models_show)
    _show_defaults(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (CLIError, CellexplainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        extra = EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(
            f"error: this command needs {e.name}, which comes with cellexplain's {extra!r} "
            f"extra: pip install 'cellexplain[{extra}]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
