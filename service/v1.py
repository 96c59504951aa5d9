"""The typed ``/v1`` API's answer, written from a :class:`~cellexplain.service.core.Result`.

Two writers of one response, :class:`~cellexplain.api.schemas.AnnotateResponse`:
:func:`json_bytes` for REST and :func:`protobuf_bytes` (``cellexplain.v1.AnnotateResponse``)
for gRPC. Both write bytes straight from the result's arrays: the names (genes, classes,
programs) are encoded once per model (:class:`_Names`), numbers a whole array at a time, and a
cell is a join of ready-made pieces, never a dict or message object per cell and gene (building
those cost more than running the model). The unit tests decode both with pydantic and protobuf
and check they say the same, for every option.

Fields: every cell has ``id``, ``label`` (``Unassigned`` below the confidence threshold or at
the novelty threshold), ``predicted_label`` and ``confidence``, ``unassigned_reason`` when it is
Unassigned, ``novelty`` (models with the score); with attributions, ``explained_class`` and
``top_genes`` and ``genes_against`` (``top_k``: the largest positive attributions, the most
negative) or ``attributions`` (``full``, in ``attribution_genes`` order),
plus, for programs models, ``program_attributions`` (the ``top_k``, or all) and
``free_units_attribution``, and ``completeness_gap``; ``probabilities`` with
``return_probabilities``.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import orjson

from cellexplain.api.annotations import UNASSIGNED, UNASSIGNED_REASONS
from cellexplain.api.codegen import load
from cellexplain.api.errors import InvalidInputError, TooLargeError
from cellexplain.service import metrics, protowire
from cellexplain.service.core import Answer, Result
from cellexplain.service.protowire import FIXED32, LEN, key, length_prefix, string, varint

pb = load("cellexplain_v1_pb2")
_F32 = struct.Struct("<f")


def _pair_prefix(field: int, name: str) -> bytes:
    """A ``{name (1): string, value (2): float}`` message in repeated field ``field``, up to the
    float's 4 bytes (GeneAttribution, ProgramAttribution, a map<string, float> entry)."""
    inner = string(1, name) + key(2, FIXED32)
    return length_prefix(field, len(inner) + 4) + inner


# CellAnnotation's fields
_ID, _LABEL, _PREDICTED, _CONFIDENCE, _EXPLAINED = 1, 2, 3, 4, 5
_PROBABILITIES, _TOP_GENES, _ATTRIBUTIONS, _PROGRAMS, _FREE, _GAP = 6, 7, 8, 9, 10, 11
_NOVELTY, _REASON, _AGAINST = 12, 13, 14
_CELLS = 8  # AnnotateResponse.cells


@dataclass(frozen=True)
class _Names:
    """A model's names, encoded once: JSON pieces and protobuf prefixes per class, gene and
    program (object arrays, indexed by the result's integer arrays)."""

    label_json: np.ndarray  # [n_classes + 1]: the classes, then Unassigned
    class_json: np.ndarray
    gene_json: np.ndarray  # b'{"gene":"CD3E","attribution":'
    program_json: np.ndarray
    prob_json: np.ndarray  # b'"B cells":'
    label_pb: np.ndarray
    predicted_pb: np.ndarray
    explained_pb: np.ndarray
    gene_pb: np.ndarray
    against_pb: np.ndarray
    program_pb: np.ndarray
    prob_pb: np.ndarray


