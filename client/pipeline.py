"""Annotate ``.h5ad`` files of any size: read in chunks, annotate, write atomically.

Memory stays bounded whatever the file size: the matrix is read a chunk of rows at a time
(dense datasets and CSR matrices, straight from HDF5), at most ``concurrency`` chunks are in
flight, matrices in ``obsm`` are written to disk chunk by chunk, and only a few small values
per cell (label codes, confidence, top genes) are held until the end.

The output is written to a temporary file beside ``--out`` (a copy of the input plus the
annotations) and renamed into place only when complete: an interrupted run never leaves a
half-written or clobbered output, and the input is never opened for writing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anndata as ad
import anndata.io as aio
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from cellexplain.api.annotations import (
    NO_MODEL_GENES,
    PREFIX,
    UNASSIGNED,
    Annotations,
    expression,
    label_colors,
    majority_vote,
    obs_columns,
    obsm_arrays,
)
from cellexplain.api.errors import InvalidInputError, ServiceError, brief
from cellexplain.api.schemas import AnnotateOptions, ModelDetail
from cellexplain.client import readers
from cellexplain.client.remote import (
    SAMPLE_ROWS,
    Chunk,
    ChunkBudget,
    ClientError,
    ordered_window,
    stored_per_row,
    too_large_hint,
)
from cellexplain.models.preprocess import sparse_structure_problem

if TYPE_CHECKING:  # the server's core, imported only by --local (the `serve` extra)
    from cellexplain.service.core import Annotator


class Backend(Protocol):
    """Where chunks are annotated: a running service
    (:class:`~cellexplain.client.remote.AsyncClient`) or the same core in-process
    (:class:`LocalBackend`). Both yield each chunk with its annotations and
    ``uns['cellexplain']``, in order."""

    async def model(self, name: str | None = None) -> ModelDetail: ...

    def annotations(self, chunks: Any, options: AnnotateOptions, concurrency: int = 2) -> Any: ...

    def request_bytes(self, chunk: Chunk, options: AnnotateOptions) -> int: ...

    async def close(self) -> None: ...


class LocalBackend:
    """The annotation core in this process (``--local``): the same ONNX graph, alignment and
    normalisation as the service, no server."""

    def __init__(self, annotator: Annotator) -> None:
        self.annotator = annotator

    async def model(self, name: str | None = None) -> ModelDetail:
        return self.annotator.model_detail(name or self.annotator.default)

    def request_bytes(self, chunk: Chunk, options: AnnotateOptions) -> int:
        """A chunk's bytes in memory (its values, and a sparse one's indices): in-process, the
        body limit bounds what a chunk holds at once."""
        X = chunk.X
        if isinstance(X, sp.csr_matrix):
            return int(X.data.nbytes + X.indices.nbytes + X.indptr.nbytes)
        return int(np.asarray(X).nbytes)

    async def annotations(self, chunks: Any, options: AnnotateOptions, concurrency: int = 2) -> Any:
        """The core's results rendered straight into AnnData arrays (no response objects)."""
        from cellexplain.service import anndata_io

        async def one(c: Chunk) -> Any:
            def where(r: int, col: int) -> tuple[str, str]:  # rows of the file, not the chunk
                cell = f"cell {brief(c.cell_ids[r])} " if c.cell_ids else ""
                return f"{cell}(row {c.start + r}), gene {brief(c.genes[col])}", "input"

            return await self.annotator.annotate(c.genes, c.X, options, c.cell_ids, where=where)

        async for chunk, res in ordered_window(chunks, one, concurrency):
            # rendered off the loop: top-k selection overlaps the next chunk's preparation
            ann = await asyncio.to_thread(anndata_io.to_annotations, res)
            yield chunk, ann, anndata_io.info(res)

    async def close(self) -> None:
        self.annotator.close()


