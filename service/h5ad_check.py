"""Check an uploaded ``.h5ad`` before AnnData reads a byte of it.

HDF5 lets a file point outside itself: a dataset's raw data can live in another file (external
storage), a link can name another file (``ExternalLink``) or another path (``SoftLink``), a
virtual dataset maps data from other files, and references point at other objects. Read by
AnnData on the server, any of these would copy the server's own files (service-account tokens,
``/proc/self/environ``) into the annotated file sent back. Compression hides size: a few MB of
gzip can declare gigabytes.

:func:`check_h5ad` walks the file's structure with h5py, reading only metadata, and refuses:

* external storage, external and soft links, virtual datasets, committed (named) datatypes, an
  object reachable twice (hard-link cycles);
* object and region references, opaque, array and variable-length non-string types anywhere
  (datasets, attributes, compound fields): AnnData writes none of these;
* compression filters HDF5 does not build in (a plugin filter would load a shared library);
* more objects or deeper nesting than any AnnData file has;
* a declared size (after decompression) over the byte limit, and matrices or ``obs``/``var``
  tables with more cells or genes than a request may have.

Each refusal is a 400 (413 for sizes) that names the offending HDF5 path inside the upload; the
message never depends on anything outside the upload, so it cannot tell whether a path exists on
the server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cellexplain.api.errors import (
    InvalidInputError,
    TooLargeError,
    UnsupportedFormatError,
    brief,
)
from cellexplain.api.formats import (
    HDF5_SIGNATURE,
    HEAD_BYTES,
    describe,
    hdf5_format,
    head_format,
)

#: HDF5's built-in filters (deflate, shuffle, fletcher32, szip, nbit, scale-offset) and LZF,
#: which h5py ships; anything else would be a dynamically loaded plugin
ALLOWED_FILTERS = {1: "deflate", 2: "shuffle", 3: "fletcher32", 4: "szip", 5: "nbit",
                   6: "scaleoffset", 32000: "lzf"}  # fmt: skip
#: more than any AnnData file holds (groups + datasets: a file of 200 obs columns and a rich
#: ``uns`` has about 1,000), and nesting deeper than ``uns`` needs; anndata takes ~2 ms to read
#: each (45,000 scalars in ``uns`` took 90 s), so this also bounds the read's time
MAX_OBJECTS = 10_000
MAX_DEPTH = 32
#: memory charged per variable-length string element (a Python ``str`` and its pointer); the
#: characters themselves are counted in the file's size, as HDF5 stores them uncompressed
VLEN_ELEMENT_BYTES = 64
MATRIX_KEYS = ("X", "raw/X", "layers")


@dataclass(frozen=True)
class Limits:
    max_cells: int
    max_genes: int
    max_bytes: int


@dataclass
class Declared:
    """What the file declares: objects, bytes after decompression, the largest matrix."""

    objects: int = 0
    nbytes: int = 0
    n_cells: int = 0
    n_genes: int = 0


def check_h5ad(path: str | Path, limits: Limits) -> Declared:
    """Walk ``path`` (metadata only) and raise unless it is a self-contained AnnData file within
    ``limits``.

    Raises:
        InvalidInputError: not HDF5, or a construct AnnData never writes (see the module
            docstring); the message names the HDF5 path.
        TooLargeError: declared bytes, cells or genes over the limits.
    """
    try:
        f = h5py.File(path, "r")
    except Exception as e:  # not HDF5 at all, or a damaged superblock
        with open(path, "rb") as raw:
            head = raw.read(HEAD_BYTES)
        kind = head_format(head)
        if kind is not None:
            raise unsupported(kind) from e
        if head.startswith(HDF5_SIGNATURE):
            raise InvalidInputError(
                "the uploaded file is HDF5 but cannot be opened: damaged or truncated (an "
                f"incomplete upload or copy?): {brief(str(e), 160)}",
                "file",
            ) from e
        raise InvalidInputError(
            f"the uploaded file is not a readable .h5ad: not HDF5 ({type(e).__name__})", "file"
        ) from e
    declared = Declared()
    with f:
        try:
            _walk(f, "", 0, declared, set(), limits)
            kind = hdf5_format(f)
            if kind is None:
                raise _refuse("", "is HDF5 but not AnnData's layout (no obs and var)")
            if kind != "h5ad":
                raise unsupported(kind)
            _check_shapes(f, declared, limits)
        except (InvalidInputError, TooLargeError):  # UnsupportedFormatError among them
            raise
        except UnicodeDecodeError as e:
            raise _refuse("", "holds an object or attribute name that is not UTF-8") from e
        except Exception as e:  # h5py cannot describe something: not an anndata file
            raise InvalidInputError(
                f"the uploaded file is refused: its structure cannot be read "
                f"({type(e).__name__}: {brief(str(e), 160)}); upload a .h5ad as anndata "
                "writes it",
                "file",
            ) from e
    return declared


def unsupported(kind: str) -> UnsupportedFormatError:
    """The answer to an upload of another format than ``.h5ad``: what it is, and the commands
    that read it on the user's side (they send the cells, not the file)."""
    return UnsupportedFormatError(
        f"the uploaded file is {describe(kind)}, not an .h5ad: this door reads .h5ad only. "
        "Annotate it with `cellexplain annotate FILE --url URL` (reads it on your machine and "
        "sends its cells), or convert it with `cellexplain convert FILE FILE.h5ad` and upload "
        "that",
        "file",
    )


