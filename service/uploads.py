"""The plumbing of ``POST /v1/annotate/h5ad``: the request's body read in one buffer, the
upload form checked, the spooled file copied for the sandboxed reader
(:mod:`cellexplain.service.sandbox`), work that ends when the client leaves, the annotated file
streamed back."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from fastapi import Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from cellexplain.api.errors import InvalidInputError, brief, disk_full, from_exception

T = TypeVar("T")
H5AD_MEDIA_TYPE = "application/x-hdf5"


async def read_body(request: Request) -> bytes | bytearray:
    """The request's body, in one buffer: with a Content-Length (the gate has held it to the
    limit) read straight into a buffer of that size, not gathered in pieces and joined, which
    holds the body twice at the join (a refused 8 MB body's peak passed its bound)."""
    declared = request.headers.get("content-length", "")
    if not (declared.isascii() and declared.isdigit()):
        return await request.body()
    buf = bytearray(int(declared))
    view = memoryview(buf)
    filled = 0
    async for piece in request.stream():
        end = filled + len(piece)
        if end > len(buf):  # h11 holds bodies to their Content-Length; never trusted
            raise InvalidInputError("the body is longer than its Content-Length", "body")
        view[filled:end] = piece
        filled = end
    view.release()
    if filled != len(buf):
        raise InvalidInputError("the body is shorter than its Content-Length", "body")
    return buf


def check_form_fields(form: Any, fields: Iterable[str]) -> None:
    """Refuse (400) an upload form with a field the endpoint does not read or one given twice,
    as the JSON door refuses unknown fields: a misspelt option must not be silently ignored."""
    allowed = tuple(fields)
    keys = [k for k, _ in form.multi_items()]
    unknown = [k for k in keys if k not in allowed]
    if unknown:
        raise InvalidInputError(
            f"{brief(unknown[0])}: unknown form field; the fields are {', '.join(allowed)}",
            unknown[0][:80],
        )
    twice = sorted(k for k, n in Counter(keys).items() if n > 1)
    if twice:
        raise InvalidInputError(f"form field {brief(twice[0])} is given more than once", twice[0])


def save_upload(file: UploadFile, path: Path) -> None:
    """Copy an upload (spooled to disk by the multipart parser) to ``path`` in 1 MiB pieces."""
    file.file.seek(0)
    try:
        with path.open("wb") as out:
            shutil.copyfileobj(file.file, out, 1 << 20)
    except OSError as e:  # a full disk is a 507, answered (not re-raised by Starlette)
        raise from_exception(e) if disk_full(e) else e from e
    if path.stat().st_size == 0:
        raise InvalidInputError("the uploaded file is empty", "file")


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``, unless the client goes away first: then ``work`` is cancelled (an upload's
    reader is killed with it) and the request ends as a disconnect (499). For requests whose
    body has been read: the next ASGI message can only be the client leaving."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise ClientDisconnect()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def stream_file(f: BinaryIO) -> AsyncIterator[bytes]:
    """``f``'s bytes in 1 MiB pieces, read off the event loop; ``f`` is closed at the end."""
    try:
        while chunk := await run_in_threadpool(f.read, 1 << 20):
            yield chunk
    finally:
        f.close()


def safe_filename(name: str | None, default: str = "cells") -> str:
    """An upload's file name reduced to ``[A-Za-z0-9._-]`` (at most 100 characters, without
    its extension) for the ``Content-Disposition`` of the answer: no quotes, separators,
    control characters or non-ASCII text can reach the header."""
    stem = Path(str(name or "")).name
    if stem.lower().endswith(".h5ad"):
        stem = stem[: -len(".h5ad")]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:100]
    return stem or default