def reaches_outside(path: str | Path) -> str | None:
    """The first object of the HDF5 file at ``path`` whose data would come from another file
    (an external link, external raw storage, a virtual dataset), described with its HDF5
    path, or ``None``. Only metadata is read and no link is followed.

    ``cellexplain annotate`` refuses such files unless told otherwise, since what it reads from
    them is copied into its output (docs/security.md); the server refuses them in uploads
    (``service/h5ad_check.py``, which also bounds sizes: a local file's are the user's
    business)."""
    found: list[str] = []

    def visit(name: str, link: Any) -> bool | None:
        where = f"/{name}"
        if isinstance(link, h5py.ExternalLink):
            found.append(f"{where} is an external link (to {link.filename!r})")
        elif isinstance(link, h5py.HardLink):
            obj = f.get(name)
            if isinstance(obj, h5py.Dataset):
                if obj.is_virtual:
                    found.append(f"{where} is a virtual dataset (its data come from other files)")
                elif obj.id.get_create_plist().get_external_count() > 0:
                    found.append(f"{where} keeps its data in external files")
        return True if found else None

    with h5py.File(path, "r") as f:
        f.visititems_links(visit)
    return found[0] if found else None


class RowReader:
    """Row chunks of a matrix of cells: :class:`H5adReader` (from disk) or :class:`MemoryReader`.
    Subclasses set ``path``, ``matrix`` (dense, CSR or anndata's sparse dataset), ``genes``,
    ``obs`` and ``n_obs``."""

    path: Path
    matrix: Any
    genes: list[str]
    obs: pd.DataFrame
    n_obs: int

    def chunks(self, size: int) -> Iterator[Chunk]:
        """Row chunks of at most ``size`` cells. A sparse chunk's structure is checked here,
        before any transport turns it into a request (the gRPC one would read negative indices
        as counted from the end), so every door refuses what the server refuses."""
        names = self.obs.index
        for start in range(0, self.n_obs, size):
            try:
                X = self.matrix[start : start + size]
                X = sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)
            except Exception as e:  # a damaged matrix
                raise _unreadable(self.path, e) from e
            problem = sparse_structure_problem(X)
            if problem is not None:
                raise InvalidInputError(
                    f"{self.path}: the matrix is malformed in rows {start}-"
                    f"{start + X.shape[0] - 1}: {problem}",
                    "input",
                )
            yield Chunk(start, self.genes, X, [str(n) for n in names[start : start + size]])

    def close(self) -> None:
        pass


class MemoryReader(RowReader):
    """Row chunks of an AnnData in memory (what :func:`cellexplain.client.readers.read` made of
    a file in another format), its matrix chosen as ``expression`` chooses it."""

    def __init__(
        self, adata: ad.AnnData, path: Path, gene_key: str | None = None, layer: str | None = None
    ) -> None:
        self.path = path
        self.genes, self.matrix = expression(adata, gene_key, layer)
        if sp.issparse(self.matrix) and not sp.isspmatrix_csr(self.matrix):
            self.matrix = sp.csr_matrix(self.matrix)
        self.obs = adata.obs
        self.n_obs = adata.n_obs


class NotChunkableError(InvalidInputError):
    """An ``.h5ad`` whose matrix cannot be read a chunk of rows at a time (CSC): read whole."""


