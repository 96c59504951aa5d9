"""Uploaded ``.h5ad`` files are read in a child process that may die, never in a worker.

HDF5 is C code fed an attacker's bytes: corrupted attribute headers send it into endless loops
that hold Python's GIL (a worker running one answers nothing, probes included, and ignores
SIGTERM), and chunks deflated twice or strings sharing one heap grow it by gigabytes from a
small file. A thread cannot bound either; a process can. So for every upload the worker starts
``python -m cellexplain.service.sandbox`` which, under an address-space limit
(``RLIMIT_AS``), a CPU-time limit (``RLIMIT_CPU``) and the parent's wall-clock deadline:

1. checks the file's structure (:func:`~cellexplain.service.h5ad_check.check_h5ad`) and reads
   it with AnnData;
2. writes what the worker needs into the upload's private folder (gene and cell names as JSON,
   the matrix as ``.npy`` arrays: no pickle crosses, and the worker loads them with
   ``allow_pickle=False``), and says so on stdout (one JSON line);
3. waits; the worker annotates and writes the annotations beside them (``.npy`` and JSON);
4. on ``write``, adds them to the AnnData it still holds and writes the annotated file.

The worker only waits on a pipe, so its event loop, probes and SIGTERM handling run meanwhile.
A limit exceeded is answered 413 (memory) or 422 (CPU or wall-clock time) naming the limit and
its setting; a child that crashes is a 400. The child dies with its worker (``PR_SET_PDEATHSIG``)
and is killed when the request ends, however it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import math
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import scipy.sparse as sp

from cellexplain.api.annotations import Annotations
from cellexplain.api.errors import (
    InsufficientStorageError,
    InvalidInputError,
    NotReadyError,
    ServiceError,
    TooLargeError,
    UnprocessableError,
    UnsupportedFormatError,
    brief,
    caused_by,
)
from cellexplain.service.h5ad_check import Limits

log = logging.getLogger(__name__)
T = TypeVar("T")

#: free space in TMPDIR under which a reader that crashed is taken to have run out of it
LOW_DISK_BYTES = 64 * 1024**2
#: the longest cell or gene name an upload may hold (barcodes and gene IDs are < 100)
MAX_NAME_CHARS = 1024
#: longest line the child may send (its messages are small JSON objects)
MAX_MESSAGE_BYTES = 64 * 1024


#: the string columns of :class:`~cellexplain.api.annotations.Annotations` (JSON); the others
#: are numeric arrays (``.npy``)
def _is_strings(value: Any) -> bool:
    """An :class:`Annotations` field of strings (object arrays): sent as JSON, never pickled."""
    return isinstance(value, np.ndarray) and value.dtype == object


#: upload folders in TMPDIR are named ``{UPLOAD_PREFIX}{worker pid}-{random}``
UPLOAD_PREFIX = "cellexplain-upload-"


@contextlib.contextmanager
def upload_folder() -> Iterator[Path]:
    """A private folder (mode 0700) in TMPDIR for one upload, removed with all it holds when
    the request ends. Its name carries the worker's pid, so that :func:`remove_orphans` can
    tell a dead worker's leftovers from a live one's."""
    with tempfile.TemporaryDirectory(prefix=f"{UPLOAD_PREFIX}{os.getpid()}-") as tmp:
        yield Path(tmp)


def remove_orphans(tmpdir: str | None = None) -> int:
    """Remove the upload folders of workers that are no longer alive (a worker killed
    mid-upload leaves up to CELLEXPLAIN_MAX_H5AD_BYTES twice: the upload and its spool);
    returns how many were removed. Each worker calls it as it starts."""
    removed = 0
    root = Path(tmpdir or tempfile.gettempdir())
    try:
        entries = list(root.glob(f"{UPLOAD_PREFIX}*"))
    except OSError:
        return 0
    for entry in entries:
        pid = entry.name[len(UPLOAD_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)) or not entry.is_dir() or entry.is_symlink():
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed += 1
    if removed:
        log.info("removed %d upload folder(s) left by workers that died", removed)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@dataclass(frozen=True)
class SandboxLimits:
    """What reading one upload may cost, beyond the declared-size limits.

    Attributes:
        memory_bytes: address space the child may add to what it maps at start (interpreter,
            numpy, h5py and anndata: ~0.5 GB of mappings, little of it resident).
        cpu_s: CPU seconds (``RLIMIT_CPU``; the kernel ends the child with SIGXCPU).
        wall_s: seconds from start to the matrix being read, and again to the file being
            written; the worker kills the child after either.
    """

    memory_bytes: int
    cpu_s: float
    wall_s: float


@dataclass
class Upload:
    """What the worker gets back from a read upload: ``genes`` ``[n_genes]`` and ``cells``
    ``[n_cells]`` names, and ``X`` ``[n_cells, n_genes]`` as stored (dense, CSR or CSC)."""

    genes: list[str]
    cells: list[str]
    X: np.ndarray | sp.spmatrix


class SandboxedUpload:
    """The worker's side of one upload's child process. Use as a context manager: the child is
    killed on exit, whatever happened.

    ``folder`` is the upload's private folder (the child reads ``folder/upload.h5ad`` and writes
    its files and ``out.h5ad`` there)."""

    def __init__(
        self,
        folder: Path,
        limits: Limits,
        sandbox: SandboxLimits,
        gene_key: str | None = None,
        layer: str | None = None,
    ) -> None:
        self.folder = folder
        self.limits = limits
        self.sandbox = sandbox
        self.gene_key = gene_key
        self.layer = layer
        self.proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._closed = False
        self._write_limit = 0  # the annotated file's bound, once known

    def __enter__(self) -> SandboxedUpload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill the child (if still running) and reap it. Its pipes close with this object: a
        thread of :meth:`read_async` may still be reading one, until it sees the child gone."""
        self._closed = True
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    async def read_async(self) -> Upload:
        """:meth:`read` on a thread; a cancelled request kills the child at once."""
        return await self._off_loop(self.read)

    async def write_async(self, ann: Annotations, info: dict[str, Any]) -> Path:
        """:meth:`write` on a thread; a cancelled request kills the child at once."""
        return await self._off_loop(functools.partial(self.write, ann, info))

    async def _off_loop(self, work: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(work)
        except asyncio.CancelledError:  # the thread ends when the child does
            self.close()
            raise

    def read(self) -> Upload:
        """Start the child and wait until it has checked and read the upload (blocking: run it
        off the event loop).

        Raises:
            InvalidInputError: the file is refused or unreadable, or its reader crashed.
            TooLargeError: a declared size over the limits, or the memory limit reached.
            UnprocessableError: the CPU-time or wall-clock limit reached.
        """
        config = {
            "folder": str(self.folder),
            "max_cells": self.limits.max_cells,
            "max_genes": self.limits.max_genes,
            "max_bytes": self.limits.max_bytes,
            "memory_bytes": self.sandbox.memory_bytes,
            "cpu_s": self.sandbox.cpu_s,
            "gene_key": self.gene_key,
            "layer": self.layer,
            "parent": os.getpid(),
        }
        env = {
            **os.environ,
            # one thread each: the child's work is h5py's, and BLAS threads reserve memory
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cellexplain.service.sandbox", json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        if self._closed:  # the request ended while the child was being started
            self.close()
            raise NotReadyError("the upload was abandoned before it was read", "file")
        meta = self._receive("reading the uploaded file")
        X = _load_matrix(self.folder, meta, self.limits)
        genes = _load_strings(self.folder / "genes.json", int(meta["n_genes"]))
        cells = _load_strings(self.folder / "cells.json", int(meta["n_cells"]))
        return Upload(genes, cells, X)

    def write(self, ann: Annotations, info: dict[str, Any]) -> Path:
        """Hand the annotations to the child and wait until it has written the annotated file;
        returns its path (``folder/out.h5ad``).

        Raises:
            the errors of :meth:`read`; InvalidInputError also when anndata cannot write back
            what the upload holds.
        """
        assert self.proc is not None and self.proc.stdin is not None
        self._write_limit = self.limits.max_bytes + _annotation_bytes(ann) + (1 << 20)
        _save_annotations(self.folder, ann, info)
        try:
            self.proc.stdin.write(b"write\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the child is gone: _receive says why
        self._receive("writing the annotated file")
        return self.folder / "out.h5ad"

    def _receive(self, doing: str) -> dict[str, Any]:
        """The child's next message, or the error its failure or silence stands for."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + self.sandbox.wall_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                self.proc.kill()
                raise UnprocessableError(
                    f"the uploaded file took more than {self.sandbox.wall_s:g} s {doing} "
                    "(CELLEXPLAIN_UPLOAD_TIMEOUT_S): it was stopped; a valid .h5ad of this "
                    "size reads far faster, so check the file, or split it",
                    "file",
                )
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:  # the child ended without a message
                raise self._death(doing)
            self._buffer += chunk
            if len(self._buffer) > MAX_MESSAGE_BYTES:
                self.proc.kill()
                raise InvalidInputError("the upload's reader sent an oversized message", "file")
        line, _, self._buffer = self._buffer.partition(b"\n")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise InvalidInputError("the upload's reader sent an unreadable message", "file")
        if message.get("ok"):
            return message
        raise _error_from(message)

    def _death(self, doing: str) -> ServiceError:
        assert self.proc is not None
        code = self.proc.wait()
        if code == -signal.SIGXCPU:
            return UnprocessableError(
                f"the uploaded file took more than {self.sandbox.cpu_s:g} s of CPU time "
                f"{doing} (CELLEXPLAIN_UPLOAD_CPU_S): it was stopped",
                "file",
            )
        if code == -signal.SIGKILL:  # the kernel's OOM killer (RLIMIT_CPU's hard limit too)
            return TooLargeError(
                f"the process {doing} was killed: the file needs more memory or time than the "
                "server can give one upload (CELLEXPLAIN_UPLOAD_MEMORY_BYTES, "
                "CELLEXPLAIN_UPLOAD_CPU_S)",
                "file",
            )
        if code in (-signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP):  # the server stopping
            return NotReadyError(
                f"the server is shutting down: the upload was not finished {doing}; send it "
                "again (another replica answers)",
                "file",
            )
        out = self.folder / "out.h5ad"
        if self._write_limit and out.exists() and out.stat().st_size >= self._write_limit - 4096:
            return TooLargeError(  # HDF5 can crash when a write fails (RLIMIT_FSIZE's EFBIG)
                f"the annotated file would pass {self._write_limit} bytes: the upload holds more "
                f"once read than CELLEXPLAIN_MAX_H5AD_BYTES ({self.limits.max_bytes}) allows",
                "file",
            )
        if shutil.disk_usage(self.folder).free < LOW_DISK_BYTES:  # HDF5 can crash on ENOSPC
            return InsufficientStorageError(
                f"the server's temporary space is full (its TMPDIR) {doing}: the request was "
                "not processed and nothing of it was kept; retry later or on another replica"
            )
        what = f"signal {-code}" if code < 0 else f"exit status {code}"
        return InvalidInputError(
            f"the uploaded file is not a readable .h5ad: its reader crashed {doing} ({what})",
            "file",
        )


def _error_from(message: dict[str, Any]) -> ServiceError:
    """The error a child's failure message stands for (the classes it may name)."""
    kinds: dict[str, type[ServiceError]] = {
        "InvalidInputError": InvalidInputError,
        "UnsupportedFormatError": UnsupportedFormatError,
        "TooLargeError": TooLargeError,
        "UnprocessableError": UnprocessableError,
        "InsufficientStorageError": InsufficientStorageError,
        "NotReadyError": NotReadyError,
    }
    cls = kinds.get(str(message.get("error")), InvalidInputError)
    field = message.get("field")
    return cls(str(message.get("message", "the uploaded file is refused")), field or "file")


def _load_strings(path: Path, n: int) -> list[str]:
    if path.stat().st_size > n * (MAX_NAME_CHARS * 6 + 8) + 2:  # JSON-escaped, at the worst
        raise InvalidInputError("the upload's reader wrote more names than it declared", "file")
    with path.open("rb") as f:
        values = json.load(f)
    if (
        not isinstance(values, list)
        or len(values) != n
        or not all(isinstance(v, str) for v in values)
    ):
        raise InvalidInputError("the upload's reader wrote unreadable names", "file")
    return values


def _load_matrix(folder: Path, meta: dict[str, Any], limits: Limits) -> np.ndarray | sp.spmatrix:
    """The matrix the child wrote, loaded without pickle and within the request limits."""
    shape = (int(meta["n_cells"]), int(meta["n_genes"]))
    if shape[0] > limits.max_cells or shape[1] > limits.max_genes:
        raise TooLargeError(f"the uploaded matrix is {shape[0]} x {shape[1]}", "file")
    budget = limits.max_bytes
    for p in folder.glob("X*.npy"):
        budget -= p.stat().st_size
    if budget < 0:
        raise TooLargeError("the uploaded matrix is larger than CELLEXPLAIN_MAX_H5AD_BYTES", "file")
    kind = meta.get("format")
    if kind == "dense":
        X = np.load(folder / "X.npy", allow_pickle=False)
        if X.shape != shape:
            raise InvalidInputError("the upload's reader wrote a matrix of the wrong shape", "file")
        return X
    if kind not in ("csr", "csc"):
        raise InvalidInputError("the upload's reader wrote an unknown matrix format", "file")
    parts = [np.load(folder / f"X_{p}.npy", allow_pickle=False) for p in _SPARSE_PARTS]
    cls = sp.csr_matrix if kind == "csr" else sp.csc_matrix
    # scipy checks no more than the lengths here; the core checks the structure before use
    return cls(tuple(parts), shape=shape)


_SPARSE_PARTS = ("data", "indices", "indptr")


def _save_annotations(folder: Path, ann: Annotations, info: dict[str, Any]) -> None:
    strings: dict[str, list[str]] = {}
    for f in fields(Annotations):
        value = getattr(ann, f.name)
        if _is_strings(value):
            strings[f.name] = [str(v) for v in value]
        elif value is not None:
            np.save(folder / f"ann_{f.name}.npy", np.asarray(value), allow_pickle=False)
    with (folder / "annotations.json").open("w") as out:
        json.dump({"strings": strings, "info": info}, out)


def _annotation_bytes(ann: Annotations) -> int:
    """What the annotations add to a file, at most (arrays as stored, strings as UTF-8)."""
    total = 0
    for f in fields(Annotations):
        value = getattr(ann, f.name)
        if value is None:
            continue
        if _is_strings(value):
            total += sum(len(str(v).encode()) + 16 for v in value)
        else:
            total += int(np.asarray(value).nbytes)
    return total


def _load_annotations(folder: Path) -> tuple[Annotations, dict[str, Any]]:
    with (folder / "annotations.json").open() as f:
        saved = json.load(f)
    values: dict[str, Any] = {}
    for f_ in fields(Annotations):
        if f_.name in saved["strings"]:
            values[f_.name] = np.array(saved["strings"][f_.name], dtype=object)
        else:
            path = folder / f"ann_{f_.name}.npy"
            values[f_.name] = np.load(path, allow_pickle=False) if path.exists() else None
    return Annotations(**values), saved["info"]


# -- the child ----------------------------------------------------------------------------------
def _confine(memory_bytes: int, cpu_s: float, parent: int) -> None:
    """Limits on this process (the child), set before it opens the upload."""
    try:  # die with the worker (Linux): a hung reader must not outlive it
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover  (not Linux)
        pass
    if os.getppid() != parent:  # the worker died before the line above
        os._exit(1)
    global _BUDGET
    mapped = _mapped_bytes()
    limit = mapped + memory_bytes
    _BUDGET = (mapped, memory_bytes)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    cpu = max(1, math.ceil(cpu_s))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    # files past RLIMIT_FSIZE fail with EFBIG (not the signal): see _limit_files
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _limit_files(max_bytes: int) -> None:
    """No file this child writes may pass ``max_bytes`` (``RLIMIT_FSIZE``): what it writes
    for the worker and the annotated file are bounded by the request's limits, so content that
    reads far larger than it declares (strings sharing one heap object) fails while written,
    not after filling the disk."""
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)  # soft only: the write phase raises it
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))