@lru_cache(maxsize=16)
def _names(classes: tuple[str, ...], genes: tuple[str, ...], programs: tuple[str, ...]) -> _Names:
    def obj(items: list[bytes]) -> np.ndarray:
        a = np.empty(len(items), dtype=object)
        a[:] = items
        return a

    q = orjson.dumps
    return _Names(
        label_json=obj([q(c) for c in (*classes, UNASSIGNED)]),
        class_json=obj([q(c) for c in classes]),
        gene_json=obj([b'{"gene":' + q(g) + b',"attribution":' for g in genes]),
        program_json=obj([b'{"program":' + q(p) + b',"attribution":' for p in programs]),
        prob_json=obj([q(c) + b":" for c in classes]),
        label_pb=obj([string(_LABEL, c) for c in (*classes, UNASSIGNED)]),
        predicted_pb=obj([string(_PREDICTED, c) for c in classes]),
        explained_pb=obj([string(_EXPLAINED, c) for c in classes]),
        gene_pb=obj([_pair_prefix(_TOP_GENES, g) for g in genes]),
        against_pb=obj([_pair_prefix(_AGAINST, g) for g in genes]),
        program_pb=obj([_pair_prefix(_PROGRAMS, p) for p in programs]),
        prob_pb=obj([_pair_prefix(_PROBABILITIES, c) for c in classes]),
    )


def _cells(res: Result) -> tuple[_Names, Answer]:
    """The answer's names (cached per model) and its shape (:attr:`Result.answer`)."""
    card = res.card
    programs = tuple(card.gene_sets.programs) if card.gene_sets is not None else ()
    return _names(tuple(res.classes), tuple(card.genes), programs), res.answer


#: ``unassigned_reason`` by reason code, as JSON members and protobuf fields
_REASON_JSON = np.array(
    [b""] + [b',"unassigned_reason":' + orjson.dumps(r) for r in UNASSIGNED_REASONS[1:]],
    dtype=object,
)
_REASON_PB = np.array([b""] + [string(_REASON, r) for r in UNASSIGNED_REASONS[1:]], dtype=object)


def _json_entries(names: np.ndarray, values: np.ndarray, present: np.ndarray) -> np.ndarray:
    """``[n, k]`` JSON list entries ``{"gene":..,"attribution":..}`` (``names``: their openings),
    comma-led after the first, empty where not ``present`` (absent entries come last)."""
    entries = names + _json_numbers(values) + b"}"
    if entries.shape[1] > 1:
        entries[:, 1:] = b"," + entries[:, 1:]
    return np.where(present, entries, b"")