class H5adReader(RowReader):
    """Row chunks of an ``.h5ad`` matrix, read with h5py without loading the file.

    Args:
        layer: ``"raw"`` (``raw/X``), a layer name, or ``None`` for ``X``.
        gene_key: ``var`` column with gene names (default: the var index).
    """

    def __init__(
        self,
        path: str | Path,
        gene_key: str | None = None,
        layer: str | None = None,
        allow_external: bool = False,
    ):
        self.path = Path(path)
        try:
            outside = None if allow_external else reaches_outside(self.path)
            self.file = h5py.File(self.path, "r")
        except OSError as e:
            raise InvalidInputError(f"{self.path} is not a readable .h5ad: {e}", "input") from e
        except Exception as e:  # a damaged structure
            raise _unreadable(self.path, e) from e
        if outside is not None:
            self.file.close()
            raise InvalidInputError(
                f"{self.path}: {outside}; what is read from it would be copied into the output. "
                "Refused by default, as the server refuses such uploads: pass "
                "--allow-external-data if you trust where it points",
                "input",
            )
        try:
            self._open(gene_key, layer)
        except ServiceError:
            self.file.close()
            raise
        except Exception as e:  # h5py and anndata raise many kinds for a damaged file
            self.file.close()
            raise _unreadable(self.path, e) from e

    def _open(self, gene_key: str | None, layer: str | None) -> None:
        f = self.file
        if layer == "raw":
            if "raw" not in f:
                raise InvalidInputError(f"{self.path} has no .raw (--layer raw)", "layer")
            mpath, vpath = "raw/X", "raw/var"
        elif layer is not None:
            if f"layers/{layer}" not in f:
                have = (", ".join(f["layers"].keys()) if "layers" in f else "") or "(none)"
                raise InvalidInputError(
                    f"layer {brief(layer)} not found; layers are: {have}", "layer"
                )
            mpath, vpath = f"layers/{layer}", "var"
        else:
            mpath, vpath = "X", "var"
        if mpath not in f:
            raise InvalidInputError(f"{self.path} has no matrix at {mpath}", "layer")
        var = aio.read_elem(f[vpath])
        if gene_key is not None:
            if gene_key not in var.columns:
                cols = ", ".join(map(str, var.columns[:20])) or "(none)"
                raise InvalidInputError(
                    f"gene key {brief(gene_key)} not in var: {cols}", "gene_key"
                )
            self.genes = [str(g) for g in var[gene_key]]
        else:
            self.genes = [str(g) for g in var.index]
        self.obs = aio.read_elem(f["obs"])
        if not isinstance(self.obs, pd.DataFrame):
            raise InvalidInputError(
                f"{self.path}: obs is stored as a {type(self.obs).__name__}, not the dataframe "
                "anndata writes: re-save the file with anndata",
                "input",
            )
        node = f[mpath]
        if isinstance(node, h5py.Dataset):
            self.matrix: Any = node
        else:
            encoding = node.attrs.get("encoding-type", "")
            if encoding == "csc_matrix":  # read whole instead (column-major: no row chunks)
                raise NotChunkableError(f"{mpath} is stored as csc_matrix", "input")
            if encoding != "csr_matrix":
                raise InvalidInputError(
                    f"{mpath} is stored as {encoding or 'an unknown format'}; chunked reading "
                    "needs a dense or CSR matrix (convert with adata.X = adata.X.tocsr())",
                    "input",
                )
            self.matrix = aio.sparse_dataset(node)
        self.n_obs = int(self.matrix.shape[0])
        if self.matrix.shape[1] != len(self.genes):
            raise InvalidInputError(
                f"{mpath} has {self.matrix.shape[1]} columns but {vpath} names {len(self.genes)}",
                "input",
            )

    def close(self) -> None:
        self.file.close()


#: the per-cell values of :class:`Annotations` kept as they come (beside the labels' codes)
_KEPT = (
    "top_genes",
    "genes_against",
    "top_genes_attribution",
    "genes_against_attribution",
    "completeness_gap",
    "novelty",
    "unassigned_reason",
)


@dataclass
class _Collected:
    """The small per-cell values kept until the end (categorical codes, not strings)."""

    classes: list[str]
    label: list[np.ndarray] = field(default_factory=list)
    predicted: list[np.ndarray] = field(default_factory=list)
    explained: list[np.ndarray] = field(default_factory=list)
    confidence: list[np.ndarray] = field(default_factory=list)
    kept: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, ann: Annotations) -> None:
        codes = {c: i for i, c in enumerate([*self.classes, UNASSIGNED])}
        enc = lambda a: np.fromiter((codes[x] for x in a), np.int16, len(a))  # noqa: E731
        self.label.append(enc(ann.label))
        self.predicted.append(enc(ann.predicted_label))
        if ann.explained_class is not None:
            self.explained.append(enc(ann.explained_class))
        self.confidence.append(ann.confidence)
        for name in _KEPT:
            value = getattr(ann, name)
            if value is not None:
                self.kept.setdefault(name, []).append(value)

    def annotations(self) -> Annotations:
        names = np.array([*self.classes, UNASSIGNED], dtype=object)
        cat = lambda parts: names[np.concatenate(parts)] if parts else None  # noqa: E731
        return Annotations(
            label=names[np.concatenate(self.label)],
            predicted_label=names[np.concatenate(self.predicted)],
            confidence=np.concatenate(self.confidence),
            explained_class=cat(self.explained),
            **{name: np.concatenate(parts) for name, parts in self.kept.items()},
        )


