"""Which single-cell file format a path holds, told from its content.

Shared by the client, whose readers (:mod:`cellexplain.client.readers`) pick a reader by it, and
the server, whose upload door reads ``.h5ad`` alone and names any other format it is sent (with
the command that reads it). Detection reads a few kilobytes or an HDF5 file's top-level names,
never a matrix, and needs only h5py: a suffix is a hint at most (a 10x ``.h5`` and an ``.h5ad``
are both HDF5; a ``.txt`` may hold tabs or commas).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py


@dataclass(frozen=True)
class Format:
    """A file format: its key, how a user knows it, and the reader that reads it."""

    key: str
    name: str
    reader: str


FORMATS = {
    f.key: f
    for f in (
        Format("h5ad", "an AnnData .h5ad file", "anndata (chunks read with h5py)"),
        Format("zarr", "an AnnData .zarr store", "anndata.io.read_zarr"),
        Format(
            "10x_h5",
            "a 10x Genomics HDF5 file (Cell Ranger's filtered_feature_bc_matrix.h5)",
            "scanpy.read_10x_h5",
        ),
        Format(
            "10x_h5_v2",
            "a 10x Genomics HDF5 file in Cell Ranger 2's layout (filtered_gene_bc_matrices_h5.h5)",
            "scanpy.read_10x_h5",
        ),
        Format(
            "10x_mtx",
            "a 10x Genomics Matrix Market folder (matrix.mtx.gz, features.tsv.gz, barcodes.tsv.gz)",
            "scanpy.read_10x_mtx",
        ),
        Format("mtx", "a Matrix Market file", "anndata.io.read_mtx"),
        Format("loom", "a Loom file", "anndata.io.read_loom (loompy)"),
        Format("csv", "a comma-separated text table", "pandas.read_csv"),
        Format("tsv", "a tab-separated text table", "pandas.read_csv"),
        Format("zip", "a ZIP archive", ""),
    )
}

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
GZIP_SIGNATURE = b"\x1f\x8b"
ZIP_SIGNATURE = b"PK\x03\x04"
MTX_SIGNATURE = b"%%MatrixMarket"
#: bytes read to tell a text table's delimiter (its header line and a few rows)
HEAD_BYTES = 64 * 1024
#: the 10x Matrix Market files, as Cell Ranger 3+ and Cell Ranger 2 name them
TENX_MTX_FEATURES = ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")
TENX_MTX_MATRIX = ("matrix.mtx.gz", "matrix.mtx")


def hdf5_format(f: h5py.File) -> str | None:
    """The format of an open HDF5 file from its top-level layout (``h5ad``, ``10x_h5``,
    ``10x_h5_v2``, ``loom``), or ``None`` when it is none of them. Reads names and attributes,
    no data, and follows no link."""
    names = set(f.keys())
    matrix = f.get("matrix", getlink=True)
    if isinstance(matrix, h5py.HardLink):
        node = f["matrix"]
        if isinstance(node, h5py.Group) and "barcodes" in node:
            return "10x_h5"
        if isinstance(node, h5py.Dataset) and "row_attrs" in names and "col_attrs" in names:
            return "loom"
    encoding = f.attrs.get("encoding-type")
    if isinstance(encoding, bytes):
        encoding = encoding.decode("utf-8", "replace")
    if encoding == "anndata" or {"obs", "var"} <= names:
        return "h5ad"
    for name in names:  # Cell Ranger 2: one group per genome, each a CSC matrix and its names
        link = f.get(name, getlink=True)
        node = f[name] if isinstance(link, h5py.HardLink) else None
        if isinstance(node, h5py.Group) and {"barcodes", "genes", "indptr"} <= set(node.keys()):
            return "10x_h5_v2"
    return None


def head_format(head: bytes) -> str | None:
    """The format the first bytes of a file show (``mtx``, ``csv``, ``tsv``, ``zip``; gzip is
    looked into), or ``None`` (HDF5 is told by :func:`hdf5_format`)."""
    if head.startswith(GZIP_SIGNATURE):
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, HEAD_BYTES)
        except zlib.error:
            return None
    if head.startswith(ZIP_SIGNATURE):
        return "zip"
    if head.startswith(MTX_SIGNATURE):
        return "mtx"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a cut multi-byte character at the end is fine
        if e.start < len(head) - 4:
            return None
        text = head[: e.start].decode("utf-8")
    if "\x00" in text:
        return None
    lines = [line for line in text.splitlines()[:5] if line.strip()]
    if len(lines) < 2:
        return None
    tabs, commas = lines[1].count("\t"), lines[1].count(",")
    if tabs == 0 and commas == 0:
        return None
    return "tsv" if tabs >= commas else "csv"


def tenx_mtx_parts(path: Path) -> tuple[Path, str] | None:
    """For a 10x Matrix Market folder, or its ``[prefix]matrix.mtx[.gz]`` file: the folder and
    the files' prefix (Cell Ranger writes none; ``read_10x_mtx`` takes one), when the folder
    also holds the prefix's features (or genes) and barcodes; else ``None``."""
    if path.is_dir():
        folder, prefix = path, ""
        if not any((folder / m).is_file() for m in TENX_MTX_MATRIX):
            found = sorted(folder.glob("*matrix.mtx*"))
            if len(found) != 1:
                return None
            prefix = found[0].name.split("matrix.mtx")[0]
    else:
        folder, name = path.parent, path.name
        if "matrix.mtx" not in name:
            return None
        prefix = name.split("matrix.mtx")[0]
    has = lambda names: any((folder / f"{prefix}{n}").is_file() for n in names)  # noqa: E731
    if has(TENX_MTX_FEATURES) and has(("barcodes.tsv.gz", "barcodes.tsv")):
        return folder, prefix
    return None


def detect(path: str | Path) -> str | None:
    """The format of the file or folder at ``path`` (a key of :data:`FORMATS`), or ``None``
    when it is none of them (the caller says what it found). Raises ``OSError`` if it cannot
    be read."""
    path = Path(path)
    if path.is_dir():
        if any((path / n).exists() for n in (".zgroup", ".zattrs", "zarr.json")):
            return "zarr"
        return "10x_mtx" if tenx_mtx_parts(path) is not None else None
    with path.open("rb") as f:
        head = f.read(HEAD_BYTES)
    if h5py.is_hdf5(str(path)):
        with h5py.File(path, "r") as hf:
            return hdf5_format(hf)
    kind = head_format(head)
    if kind == "mtx" and tenx_mtx_parts(path) is not None:
        return "10x_mtx"
    return kind


def describe(kind: str | None) -> str:
    """How a message names a format key (or an unknown one)."""
    return FORMATS[kind].name if kind in FORMATS else "a file of no format this reads"