def _objects(items: list[bytes] | np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """bytes pieces as an object array of ``shape`` (filled in C, no Python loop)."""
    a = np.empty(len(items), dtype=object)
    a[:] = items
    return a.reshape(shape)


def _json_numbers(values: np.ndarray) -> np.ndarray:
    """float32 values as JSON numbers, an object array of ``values``' shape: one orjson call,
    then a split.

    Written as the float64 the float32 is (``0.9935251474380493``, not the float32's shortest
    ``0.99352515``), so a JSON client reads bit for bit what a protobuf client reads."""
    flat = np.ascontiguousarray(values, dtype=np.float32).astype(np.float64).ravel()
    if flat.size == 0:
        return np.empty(values.shape, dtype=object)
    pieces = orjson.dumps(flat, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",")
    return _objects(pieces, values.shape)


class _Rows:
    """A response's cells as rows of byte pieces (``[n, pieces]``), filled a column (or a block
    of columns) at a time with numpy and joined once per cell: no Python loop over values."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._blocks: list[np.ndarray] = []

    def add(self, *columns: bytes | np.ndarray) -> None:
        """Columns in order: a bytes constant (every cell), an ``[n]`` or ``[n, k]`` array."""
        for c in columns:
            if isinstance(c, bytes):
                block = np.empty((self.n, 1), dtype=object)
                block[:] = c
            else:
                block = c.reshape(self.n, -1)
            self._blocks.append(block)

    def interleave(self, *grids: np.ndarray | bytes, last: bytes | None = None) -> None:
        """``[n, k]`` (or ``[k]``: the same for every cell) grids and constants woven column
        by column: g0[:, 0], g1[:, 0], ..., g0[:, 1], ... (a list of k entries of several
        pieces each); ``last`` replaces the final piece (a separator after the last entry)."""
        k = next(g.shape[-1] for g in grids if isinstance(g, np.ndarray))
        if k == 0:
            return
        block = np.empty((self.n, k * len(grids)), dtype=object)
        for j, g in enumerate(grids):
            block[:, j :: len(grids)] = g
        if last is not None:
            block[:, -1] = last
        self._blocks.append(block)

    def joined(self) -> bytes:
        """Every cell's pieces, in order, as one bytes."""
        if not self._blocks:
            return b""
        return b"".join(np.concatenate(self._blocks, axis=1).ravel().tolist())

    def cells(self) -> list[bytes]:
        """Each cell's pieces joined."""
        if not self._blocks:
            return [b""] * self.n
        rows = np.concatenate(self._blocks, axis=1).tolist()
        return [b"".join(r) for r in rows]


def json_bytes(res: Result) -> bytes:
    """The response as JSON (UTF-8)."""
    t0 = time.perf_counter()
    opts = res.options
    nm, c = _cells(res)
    n = len(res)
    rows = _Rows(n)
    ids = _objects([orjson.dumps(i) for i in res.cell_ids], (n,))
    rows.add(b'{"id":', ids, b',"label":', nm.label_json[c.label_code])
    rows.add(b',"predicted_label":', nm.class_json[res.best])
    rows.add(b',"confidence":', _json_numbers(res.confidence))
    rows.add(_REASON_JSON[res.reason_code])
    if res.novelty is not None:
        rows.add(b',"novelty":', _json_numbers(res.novelty))
    if opts.attributions != "none":
        rows.add(b',"explained_class":', nm.class_json[res.explained_class])
    if opts.return_probabilities:
        rows.add(b',"probabilities":{')
        rows.interleave(nm.prob_json, _json_numbers(res.probabilities), b",", last=b"")
        rows.add(b"}")
    # the /v1 contract: top genes with attributions='top_k', the whole vector with 'full'
    if opts.attributions == "top_k" and c.top is not None and c.against is not None:
        for member, (idx, values, present) in (
            (b"top_genes", c.top),
            (b"genes_against", c.against),
        ):
            rows.add(b',"' + member + b'":[', _json_entries(nm.gene_json[idx], values, present))
            rows.add(b"]")
    elif opts.attributions == "full":  # a row per orjson call: no Python object per value
        wide = res.attributions.astype(np.float64)
        full = [orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY) for row in wide]
        rows.add(b',"attributions":', _objects(full, (n,)))
    if c.programs is not None and c.program_values is not None and c.free is not None:
        rows.add(b',"program_attributions":[')
        rows.interleave(
            nm.program_json[c.programs], _json_numbers(c.program_values), b"},", last=b"}"
        )
        rows.add(b'],"free_units_attribution":', _json_numbers(c.free))
    if c.gap is not None:
        rows.add(b',"completeness_gap":', _json_numbers(c.gap))
    rows.add(b"}")
    out = rows.cells()
    assert res.matching is not None
    head = {
        "model": res.model.name,
        "model_version": res.card.version,
        "input_kind": res.input_kind,
        "attribution_method": res.card.attribution.method,
        "unassigned_threshold": res.threshold,
        "novelty_threshold": res.novelty_threshold,
        "gene_matching": res.matching.model_dump(),
        "warnings": res.warnings,
    }
    if opts.attributions == "full":
        head["attribution_genes"] = list(res.card.genes)
    body = orjson.dumps(head)[:-1] + b',"cells":[' + b",".join(out) + b"]}"
    metrics.ATTRIBUTION_SECONDS.labels(model=res.model.name).observe(time.perf_counter() - t0)
    return body


def _f32_pieces(values: np.ndarray) -> np.ndarray:
    """float32 values as their 4 little-endian bytes each, an object array of ``values``'
    shape."""
    raw = np.ascontiguousarray(values, dtype="<f4").tobytes()
    return np.frombuffer(raw, dtype="V4").astype(object).reshape(values.shape)


#: varint encodings of the lengths most cells have
_VARINTS = _objects([varint(i) for i in range(1 << 14)], (1 << 14,))