def _unreadable(path: Path, e: Exception) -> InvalidInputError:
    return InvalidInputError(
        f"{path} is not a readable .h5ad: {type(e).__name__}: {brief(str(e), 300)}", "input"
    )


class AtomicH5adWriter:
    """A copy of the input at a temporary path, annotations written into it, renamed into
    place by :meth:`commit`; :meth:`abort` (or any exception) removes it."""

    def __init__(self, src: Path, dst: Path, n_obs: int) -> None:
        self.dst = dst
        self.tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
        self.n_obs = n_obs
        try:
            shutil.copyfile(src, self.tmp)
            self.file = h5py.File(self.tmp, "r+")
            obsm = self.file.get("obsm")
            if obsm is not None and not isinstance(obsm, h5py.Group):
                raise InvalidInputError(
                    f"{src}: obsm is stored as a {type(obsm).__name__}, not the group anndata "
                    "writes: re-save the file with anndata",
                    "input",
                )
            obsm = self.file.require_group("obsm")
            obsm.attrs.setdefault("encoding-type", "dict")
            obsm.attrs.setdefault("encoding-version", "0.1.0")
        except BaseException:
            if hasattr(self, "file"):
                self.file.close()
            self.tmp.unlink(missing_ok=True)
            raise

    def write_obsm(self, start: int, ann: Annotations) -> None:
        obsm = self.file["obsm"]
        for name, arr in obsm_arrays(ann).items():
            if name not in obsm or obsm[name].shape != (self.n_obs, arr.shape[1]):
                if name in obsm:
                    del obsm[name]
                ds = obsm.create_dataset(
                    name,
                    shape=(self.n_obs, arr.shape[1]),
                    dtype=np.float32,
                    chunks=(min(self.n_obs, 1024), arr.shape[1]),
                )
                ds.attrs["encoding-type"] = "array"
                ds.attrs["encoding-version"] = "0.2.0"
            obsm[name][start : start + arr.shape[0]] = arr

    def commit(self, obs: pd.DataFrame, info: dict[str, Any]) -> None:
        del self.file["obs"]
        aio.write_elem(self.file, "obs", obs)
        uns = self.file.require_group("uns")
        for key, value in {PREFIX: info, **label_colors(obs, info["classes"])}.items():
            if key in uns:
                del uns[key]
            aio.write_elem(uns, key, value)
        self.file.close()
        os.replace(self.tmp, self.dst)

    def abort(self) -> None:
        try:
            self.file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


class AtomicAnnDataWriter:
    """The output of an input read into memory (:class:`MemoryReader`): the AnnData with its
    annotations, written to a temporary path beside ``dst`` (``.h5ad``, or a ``.zarr`` store
    when ``dst`` ends so) and renamed into place by :meth:`commit`."""

    def __init__(self, adata: ad.AnnData, dst: Path) -> None:
        self.adata = adata
        self.dst = dst
        self.tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
        self.obsm: dict[str, np.ndarray] = {}

    def write_obsm(self, start: int, ann: Annotations) -> None:
        for name, arr in obsm_arrays(ann).items():
            if name not in self.obsm:
                self.obsm[name] = np.full((self.adata.n_obs, arr.shape[1]), np.nan, np.float32)
            self.obsm[name][start : start + arr.shape[0]] = arr

    def commit(self, obs: pd.DataFrame, info: dict[str, Any]) -> None:
        adata = self.adata
        adata.obs = obs
        for name, arr in self.obsm.items():
            adata.obsm[name] = arr
        adata.uns[PREFIX] = info
        adata.uns.update(label_colors(obs, info["classes"]))
        if self.dst.suffix == ".zarr":
            with warnings.catch_warnings():  # anndata's notice of zarr v3 as a future default
                warnings.filterwarnings("ignore", message="Writing zarr v2 data")
                adata.write_zarr(self.tmp)
        else:
            adata.write_h5ad(self.tmp)
        if self.dst.is_dir():  # --force over a store: a folder is not replaced by a rename
            old = self.dst.with_name(f".{self.dst.name}.old-{os.getpid()}")
            os.replace(self.dst, old)
            os.replace(self.tmp, self.dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.dst)

    def abort(self) -> None:
        if self.tmp.is_dir():
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            self.tmp.unlink(missing_ok=True)