def _mapped_bytes() -> int:
    """This process's address space now (``VmSize``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover
        return 0


#: the child's message channel: the stdout it was started with (fd 1 itself is pointed at
#: /dev/null, so that nothing a library prints can corrupt a message)
_channel: Any = None


def _chain_has_errno(e: BaseException, number: int) -> bool:
    """Whether ``e`` or an exception it came from is an OSError of ``number`` (h5py names
    the errno only in its message)."""

    def of_number(c: BaseException) -> bool:
        return isinstance(c, OSError) and (c.errno == number or f"errno = {number}," in str(c))

    return caused_by(e, of_number) is not None


#: (address space when confined, the upload's memory budget) of this child
_BUDGET: tuple[int, int] | None = None


def _near_memory_limit(err: BaseException | None = None) -> bool:
    """Whether this process came within 64 MiB of its address-space limit, or, for a failed
    HDF5 filter (``err``), used a third of its budget: C code (HDF5's filters) reports a failed
    allocation as a read error, not as ``MemoryError``, and a filter that doubles its buffer
    fails asking for more than is left, its peak then past a third of the budget."""
    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    if limit == resource.RLIM_INFINITY:
        return False
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:  # pragma: no cover
        return False
    for line in status.splitlines():
        if line.startswith("VmPeak:"):
            peak = int(line.split()[1]) * 1024
            if peak >= limit - 64 * 1024**2:
                return True
            filter_failed = err is not None and "filter returned failure" in str(err)
            return bool(filter_failed and _BUDGET and peak - _BUDGET[0] >= _BUDGET[1] / 3)
    return False  # pragma: no cover


def _name_too_long(kind: str, name: str) -> InvalidInputError:
    return InvalidInputError(
        f"the uploaded file has a {kind} name of {len(name)} characters ({brief(name)}); names "
        f"hold at most {MAX_NAME_CHARS}",
        "file",
    )


#: index names read at once by :func:`_check_index_names`
_NAMES_AT_ONCE = 256


def _check_index_names(path: Path) -> None:
    """Refuse a cell or gene name over :data:`MAX_NAME_CHARS` before anndata reads the
    names: HDF5 strings can share one heap object, so a few MB of file can read as GBs of
    names (anndata may hold them as fixed-width arrays, 4 bytes a character), past the upload's
    memory. Read a few at a time here."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError:
        return  # not HDF5 at all: anndata's reader names what it is
    with f:
        for group, kind in (("obs", "cell"), ("var", "gene")):
            g = f.get(group)
            if not isinstance(g, h5py.Group):
                continue
            key = g.attrs.get("_index", "_index")
            ds = g.get(str(key)) if isinstance(key, str | bytes) else None
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.dtype.kind != "O":
                continue  # anndata's reader says what is wrong with it
            names = ds.asstr(errors="replace")
            for start in range(0, ds.shape[0], _NAMES_AT_ONCE):
                for name in names[start : start + _NAMES_AT_ONCE]:
                    if len(name) > MAX_NAME_CHARS:
                        raise _name_too_long(kind, name)


def _send(message: dict[str, Any]) -> None:
    _channel.write(json.dumps(message).encode() + b"\n")
    _channel.flush()


def _fail(err: BaseException) -> None:
    from cellexplain.api.errors import InternalError, from_exception

    if _chain_has_errno(err, errno.EFBIG):
        e: ServiceError = TooLargeError(
            "reading the uploaded file produced more than CELLEXPLAIN_MAX_H5AD_BYTES of data: "
            "the file declares a small size but expands far beyond it",
            "file",
        )
    elif isinstance(err, MemoryError) or _near_memory_limit(err):
        e = TooLargeError(
            "reading the uploaded file needs more memory than one upload may use "
            "(CELLEXPLAIN_UPLOAD_MEMORY_BYTES): the file declares a small size but expands "
            "far beyond it, or split it",
            "file",
        )
    else:
        e = from_exception(err)
        if isinstance(e, InternalError):  # not a ServiceError: the file is not AnnData's
            e = InvalidInputError(
                f"the uploaded file is not a readable .h5ad: {type(err).__name__}: "
                f"{brief(str(err), 300)}",
                "file",
            )
            sys.stderr.write(traceback.format_exc())
    _send({"ok": False, "error": type(e).__name__, "message": e.message, "field": e.field})


def _child(config: dict[str, Any]) -> int:
    global _channel
    _channel = os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    _confine(int(config["memory_bytes"]), float(config["cpu_s"]), int(config["parent"]))
    try:
        from cellexplain.api.annotations import expression, write_annotations
        from cellexplain.service.anndata_io import read_h5ad_upload

        folder = Path(config["folder"])
        limits = Limits(config["max_cells"], config["max_genes"], config["max_bytes"])
        _limit_files(limits.max_bytes + (1 << 20))  # the arrays and names for the worker
        _check_index_names(folder / "upload.h5ad")
        adata = read_h5ad_upload(folder / "upload.h5ad", limits)
        genes, X = expression(adata, config["gene_key"], config["layer"])
        (folder / "upload.h5ad").unlink()  # AnnData holds what it read: the disk space goes
        meta: dict[str, Any] = {"ok": True, "n_cells": X.shape[0], "n_genes": X.shape[1]}
        if sp.issparse(X):
            S: Any = X
            if S.format not in ("csr", "csc"):
                S = S.tocsr()
            meta["format"] = S.format
            for p in _SPARSE_PARTS:
                np.save(folder / f"X_{p}.npy", getattr(S, p), allow_pickle=False)
            del S
        else:
            meta["format"] = "dense"
            np.save(folder / "X.npy", np.asarray(X), allow_pickle=False)
        for name, values in (("genes", genes), ("cells", adata.obs_names)):
            names = [str(v) for v in values]
            longest = max(names, key=len, default="")
            if len(longest) > MAX_NAME_CHARS:  # strings can share one heap object: 1 KB -> 1 GB
                raise _name_too_long(name[:-1], longest)
            with (folder / f"{name}.json").open("w") as out:
                json.dump(names, out)
        del X
        _send(meta)
        if sys.stdin.buffer.readline().strip() != b"write":
            return 0  # the worker is done with us (an error, or the client went away)
        ann, info = _load_annotations(folder)
        write_annotations(adata, ann, info)
        from cellexplain.service.anndata_io import write_h5ad

        out_path = folder / "out.h5ad"
        allowed = limits.max_bytes + _annotation_bytes(ann) + (1 << 20)  # as the worker has it
        _limit_files(allowed)
        try:
            write_h5ad(adata, out_path)
        except Exception as e:
            if not _chain_has_errno(e, errno.EFBIG):
                raise
            out_path.unlink(missing_ok=True)
            raise TooLargeError(
                f"the annotated file would pass {allowed} bytes: the upload holds more once "
                f"read than CELLEXPLAIN_MAX_H5AD_BYTES ({limits.max_bytes}) allows",
                "file",
            ) from e
        _send({"ok": True})
    except BaseException as e:  # every failure becomes a message; the worker maps it
        _fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(_child(json.loads(sys.argv[1])))