def protobuf_bytes(res: Result) -> bytes:
    """The response as a serialised ``cellexplain.v1.AnnotateResponse``: the header by the
    protobuf library, the cells by hand (a message's bytes followed by more fields of it are
    the message with those fields: the protobuf encoding's merge rule)."""
    t0 = time.perf_counter()
    opts = res.options
    nm, c = _cells(res)
    n = len(res)
    rows = _Rows(n)
    rows.add(_objects([string(_ID, i) if i else b"" for i in res.cell_ids], (n,)))
    rows.add(nm.label_pb[c.label_code], nm.predicted_pb[res.best])
    rows.add(key(_CONFIDENCE, FIXED32), _f32_pieces(res.confidence))
    rows.add(_REASON_PB[res.reason_code])
    if res.novelty is not None:
        rows.add(key(_NOVELTY, FIXED32), _f32_pieces(res.novelty))
    if opts.attributions != "none":
        rows.add(nm.explained_pb[res.explained_class])
    if opts.return_probabilities:
        rows.interleave(nm.prob_pb, _f32_pieces(res.probabilities))
    # the /v1 contract: top genes with attributions='top_k', the whole vector with 'full'
    if opts.attributions == "top_k" and c.top is not None and c.against is not None:
        for names, (idx, values, present) in ((nm.gene_pb, c.top), (nm.against_pb, c.against)):
            rows.interleave(
                np.where(present, names[idx], b""),
                np.where(present, _f32_pieces(values), b""),
            )
    elif opts.attributions == "full" and res.attributions.shape[1]:
        g = res.attributions.shape[1]
        raw = np.ascontiguousarray(res.attributions, dtype="<f4")
        per_cell = raw.view(np.dtype((np.void, 4 * g))).reshape(n).astype(object)
        rows.add(length_prefix(_ATTRIBUTIONS, 4 * g), per_cell)
    if c.programs is not None and c.program_values is not None and c.free is not None:
        rows.interleave(nm.program_pb[c.programs], _f32_pieces(c.program_values))
        rows.add(key(_FREE, FIXED32), _f32_pieces(c.free))
    if c.gap is not None:
        rows.add(key(_GAP, FIXED32), _f32_pieces(c.gap))
    cells = rows.cells()
    lengths = np.fromiter(map(len, cells), dtype=np.int64, count=n)
    framed = _Rows(n)
    short = bool(n == 0 or lengths.max() < len(_VARINTS))
    sizes = _VARINTS[lengths] if short else _objects([varint(v) for v in lengths.tolist()], (n,))
    framed.add(key(_CELLS, LEN), sizes, _objects(cells, (n,)))
    assert res.matching is not None
    header = pb.AnnotateResponse(
        model=res.model.name,
        model_version=res.card.version,
        input_kind=res.input_kind,
        attribution_method=res.card.attribution.method,
        unassigned_threshold=res.threshold,
        novelty_threshold=res.novelty_threshold,
        gene_matching=pb.GeneMatching(**res.matching.model_dump(exclude_none=True)),
        attribution_genes=list(res.card.genes) if opts.attributions == "full" else [],
        warnings=res.warnings,
    ).SerializeToString()
    body = header + framed.joined()
    metrics.ATTRIBUTION_SECONDS.labels(model=res.model.name).observe(time.perf_counter() - t0)
    return body


# -- requests, counted before they are parsed ----------------------------------------------------
_IN = pb.AnnotateRequest.DESCRIPTOR.fields_by_name
_IN_GENES, _IN_SPARSE, _IN_CELL_IDS = (_IN[n].number for n in ("genes", "sparse", "cell_ids"))
_IN_OPTIONS, _IN_DENSE = _IN["options"].number, _IN["dense"].number
_DENSE_N_CELLS = pb.DenseMatrix.DESCRIPTOR.fields_by_name["n_cells"].number
_IN_SPARSE_CELLS = pb.SparseCells.DESCRIPTOR.fields_by_name["cells"].number
_IN_ALL = tuple(f.number for f in pb.AnnotateRequest.DESCRIPTOR.fields)
#: how often a field that is not a list may occur in a message (protobuf merges repeats)
SINGULAR_REPEATS = 4