def _refuse(path: str, what: str) -> InvalidInputError:
    return InvalidInputError(
        f"the uploaded file is refused: {brief(path or '/', 200)} {what}; upload a "
        "self-contained .h5ad as anndata writes it",
        "file",
    )


def _walk(
    group: h5py.Group, path: str, depth: int, declared: Declared, seen: set[Any], limits: Limits
) -> None:
    if depth > MAX_DEPTH:
        raise _refuse(path, f"is nested deeper than {MAX_DEPTH} levels")
    _check_attrs(group, path or "/", declared, limits)
    members = len(group)  # the group's link count (one HDF5 call): refused before any is walked
    if declared.objects + members > MAX_OBJECTS:
        raise _refuse(
            path, f"holds {members} objects, past the {MAX_OBJECTS} a file may: too many objects"
        )
    for name in group:  # link names only: nothing is dereferenced yet
        child = f"{path}/{name}"
        link = group.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            raise _refuse(child, "is an external link (to another file)")
        if isinstance(link, h5py.SoftLink):
            raise _refuse(child, "is a soft link")
        if not isinstance(link, h5py.HardLink):
            raise _refuse(child, f"is a link of an unknown kind ({type(link).__name__})")
        obj = group[name]  # a hard link: an object inside this file
        key = obj.id  # compares by file and object address
        if key in seen:
            raise _refuse(child, "is a second link to an object already seen (hard-link cycle)")
        seen.add(key)
        declared.objects += 1
        if declared.objects > MAX_OBJECTS:
            raise _refuse(child, f"is past the {MAX_OBJECTS}th object: too many objects")
        if isinstance(obj, h5py.Dataset):
            _check_dataset(obj, child, declared, limits)
        elif isinstance(obj, h5py.Group):
            _walk(obj, child, depth + 1, declared, seen, limits)
        else:
            raise _refuse(child, f"is a {type(obj).__name__}, which anndata never writes")


def _attr_text(obj: h5py.HLObject, name: str) -> str | None:
    """A short string attribute's value (None when absent, not a string, or long)."""
    try:
        value = obj.attrs.get(name)
    except Exception:  # an attribute h5py cannot read is not a marker
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and len(value) < 64 else None


def _check_dataset(d: h5py.Dataset, path: str, declared: Declared, limits: Limits) -> None:
    if d.shape is None:
        # anndata writes None (scanpy's uns['log1p']['base'] after sc.pp.log1p) as a null
        # dataspace marked encoding-type 'null'; no other null dataspace is anndata's
        if _attr_text(d, "encoding-type") == "null":
            return
        raise _refuse(path, "has a null dataspace (h5py.Empty) not marked as anndata's None")
    if d.is_virtual:
        raise _refuse(path, "is a virtual dataset (its data would come from other files)")
    plist = d.id.get_create_plist()
    if plist.get_external_count() > 0:
        raise _refuse(path, "keeps its data in external files")
    for i in range(plist.get_nfilters()):
        code = plist.get_filter(i)[0]
        if code not in ALLOWED_FILTERS:
            raise _refuse(path, f"uses compression filter {code}, which is not built into HDF5")
    _check_dtype(_dtype_of(d, path), path)
    _charge(declared, d.shape, d.dtype, path, limits)
    _check_attrs(d, path, declared, limits)


def _check_attrs(obj: h5py.HLObject, path: str, declared: Declared, limits: Limits) -> None:
    for name in obj.attrs:
        aid = obj.attrs.get_id(name)
        where = f"{path} (attribute {name})"
        _check_dtype(_dtype_of(aid, where), where)
        _charge(declared, aid.shape, aid.dtype, where, limits)


def _dtype_of(obj: Any, where: str) -> np.dtype:
    """The numpy dtype of a dataset or attribute; HDF5 types numpy cannot hold (time,
    references of unknown kinds...) are refused."""
    try:
        return obj.dtype
    except TypeError as e:
        raise _refuse(where, f"has an HDF5 datatype anndata never writes ({e})") from e


