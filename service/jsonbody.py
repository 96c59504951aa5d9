"""JSON request bodies read into arrays with bounded memory.

A generic JSON parser turns every value into a Python object: 30-130 bytes of worker memory per
2-4 bytes of body (a 16 MiB body of one-value rows took 2 GB). Here:

1. Before parsing, the arrays and objects of the body are counted (a byte count; strings are
   stripped first only when the quick count is over). A request holds one array or object per
   cell plus a few, so a body with more than ``max_cells`` of them is refused at once (413).
2. The body is parsed by simdjson (its buffers take about 13 bytes per byte of body, whatever
   the body holds), and the matrix is copied straight from the parsed document into one float64
   array (dense rows) or CSR arrays (sparse ``{gene: value}`` maps, one cell at a time). Gene
   lists longer than ``max_genes`` are refused before they become Python strings.

Measured worst case (docs/security.md): dense rows of ``0`` (2 bytes per float64 value), about
19x the body at the peak; the tests hold every shape under 20x.
``NaN`` and ``Infinity`` are not JSON, but Python clients send them; they are read as such (and
then refused by the value checks with their cell and gene), never as a parse error.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import simdjson

from cellexplain.api.errors import InvalidInputError, TooLargeError, brief
from cellexplain.api.schemas import AnnotateOptions
from cellexplain.service.core import check_cell_count

#: arrays/objects a request may hold beside one per cell (the body, genes, cell_ids, ...)
CONTAINER_SLACK = 8
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NON_JSON = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|-Infinity|Infinity|NaN')
#: what the non-JSON literals become before parsing: numbers of the same length (so the body,
#: and simdjson's buffers, do not grow), distinct, and negative (never an accepted value), then
#: turned back into NaN, inf and -inf
_SENTINELS = {b"NaN": b"-9 ", b"Infinity": b"-4e-324 ", b"-Infinity": b"-1e-323  "}
_NAN = -9.0
_NEG_INF_TINY = float("-1e-323")
_INF_TINY = float("-4e-324")
_SCALAR = (str, int, float, bool, type(None))


@dataclass
class ParsedAnnotate:
    """A ``/v1/annotate`` body: options, genes, the ``[n_cells, n_genes]`` matrix."""

    options: AnnotateOptions
    genes: list[str]
    X: np.ndarray | sp.csr_matrix
    cell_ids: list[str] | None
    genes_field: str


def count_containers(body: bytes | bytearray, exact: bool = False) -> int:
    """Arrays and objects in ``body``; the quick count also counts brackets inside strings
    (never fewer than the truth), ``exact`` strips strings first."""
    if exact:
        body = _STRING.sub(b'""', body)
    octets = np.frombuffer(body, dtype=np.uint8)  # numpy's compare: ~3x bytes.count
    count = 0
    # a block at a time: the compares' temporaries stay small (two of the body's size pushed a
    # refused 8 MB body's peak past its bound) and in cache (2.6 vs 3.1 ms for 8 MB)
    for start in range(0, len(octets), _COUNT_BLOCK):
        block = octets[start : start + _COUNT_BLOCK]
        count += int(np.count_nonzero(block == ord("["))) + int(np.count_nonzero(block == ord("{")))
    return count


#: bytes compared at a time by :func:`count_containers`
_COUNT_BLOCK = 1 << 18


def check_containers(body: bytes | bytearray, max_cells: int) -> int:
    """Refuse (413) a body with more arrays and objects than ``max_cells`` cells need; returns
    the quick count."""
    limit = max_cells + CONTAINER_SLACK
    quick = count_containers(body)
    if quick > limit and (n := count_containers(body, exact=True)) > limit:
        raise TooLargeError(
            f"the request body holds {n} JSON arrays and objects; a request carries at most "
            f"{max_cells} cells (CELLEXPLAIN_MAX_CELLS_PER_REQUEST), one array or object each: "
            "split the request",
            "cells",
        )
    return quick


def parse(body: bytes | bytearray) -> tuple[Any, bool]:
    """The simdjson document of ``body`` and whether NaN/Infinity literals were read.

    Raises:
        InvalidInputError: not JSON (not UTF-8, bad structure, numbers out of range, nesting
            deeper than simdjson's 1024 levels).
    """
    try:
        return simdjson.Parser().parse(body), False
    except (ValueError, RuntimeError, TypeError) as e:
        if b"NaN" in body or b"Infinity" in body:
            fixed = _replace_non_json(body)
            try:
                return simdjson.Parser().parse(fixed), True
            except (ValueError, RuntimeError, TypeError):
                pass
        raise InvalidInputError(f"request body is not valid JSON: {_reason(e)}", "body") from e


def _replace_non_json(body: bytes | bytearray) -> bytearray:
    """``body`` with NaN/Infinity literals outside strings overwritten, in one copy, by their
    same-length sentinels (no list of pieces: a body of NaN is a million matches)."""
    fixed = bytearray(body)
    for m in _NON_JSON.finditer(body):
        sentinel = _SENTINELS.get(m.group(0))
        if sentinel is not None:
            fixed[m.start() : m.end()] = sentinel
    return fixed


def _reason(e: Exception) -> str:
    text = str(e)
    if isinstance(e, UnicodeDecodeError):
        return "it is not UTF-8"
    if text.startswith("NUMBER_ERROR"):
        return "a number is malformed or beyond the float64 range (1.8e308)"
    if text.startswith("DEPTH_ERROR"):
        return "arrays and objects are nested too deeply"
    return brief(text.split(":", 1)[-1].strip(), 160)


def may_hold_nan(values: np.ndarray) -> bool:
    """Whether integers read from a body that held NaN literals may hold one: its sentinel
    (``-9``) reads as an integer, which :func:`restore_non_json` cannot turn back."""
    return bool((values == _NAN).any())


def restore_non_json(values: np.ndarray) -> None:
    """Turn the sentinels of :func:`parse` back into NaN, inf and -inf (in place). Only
    bodies that held such literals get here, and they are refused anyway: a genuine ``-9``
    among them is reported as NaN rather than as negative."""
    values[values == _INF_TINY] = np.inf
    values[values == _NEG_INF_TINY] = -np.inf
    values[values == _NAN] = np.nan


def scalar_fields(doc: Any, names: set[str], where: str = "") -> dict[str, Any]:
    """Python values of the ``names`` fields of object ``doc`` that are present; a field that is
    an array or object is refused before it is converted (it could be huge)."""
    out: dict[str, Any] = {}
    for name in names:
        if name in doc:
            value = doc[name]
            if not isinstance(value, _SCALAR):
                raise InvalidInputError(
                    f"{where}{name} must be a {'string' if name != 'top_k' else 'number'}, not "
                    f"a JSON {'array' if isinstance(value, simdjson.Array) else 'object'}",
                    f"{where}{name}",
                )
            out[name] = value
    return out


def string_list(value: Any, field: str, limit: int, what: str) -> list[str]:
    """A JSON array of at most ``limit`` strings as a list (413 over the limit)."""
    if not isinstance(value, simdjson.Array):
        raise InvalidInputError(f"{field} must be a list of strings", field)
    if len(value) > limit:
        raise TooLargeError(f"{len(value)} {what} in one request; the limit is {limit}", field)
    items = value.as_list()
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise InvalidInputError(f"{field}[{i}] is not a string: {brief(item)}", f"{field}[{i}]")
    return items  # type: ignore[return-value]


def unique_keys(doc: Any, where: str) -> list[str]:
    keys = list(doc.keys())
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dup = next(k for k in keys if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise InvalidInputError(f"{where or 'the body'} names {brief(dup)} twice", where or "body")
    return keys


def parse_annotate(body: bytes | bytearray, max_cells: int, max_genes: int) -> ParsedAnnotate:
    """Read a ``/v1/annotate`` body (see :class:`cellexplain.api.schemas.AnnotateRequest`).

    Raises:
        InvalidInputError: malformed JSON, wrong types, ragged rows, unknown fields.
        TooLargeError: more cells or genes than the limits.
        pydantic.ValidationError: an option of the wrong value (the REST layer names it).
    """
    containers = check_containers(body, max_cells)
    doc, non_json = parse(body)
    if not isinstance(doc, simdjson.Object):
        raise InvalidInputError("request body must be a JSON object with a 'cells' field", "body")
    keys = unique_keys(doc, "")
    option_names = set(AnnotateOptions.model_fields)
    unknown = [k for k in keys if k not in option_names and k not in ("genes", "cells", "cell_ids")]
    if unknown:
        raise InvalidInputError(f"{brief(unknown[0])}: unknown field", unknown[0])
    # strict: JSON has types; "5", true or 2.0 for top_k is a client bug, not a number
    options = AnnotateOptions.model_validate(scalar_fields(doc, option_names), strict=True)
    genes: list[str] | None = None
    if doc.get("genes") is not None:
        genes = string_list(doc["genes"], "genes", max_genes, "genes")
    cell_ids = None
    if doc.get("cell_ids") is not None:
        cell_ids = string_list(doc["cell_ids"], "cell_ids", max_cells, "cell ids")
    if "cells" not in doc:
        raise InvalidInputError("cells: field required", "cells")
    cells = doc["cells"]
    if not isinstance(cells, simdjson.Array):
        raise InvalidInputError("cells must be a list of rows or of {gene: value} maps", "cells")
    n = len(cells)
    check_cell_count(n, max_cells)  # before the matrix is allocated; the rule is the core's
    if n == 0:  # refused by the core, with every other door's message
        g = list(genes or [])
        return ParsedAnnotate(options, g, np.zeros((0, len(g)), np.float32), cell_ids, "genes")
    if isinstance(cells[0], simdjson.Object):
        columns, X = _sparse(cells, genes, max_genes)
        if non_json:
            restore_non_json(X.data)
        return ParsedAnnotate(options, columns, X, cell_ids, "genes" if genes else "cells")
    Xd = _dense(body, containers, cells, genes, n, cell_ids is not None)
    if non_json:
        restore_non_json(Xd)
    assert genes is not None
    return ParsedAnnotate(options, genes, Xd, cell_ids, "genes")


def _dense(
    body: bytes | bytearray,
    containers: int,
    cells: Any,
    genes: list[str] | None,
    n: int,
    with_ids: bool,
) -> np.ndarray:
    """The rows of ``cells`` as one ``[n, len(genes)]`` array; ``containers`` is the body's
    quick count of arrays and objects (:func:`check_containers`)."""
    if genes is None:
        raise InvalidInputError(
            "genes is required when cells are rows of values (or send cells as {gene: value} maps)",
            "genes",
        )
    g = len(genes)
    if g == 0:
        raise InvalidInputError("genes is empty: send the gene of each column", "genes")
    for i, row in enumerate(cells):
        if not isinstance(row, simdjson.Array):
            raise InvalidInputError(
                f"cells[{i}] is {_json_type(row)}, not a list of {g} values (one per gene)",
                f"cells[{i}]",
            )
        if len(row) != g:
            raise InvalidInputError(
                f"cells[{i}] has {len(row)} values but genes has {g}: every row needs one value "
                "per gene",
                f"cells[{i}]",
            )
    try:
        flat = np.frombuffer(cells.as_buffer(of_type="d"), dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise _first_non_number(cells) from e
    # as_buffer flattens nested arrays: a row holding an array is malformed even when the
    # count of values happens to match; rows + cells + genes (+ cell_ids) are all it may hold
    allowed = 1 + 1 + n + 1 + with_ids  # the body, cells, its rows, genes, cell_ids
    if flat.size != n * g or (
        containers > allowed and count_containers(body, exact=True) > allowed
    ):
        raise InvalidInputError(
            "cells rows must be flat lists of numbers (a row holds a nested list)", "cells"
        )
    return flat.reshape(n, g)


def _first_non_number(cells: Any) -> InvalidInputError:
    for i, row in enumerate(cells):
        for j, v in enumerate(row):
            if type(v) not in (int, float):
                return InvalidInputError(
                    f"cells[{i}][{j}] is not a number: {brief(v)}", f"cells[{i}][{j}]"
                )
    return InvalidInputError("cells rows must hold numbers only", "cells")


def _json_type(value: Any) -> str:
    if isinstance(value, simdjson.Object):
        return "an object"
    if value is None:
        return "null"
    return {str: "a string", bool: "a boolean"}.get(type(value), "a number")


def _sparse(cells: Any, genes: list[str] | None, max_genes: int) -> tuple[list[str], sp.csr_matrix]:
    def maps() -> Iterator[Mapping[str, float]]:
        for i, cell in enumerate(cells):
            if not isinstance(cell, simdjson.Object):
                raise InvalidInputError(
                    f"cells[{i}] is not a {{gene: value}} map like cells[0]", f"cells[{i}]"
                )
            keys = unique_keys(cell, f"cells[{i}]")
            values = list(cell.values())
            for k, v in zip(keys, values, strict=True):
                if type(v) not in (int, float):
                    raise InvalidInputError(
                        f"cells[{i}][{brief(k)}] is not a number: {brief(v)}", f"cells[{i}]"
                    )
            yield dict(zip(keys, values, strict=True))  # type: ignore[arg-type]

    from cellexplain.api.annotations import sparse_from_maps

    return sparse_from_maps(maps(), genes, max_genes)