def check_annotate_wire(data: bytes, max_cells: int, max_genes: int) -> None:
    """Count an ``AnnotateRequest``'s fields in its wire bytes, before protobuf makes an object
    of each: genes, cell ids and sparse cells within the request limits, at most
    :data:`SINGULAR_REPEATS` of each other field, at most 64 fields the message does not
    define. Four million empty sparse cells are 8 MB on the wire and ~2.6 GB once parsed. The
    walk stops at the first bound passed, so it costs what the limits allow, not what the
    message holds.

    Raises:
        TooLargeError: more genes, cells or cell ids than a request may have.
        InvalidInputError: other fields repeated or unknown beyond their bounds, or bytes that
            are not a message (parsing would fail too).
    """
    bounds = {n: SINGULAR_REPEATS for n in _IN_ALL}
    bounds.update({_IN_GENES: max_genes, _IN_CELL_IDS: max_cells})
    try:
        for number, wire, start, end in protowire.bounded_fields(data, bounds):
            if number == _IN_SPARSE and wire == protowire.LEN:
                cells = memoryview(data)[start:end]
                try:
                    for _ in protowire.bounded_fields(cells, {_IN_SPARSE_CELLS: max_cells}):
                        pass
                except protowire.TooManyFieldsError as e:
                    if e.number is None:
                        raise InvalidInputError(
                            f"sparse repeats fields it does not define more than {e.bound} times",
                            "sparse",
                        ) from None
                    raise TooLargeError(
                        f"more than {max_cells} cells in one request; the limit is {max_cells} "
                        "(split the request, or stream chunks with AnnotateStream)",
                        "sparse",
                    ) from None
    except protowire.TooManyFieldsError as e:
        if e.number in (_IN_GENES, _IN_CELL_IDS):
            what = "genes" if e.number == _IN_GENES else "cell_ids"
            raise TooLargeError(
                f"more than {e.bound} {what} in one request; the limit is {e.bound}", what
            ) from None
        field = "fields it does not define" if e.number is None else f"field {e.number}"
        raise InvalidInputError(
            f"the request message repeats {field} more than {e.bound} times", "request"
        ) from None
    except ValueError as e:
        raise InvalidInputError(
            f"the request message is not a valid protobuf for this method ({e})", "request"
        ) from e


def annotate_wire_demand(
    data: bytes, most: int = 4096, max_fields: int = 4096
) -> tuple[str | None, int] | None:
    """The model an ``AnnotateRequest`` names (``None``: the default) and at least how many
    cells it holds (a dense matrix's ``n_cells``; sparse cells counted up to ``most``), read
    from its wire bytes without parsing its values: what a full queue refuses before the
    message is parsed. ``None`` for bytes that are not such a message (the parse says why), or
    whose cells come after more than ``max_fields`` top-level fields (a gene list that long:
    the walk is one Python step per field, and it runs on the door's loop)."""
    view = memoryview(data)
    options = bytearray()
    n = 0
    try:
        for i, (number, wire, start, end) in enumerate(protowire.fields(view)):
            if i >= max_fields:
                return None
            if wire != protowire.LEN:
                continue
            if number == _IN_OPTIONS:  # repeated occurrences merge, as protobuf merges them
                options += view[start:end]
            elif number == _IN_DENSE:
                for field, kind, begin, _ in protowire.fields(view[start:end]):
                    if field == _DENSE_N_CELLS and kind == protowire.VARINT:
                        n = protowire.read_varint(view[start:end], begin)[0]
            elif number == _IN_SPARSE:
                n = protowire.count_field(view[start:end], _IN_SPARSE_CELLS, most)
        model = pb.AnnotateOptions.FromString(bytes(options)).model if options else ""
    except Exception:  # not the wire format, or options protobuf refuses
        return None
    return model or None, n