def _check_dtype(dt: np.dtype, path: str) -> None:
    """Numbers, booleans, fixed or variable-length strings, and compounds of them."""
    if h5py.check_dtype(ref=dt) is not None:
        raise _refuse(path, "holds object or region references (anndata >= 0.7 writes none)")
    if dt.subdtype is not None:
        raise _refuse(path, f"has an array datatype ({dt}), which anndata never writes")
    if dt.names and dt.fields is not None:
        for field in dt.names:
            _check_dtype(dt.fields[field][0], f"{path} (field {field})")
        return
    vlen = h5py.check_dtype(vlen=dt)
    if vlen is not None:
        if vlen not in (str, bytes):
            raise _refuse(
                path, f"has a variable-length {vlen} datatype, which anndata never writes"
            )
        return
    if dt.kind not in "biufcS":
        raise _refuse(path, f"has datatype {dt}, which anndata never writes")


def _charge(declared: Declared, shape: Any, dt: np.dtype, path: str, limits: Limits) -> None:
    """Add an object's size after decompression; over the limit is a 413."""
    n = math.prod(shape) if shape else 1  # () and None (scalar, null space): one element
    vlen = h5py.check_dtype(vlen=dt) is not None
    declared.nbytes += n * (VLEN_ELEMENT_BYTES if vlen else max(dt.itemsize, 1))
    if declared.nbytes > limits.max_bytes:
        raise TooLargeError(
            f"the uploaded file declares more than {limits.max_bytes} bytes once decompressed "
            f"(reached at {brief(path, 200)}); the limit is CELLEXPLAIN_MAX_H5AD_BYTES: split "
            "the file",
            "file",
        )


def _check_shapes(f: h5py.File, declared: Declared, limits: Limits) -> None:
    """Cells and genes of every matrix (dense or sparse) and of the obs/var tables."""
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for key in MATRIX_KEYS:
        obj = f.get(key)
        if obj is None:
            continue
        elements = obj.items() if key == "layers" and isinstance(obj, h5py.Group) else [(key, obj)]
        for name, el in elements:
            where = f"/layers/{name}" if key == "layers" else f"/{key}"
            shape = _matrix_shape(el, where)
            if shape is not None:
                shapes.append((where, shape))
    for table, axis in (("obs", 0), ("var", 1), ("raw/var", 1)):
        n = _table_length(f.get(table))
        if n is not None:
            shapes.append((f"/{table}", (n, 0) if axis == 0 else (0, n)))
    for where, (cells, genes) in shapes:
        declared.n_cells = max(declared.n_cells, cells)
        declared.n_genes = max(declared.n_genes, genes)
        if cells > limits.max_cells:
            raise TooLargeError(
                f"the uploaded file has {cells} cells (in {where}); the limit is "
                f"{limits.max_cells} per request (CELLEXPLAIN_MAX_CELLS_PER_REQUEST): split the "
                "file, or use `cellexplain annotate`, which streams it",
                "file",
            )
        if genes > limits.max_genes:
            raise TooLargeError(
                f"the uploaded file has {genes} genes (in {where}); the limit is "
                f"{limits.max_genes} (CELLEXPLAIN_MAX_GENES_PER_REQUEST)",
                "file",
            )


def _matrix_shape(el: Any, where: str) -> tuple[int, int] | None:
    """A matrix's declared shape: a dense dataset's own, or a sparse group's ``shape``
    attribute (``h5sparse_shape`` in files of anndata < 0.7). A sparse group without either
    is refused: its size could not be known before reading it."""
    if isinstance(el, h5py.Dataset):
        shape = el.shape or ()
    elif isinstance(el, h5py.Group):
        key = next((k for k in ("shape", "h5sparse_shape") if k in el.attrs), None)
        if key is None:
            raise InvalidInputError(
                f"the uploaded file's {where} is a group without a shape attribute: not a "
                "matrix anndata writes",
                "file",
            )
        shape = tuple(np.asarray(el.attrs[key]).ravel().tolist())
    else:
        return None
    if len(shape) != 2 or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InvalidInputError(
            f"the uploaded file's {where} has shape {brief(shape)}: a matrix needs two "
            "non-negative dimensions (cells x genes)",
            "file",
        )
    return int(shape[0]), int(shape[1])  # type: ignore[misc]


def _table_length(group: Any) -> int | None:
    """Rows of an AnnData dataframe: the length of its index dataset, or of the table itself
    where anndata < 0.7 stored it as one compound dataset."""
    if isinstance(group, h5py.Dataset):
        return int(group.shape[0]) if group.shape else None
    if not isinstance(group, h5py.Group):
        return None
    index = group.attrs.get("_index")
    if isinstance(index, bytes):
        index = index.decode(errors="replace")
    if isinstance(index, str) and isinstance(group.get(index), h5py.Dataset):
        shape = group[index].shape
        return int(shape[0]) if shape else None
    return None