@dataclass
class RunStats:
    n_cells: int
    seconds: float
    output: Path
    #: the service's warnings about the answer (the first chunk's: every chunk has the genes)
    warnings: list[str] = field(default_factory=list)

    @property
    def cells_per_second(self) -> float:
        return self.n_cells / max(self.seconds, 1e-9)


async def annotate_file(
    backend: Backend,
    src: str | Path,
    dst: str | Path | None,
    options: AnnotateOptions,
    *,
    gene_key: str | None = None,
    layer: str | None = None,
    chunk_size: int | None = None,
    concurrency: int = 2,
    cluster_key: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    allow_external: bool = False,
    max_missing_fraction: float = 1.0,
    transpose: bool = False,
    genome: str | None = None,
) -> RunStats:
    """Annotate every cell of ``src`` into a new file ``dst`` (see the module docstring).

    ``src`` is any file :func:`cellexplain.client.readers.read` reads: an ``.h5ad`` is read in
    chunks; other formats are read whole by their reader (``transpose``, ``genome``: its
    options). ``dst``: ``None`` writes beside ``src``
    (:func:`~cellexplain.client.readers.default_output`).

    ``allow_external``: read a file whose objects take their data from other files (external
    links, external storage, virtual datasets); refused by default (docs/security.md).
    ``max_missing_fraction``: stop, writing nothing, when more than this share of the model's
    genes is missing from the file (checked on the first answer)."""
    src = Path(src)
    kind = readers.file_format(src)
    dst = readers.default_output(src, kind) if dst is None else Path(dst)
    if dst.resolve() == src.resolve():
        raise InvalidInputError(
            "--out must differ from the input: the input is never modified", "out"
        )
    if dst.exists() and not overwrite:
        raise InvalidInputError(f"{dst} exists; pass --force to replace it", "out")
    for name, value in (("chunk_size", chunk_size or 1), ("concurrency", concurrency)):
        if value < 1:
            flag = "--" + name.replace("_", "-")
            raise InvalidInputError(f"{flag} must be at least 1, got {value}", name)
    reader: RowReader
    if kind == "h5ad":
        if transpose or genome is not None:
            raise InvalidInputError(
                f"--transpose and --genome are for text tables and 10x files; {src} is an .h5ad",
                "transpose" if transpose else "genome",
            )
        try:
            reader = H5adReader(src, gene_key, layer, allow_external)
        except NotChunkableError:
            adata = readers.read(src, kind=kind)
            reader = MemoryReader(adata, src, gene_key, layer)
    else:
        adata = readers.read(src, transpose=transpose, genome=genome, kind=kind)
        reader = MemoryReader(adata, src, gene_key, layer)
    if cluster_key is not None and cluster_key not in reader.obs.columns:
        reader.close()
        raise InvalidInputError(f"cluster key {brief(cluster_key)} not found in obs", "cluster_key")
    detail = await backend.model(options.model)
    card = detail.card
    options = options.model_copy(update={"model": card.name, "return_probabilities": True})
    explicit = chunk_size is not None
    budget = None
    if chunk_size is None:  # sized by the server's limits, from the first rows' encoding
        try:
            sample = next(reader.chunks(min(SAMPLE_ROWS, max(reader.n_obs, 1))), None)
        except BaseException:
            reader.close()
            raise
        chunk_size = 1
        if sample is not None:
            budget = ChunkBudget.fit(
                lambda c: backend.request_bytes(c, options), sample, detail.limits
            )
            chunk_size = budget.rows_for(sample)
    chunks: Any = reader.chunks(chunk_size)
    if budget is not None:  # denser rows further on: cut before they are sent
        chunks = (part for c in chunks for part in budget.split(c))
    writer: AtomicH5adWriter | AtomicAnnDataWriter
    try:
        if isinstance(reader, MemoryReader):
            writer = AtomicAnnDataWriter(adata, dst)
        else:
            writer = AtomicH5adWriter(src, dst, reader.n_obs)
    except BaseException:
        reader.close()
        raise
    collected = _Collected(card.classes)
    info: dict[str, Any] | None = None
    n_empty, first_empty = 0, ""
    t0 = time.perf_counter()
    bar = tqdm(
        total=reader.n_obs,
        unit="cell",
        unit_scale=True,
        desc="annotate",
        disable=not progress,
        smoothing=0.1,
    )
    try:
        async for chunk, ann, chunk_info in _explained(
            backend.annotations(chunks, options, concurrency),
            chunk_size,
            explicit,
            kind in ("csv", "tsv"),
            transpose,
        ):
            if info is None:
                missing = chunk_info["gene_matching"]["missing_fraction"]
                if missing > max_missing_fraction:
                    raise InvalidInputError(
                        f"{missing:.0%} of the model's genes are missing from {src} (more than "
                        f"--max-missing-fraction {max_missing_fraction:g}): "
                        + "; ".join(chunk_info.get("warnings", []))
                        + " (is --gene-key the right column? does the file hold all measured "
                        "genes, not only highly variable ones?)",
                        "max_missing_fraction",
                    )
                info = chunk_info
            writer.write_obsm(chunk.start, ann)
            collected.add(ann)
            empty = stored_per_row(chunk.X) == 0
            if empty.any():
                if not n_empty and chunk.cell_ids:
                    first_empty = chunk.cell_ids[int(np.argmax(empty))]
                n_empty += int(empty.sum())
            bar.update(chunk.n)
        assert info is not None
        # the per-request count of cells without the model's genes covers one chunk: the file's
        # count of cells without any count replaces it
        said = [w for w in info.get("warnings", []) if NO_MODEL_GENES not in w]
        if n_empty:
            said.append(
                f"{n_empty} of {reader.n_obs} cells have no counts at all (the first: "
                f"{brief(first_empty)}): their answers carry no information (empty droplets?)"
            )
        info["warnings"] = said
        ann = collected.annotations()
        obs = reader.obs.copy()
        for name, col in obs_columns(ann, card.classes).items():
            obs[name] = col
        if cluster_key is not None:
            novel = None
            if ann.unassigned_reason is not None:  # cells flagged novel vote Unassigned
                novel = np.isin(ann.unassigned_reason, ["novel", "low_confidence_and_novel"])
            voted, share = majority_vote(ann.label, obs[cluster_key].to_numpy(), novel)
            obs[f"{PREFIX}_majority_voting"] = pd.Categorical(voted)
            obs[f"{PREFIX}_majority_fraction"] = share
        info["cluster_key"] = cluster_key or ""
        writer.commit(obs, info)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
        reader.close()
    return RunStats(reader.n_obs, time.perf_counter() - t0, dst, list(info.get("warnings", [])))


def _orientation_hint(message: str, transposed: bool) -> str:
    """A no-overlap refusal of a text table, with the flag that may fix it."""
    flag = (
        "it was read with --transpose: drop it if its rows are cells"
        if transposed
        else "if the table holds genes as rows and cells as columns, pass --transpose"
    )
    return f"{message.rstrip('.')}; {flag}"


async def _explained(
    answers: Any, chunk_size: int, explicit: bool, table: bool, transposed: bool
) -> Any:
    """``answers``, with the flag to change named in a refusal: ``--chunk-size`` for a chunk
    too large, ``--transpose`` when no gene of a text ``table`` matched (its cells' names were
    read as genes, or the other way round)."""
    try:
        async for item in answers:
            yield item
    except ClientError as e:
        if e.status in (413, "RESOURCE_EXHAUSTED"):
            raise too_large_hint(e, chunk_size, explicit) from e
        if table and str(e).startswith("none of the"):
            raise ClientError(_orientation_hint(str(e), transposed), e.status, e.field) from e
        raise
    except InvalidInputError as e:
        if table and e.message.startswith("none of the"):
            raise InvalidInputError(_orientation_hint(e.message, transposed), e.field) from e
        raise


def cancel_on_sigterm() -> None:
    """Make SIGTERM cancel the running task, as asyncio makes Ctrl-C do, so that an interrupted
    run cleans up (its partial output removed). Called from inside the running loop; the
    cancellation lands at the next ``await``, never inside a finaliser where an exception
    raised by a plain signal handler would be lost."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
