"""The core and its codecs in-process (no server): one :class:`Result`, every rendering.

The JSON and protobuf writers of the typed API (``service/v1.py``), the AnnData rendering
(``service/anndata_io.py``) and the Open Inference Protocol's tensors must say the same thing
about the same cells, for every option: decoded with pydantic and with the protobuf library,
compared with each other and with the result's own arrays.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re

import numpy as np
import pytest

from cellexplain.api import proto_v1
from cellexplain.api.annotations import UNASSIGNED, UNASSIGNED_REASONS, Annotations
from cellexplain.api.codegen import load
from cellexplain.api.errors import InvalidInputError
from cellexplain.api.schemas import AnnotateOptions, AnnotateResponse
from cellexplain.service import anndata_io, oip, oip_http, v1
from cellexplain.service.core import Annotator, Result
from cellexplain.service.settings import Settings

pb = load("cellexplain_v1_pb2")


@pytest.fixture(scope="module")
def annotator(programs_model):
    _, folder = programs_model
    a = Annotator.from_settings(Settings(models=[], model_dirs=[str(folder)]))
    yield a
    a.close()


@pytest.fixture(scope="module")
def cells(pbmc):
    raw = pbmc.raw.to_adata()[:40]
    return list(raw.var_names), np.asarray(raw.X.toarray(), dtype=np.float32)


def run(annotator: Annotator, cells, **options) -> Result:
    genes, X = cells
    ids = [f'cell "{i}" \\ é' for i in range(X.shape[0])]  # needs escaping in JSON
    opts = AnnotateOptions(input="log1p_cp10k", **options)
    return asyncio.run(annotator.annotate(genes, X, opts, ids))


def decoded(res: Result) -> tuple[AnnotateResponse, AnnotateResponse]:
    from_json = AnnotateResponse.model_validate_json(v1.json_bytes(res))
    from_pb = proto_v1.response_from_proto(pb.AnnotateResponse.FromString(v1.protobuf_bytes(res)))
    return from_json, from_pb


OPTIONS = [
    dict(zip(("attributions", "top_k", "return_probabilities"), combo, strict=True))
    for combo in itertools.product(("top_k", "full", "none"), (0, 3, 10), (False, True))
]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_json_and_protobuf_say_what_the_result_holds(annotator, cells, options):
    res = run(annotator, cells, **options)
    card = res.card
    assert card.novelty is not None
    programs = card.gene_sets.programs if card.gene_sets else []
    for r in decoded(res):
        assert r.model == card.name and r.input_kind == "log1p_cp10k"
        assert r.gene_matching == res.matching
        assert len(r.cells) == len(res)
        full = options["attributions"] == "full"
        assert r.attribution_genes == (list(card.genes) if full else None)
        for i, c in enumerate(r.cells):
            assert c.id == res.cell_ids[i]
            best = res.classes[res.best[i]]
            assert c.predicted_label == best
            assert c.label == (best if res.assigned[i] else UNASSIGNED)
            assert c.confidence == pytest.approx(float(res.confidence[i]), rel=1e-6)
            explain = options["attributions"] != "none"
            assert c.explained_class == (res.classes[res.explained_class[i]] if explain else None)
            if options["return_probabilities"]:
                assert c.probabilities is not None
                assert sorted(c.probabilities) == sorted(res.classes)  # a map: no order
                np.testing.assert_allclose(
                    [c.probabilities[k] for k in res.classes], res.probabilities[i], rtol=1e-6
                )
            else:
                assert not c.probabilities
            reason = None if res.assigned[i] else UNASSIGNED_REASONS[res.reason_code[i]]
            assert c.unassigned_reason == reason
            assert res.novelty is not None and c.novelty == pytest.approx(float(res.novelty[i]))
            assert r.novelty_threshold == pytest.approx(card.novelty.threshold)
            a = res.attributions[i]
            if options["attributions"] == "top_k":
                # the evidence for the call: positive attributions only, largest first; against
                # it: negative only, most negative first
                k = options["top_k"]
                for listed, sign in ((c.top_genes, 1), (c.genes_against, -1)):
                    assert listed is not None
                    order = np.argsort(-sign * a, kind="stable")[:k]
                    order = order[sign * a[order] > 0]
                    assert [g.gene for g in listed] == [card.genes[j] for j in order]
                    np.testing.assert_allclose([g.attribution for g in listed], a[order])
            else:
                assert c.top_genes is None and c.genes_against is None
            if full:
                np.testing.assert_array_equal(np.float32(c.attributions), a)
            else:
                assert c.attributions is None
            if explain:
                assert res.completeness_gap is not None
                assert c.completeness_gap == pytest.approx(
                    float(res.completeness_gap[i]), rel=1e-6, abs=1e-12
                )
            else:
                assert c.completeness_gap is None
            pa = res.program_attributions
            if explain and pa is not None and (full or options["top_k"] > 0):
                want = len(programs) if full else min(options["top_k"], len(programs))
                assert c.program_attributions is not None
                assert len(c.program_attributions) == want
                index = {p: j for j, p in enumerate(programs)}
                for p in c.program_attributions:
                    assert p.attribution == pytest.approx(float(pa[i, index[p.program]]))
                assert c.free_units_attribution == pytest.approx(
                    float(a.sum() - pa[i].sum()), abs=1e-5
                )


def test_every_unassigned_reason_is_said_by_both_writers(annotator, cells):
    first = run(annotator, cells, attributions="none")
    assert first.novelty is not None
    # thresholds at the medians: cells Unassigned for each reason, and assigned ones
    conf, nov = float(np.median(first.confidence)), float(np.median(first.novelty))
    res = run(
        annotator, cells, attributions="none", unassigned_threshold=conf, novelty_threshold=nov
    )
    low, novel = res.confidence < conf, res.novelty >= nov
    np.testing.assert_array_equal(res.reason_code, low + 2 * novel)
    assert set(res.reason_code) == {0, 1, 2, 3}, res.reason_code
    for r in decoded(res):
        assert r.novelty_threshold == pytest.approx(nov)
        for i, c in enumerate(r.cells):
            want = {0: None, 1: "low_confidence", 2: "novel", 3: "low_confidence_and_novel"}
            assert c.unassigned_reason == want[int(low[i]) + 2 * int(novel[i])]
            assert (c.label == UNASSIGNED) == bool(low[i] or novel[i])


def test_the_two_writers_agree_exactly_on_the_values(annotator, cells):
    res = run(annotator, cells, attributions="full", return_probabilities=True)
    from_json, from_pb = decoded(res)
    assert from_json.model_dump() == from_pb.model_dump()


def test_labels_below_the_threshold_are_unassigned_in_every_rendering(annotator, cells):
    confidence = run(annotator, cells).confidence
    middle = float(np.median(confidence))  # some cells on each side, whatever the model
    res = run(annotator, cells, unassigned_threshold=middle, attributions="full")
    assert (~res.assigned).any() and res.assigned.any()  # both kinds present
    want = [
        res.classes[b] if ok else UNASSIGNED for b, ok in zip(res.best, res.assigned, strict=True)
    ]
    for r in decoded(res):
        assert [c.label for c in r.cells] == want
    assert list(anndata_io.to_annotations(res).label) == want


@pytest.mark.parametrize("attributions", ["top_k", "full", "none"])
def test_anndata_rendering_matches_what_a_client_decodes(annotator, cells, attributions):
    """`--local` renders the result straight into AnnData arrays; a client decodes the
    response: the same cells must land the same way (the rule that differed: uploads with
    top_k wrote full attributions, the pipeline none)."""
    res = run(annotator, cells, attributions=attributions, return_probabilities=True)
    local = anndata_io.to_annotations(res)
    card = res.card
    programs = card.gene_sets.programs if card.gene_sets else []
    from_json, _ = decoded(res)
    remote = Annotations.from_response(from_json, card.classes, programs, res.options.top_k)
    for name in ("label", "predicted_label", "explained_class", "top_genes"):
        a, b = getattr(local, name), getattr(remote, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert list(a) == list(b), name
    assert (local.completeness_gap is None) == (attributions == "none")
    for name in (
        "confidence",
        "probabilities",
        "attributions",
        "program_attributions",
        "completeness_gap",
    ):
        a, b = getattr(local, name), getattr(remote, name)
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=name)
    assert (local.attributions is not None) == (attributions == "full")


def test_oip_inference_is_the_same_result(annotator, cells):
    genes, X = cells
    res = run(annotator, cells, attributions="full")
    lm = annotator.get(None)
    order = [genes.index(g) for g in lm.model.genes]
    oip = asyncio.run(annotator.infer(lm.name, X[:, order]))
    np.testing.assert_allclose(oip.probabilities, res.probabilities, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(oip.attributions, res.attributions, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(oip.completeness_gap, res.completeness_gap, rtol=1e-3, atol=1e-6)
    assert list(oip.labels) == list(res.labels)


def test_grpc_options_refuse_enum_values_the_proto_does_not_define():
    from cellexplain.api.errors import InvalidInputError

    for bad in (pb.AnnotateOptions(attributions=7), pb.AnnotateOptions(input=9)):
        with pytest.raises(InvalidInputError, match="unknown value"):
            proto_v1.options(bad)


def test_a_float32_threshold_reads_back_as_the_decimal_sent():
    msg = pb.AnnotateOptions(unassigned_threshold=0.95)
    assert proto_v1.options(msg).unassigned_threshold == 0.95


def test_the_gap_is_counted_per_cell_in_a_histogram(annotator, cells):
    from cellexplain.service import metrics

    def count() -> float:
        for family in metrics.COMPLETENESS_GAP.collect():
            for sample in family.samples:
                if sample.name.endswith("_count") and sample.labels["model"] == "pbmc-programs":
                    return sample.value
        return 0.0

    before = count()
    res = run(annotator, cells)
    assert count() == before + len(res)
    run(annotator, cells, attributions="none")  # nothing explained, nothing counted
    assert count() == before + len(res)


def test_the_card_records_the_gap_on_held_out_cells(annotator, cells):
    res = run(annotator, cells)
    dist = res.card.checks.completeness_gap
    assert dist is not None and 0 < dist.median <= dist.p90 <= dist.p99 <= dist.max
    assert res.completeness_gap is not None
    assert float(np.median(res.completeness_gap)) < 10 * dist.p99


# -- the Open Inference Protocol's HTTP decoding and its checks ------------------------------------
def _oip_infer(annotator: Annotator, body: bytes, header: str | None = None) -> Result:
    """Decode an OIP REST body and run it, as the /v2 door does."""
    req = oip_http.decode(body, header)
    lm = annotator.get(None)
    _, outputs = asyncio.run(oip.infer(annotator, lm.name, None, req.inputs, ["probabilities"]))
    return outputs[0].data


def _x_body(annotator: Annotator, values: list, datatype: str = "FP32", extra: str = "") -> bytes:
    g = len(annotator.get(None).model.genes)
    rows = len(values) // g
    spec = {"name": "x", "datatype": datatype, "shape": [rows, g], "data": values}
    return ('{"inputs": [' + json.dumps(spec) + "]" + extra + "}").encode()


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "FP64"])
@pytest.mark.parametrize("literal, kind", [("NaN", "NaN"), ("Infinity", "infinite")])
def test_oip_json_nan_and_infinity_are_named_where_they_are(annotator, datatype, literal, kind):
    """NaN/Infinity literals are read back before the cast to the input's datatype (a cast to
    float32 once turned the infinity placeholder into -0.0: every zero became infinite, and the
    first cell was blamed)."""
    g = len(annotator.get(None).model.genes)
    values = [0.0] * (3 * g)
    values[2 * g + g - 1] = float("nan") if literal == "NaN" else float("inf")
    with pytest.raises(InvalidInputError) as e:
        _oip_infer(annotator, _x_body(annotator, values, datatype))
    assert f"x[2][{g - 1}]" in str(e.value) and kind in str(e.value), str(e.value)


def test_a_nan_elsewhere_in_the_body_does_not_refuse_a_valid_x(annotator):
    g = len(annotator.get(None).model.genes)
    values = [0.0, 1.5] * (g // 2) + [0.0] * (g % 2)
    probs = _oip_infer(annotator, _x_body(annotator, values, extra=', "parameters": {"f": NaN}'))
    assert probs.shape[0] == 1 and np.isfinite(probs).all()


def test_fp64_values_are_checked_as_sent_and_against_float32s_range(annotator):
    g = len(annotator.get(None).model.genes)
    values = [0.0] * (2 * g)
    values[g + 3] = -1e-320  # negative, though float32 would read it as -0.0
    with pytest.raises(InvalidInputError, match=r"x\[1\]\[3\].*negative"):
        _oip_infer(annotator, _x_body(annotator, values, "FP64"))
    values[g + 3] = 1e300  # finite, but not as float32, and beyond what log1p data holds
    with pytest.raises(InvalidInputError, match=r"x\[1\]\[3\].*1e\+300, above 15"):
        _oip_infer(annotator, _x_body(annotator, values, "FP64"))
    for datatype, big in (("FP32", 1e39), ("FP16", 70000.0)):  # cast to infinity: named so
        values[g + 3] = big
        with pytest.raises(
            InvalidInputError, match=re.escape(f"x[1][3] is {big:g}, beyond {datatype}")
        ):
            _oip_infer(annotator, _x_body(annotator, values, datatype))


def test_oip_input_beyond_log1p_range_is_refused_and_never_reaches_the_metrics(annotator):
    """1e38 in every gene is a float32, but no log1p CP10k value: the graph's outputs were NaN,
    and the NaN confidence made the histogram's sum NaN for good."""
    g = len(annotator.get(None).model.genes)
    with pytest.raises(InvalidInputError, match=r"x\[0\]\[0\].*above 15"):
        _oip_infer(annotator, _x_body(annotator, [1e38] * g))
    values = [0.0] * (2 * g)
    values[3], values[g] = 20.0, -1.0  # the first bad value is named, whichever rule it breaks
    with pytest.raises(InvalidInputError, match=r"x\[0\]\[3\] .* is 20.0, above 15"):
        _oip_infer(annotator, _x_body(annotator, values, "FP64"))
    values = [0.0] * g
    values[7] = float(np.nextafter(np.float32(15), np.float32(16)))  # printed in full, not "15"
    with pytest.raises(InvalidInputError, match=r"is 15.000000953674316, above 15"):
        _oip_infer(annotator, _x_body(annotator, values))
    probs = _oip_infer(annotator, _x_body(annotator, [15.0] * g))  # the bound itself is valid
    assert np.isfinite(probs).all()


def test_oip_rest_binary_bodies_say_exactly_what_they_hold(annotator):
    g = len(annotator.get(None).model.genes)
    raw = np.zeros(g, "<f4").tobytes()

    def body(spec: dict, tail: bytes = b"") -> tuple[bytes, str]:
        head = json.dumps({"inputs": [spec]}).encode()
        return head + raw + tail, str(len(head))

    spec = {"name": "x", "datatype": "FP32", "shape": [1, g]}
    ok = {**spec, "parameters": {"binary_data_size": len(raw)}}
    assert _oip_infer(annotator, *body(ok)).shape[0] == 1
    with pytest.raises(InvalidInputError, match="4 bytes of binary data follow"):
        _oip_infer(annotator, *body(ok, b"\0" * 4))
    with pytest.raises(InvalidInputError, match="both data and binary_data_size"):
        _oip_infer(annotator, *body({**ok, "data": [0.0] * g}))
    twice = b'{"inputs": [], "inputs": ' + json.dumps([ok]).encode() + b"}"
    with pytest.raises(InvalidInputError, match=r"inputs.*twice"):
        oip_http.decode(twice + raw, str(len(twice)))


def test_an_integer_target_cannot_hide_a_nan(annotator):
    g = len(annotator.get(None).model.genes)
    x = {"name": "x", "datatype": "FP32", "shape": [1, g], "data": [0.0] * g}
    target = {"name": "target", "datatype": "INT64", "shape": [1], "data": [float("nan")]}
    with pytest.raises(InvalidInputError, match="target holds NaN"):
        oip_http.decode(json.dumps({"inputs": [x, target]}).encode(), None)


def test_protowire_walks_fields_without_parsing_them():
    from cellexplain.service import protowire

    req = pb.AnnotateRequest(genes=["A", "B", "C"], cell_ids=["x"])
    req.sparse.cells.add().values["A"] = 1.0
    req.sparse.cells.add()
    data = req.SerializeToString()
    numbers = [n for n, _, _, _ in protowire.fields(data)]
    assert numbers.count(2) == 3 and numbers.count(5) == 1 and numbers.count(4) == 1
    (start, end) = next((s, e) for n, _, s, e in protowire.fields(data) if n == 4)
    assert protowire.count_field(memoryview(data)[start:end], 1, 10) == 2
    # counting stops one past the limit, however many there are
    many = protowire.length_prefix(1, 0) * 1_000_000
    assert protowire.count_field(many, 1, 5) == 6
    for bad in (b"\x0a\x05ab", b"\xff" * 11, b"\x0b"):  # runs past the end, varint, wire type
        with pytest.raises(ValueError):
            list(protowire.fields(bad))


def test_annotate_messages_are_counted_before_they_are_parsed():
    from cellexplain.api.errors import TooLargeError
    from cellexplain.service import protowire
    from cellexplain.service.v1 import check_annotate_wire

    ok = pb.AnnotateRequest(genes=["A"] * 10)
    ok.sparse.cells.add()
    check_annotate_wire(ok.SerializeToString(), max_cells=5, max_genes=10)
    cells = protowire.length_prefix(1, 0) * 6
    with pytest.raises(TooLargeError, match="more than 5 cells"):
        check_annotate_wire(protowire.length_prefix(4, len(cells)) + cells, 5, 10)
    with pytest.raises(TooLargeError, match="more than 10 genes"):
        check_annotate_wire(pb.AnnotateRequest(genes=["A"] * 11).SerializeToString(), 5, 10)
    with pytest.raises(TooLargeError, match="cell_ids"):
        check_annotate_wire(pb.AnnotateRequest(cell_ids=["c"] * 6).SerializeToString(), 5, 10)
    with pytest.raises(InvalidInputError, match="not a valid protobuf"):
        check_annotate_wire(b"\x0a\x7f", 5, 10)


def test_oip_inputs_are_checked_from_their_declaration():
    oip.check_input("x", "FP32", [2, 3], 6)
    oip.check_input("target", "INT64", [2], None)
    for args, message in (
        (("y", "FP32", [1], 1), "unknown input"),
        (("x", "INT64", [1000, 1000], 10**6), "must be FP32"),
        (("x", "FP32", [1] * 1000, 1), "1000 dimensions"),
        (("x", "FP32", [2, -3], 6), "negative dimension"),
        (("x", "FP32", [2, 3], 5), "needs 6 values, got 5"),
    ):
        with pytest.raises(InvalidInputError, match=message):
            oip.check_input(*args)
    with pytest.raises(InvalidInputError, match="outputs asked for"):
        oip.check_output_count(oip.MAX_REQUESTED_OUTPUTS + 1)


def test_grpc_credentials_given_twice_are_refused_before_they_are_compared():
    from cellexplain.api.errors import UnauthenticatedError
    from cellexplain.service import auth

    auth.check_metadata(["k"], [("x-api-key", "k"), ("user-agent", "x")])
    with pytest.raises(InvalidInputError, match="x-api-key is given more than once"):
        auth.check_metadata(["k"], [("x-api-key", "k"), ("X-API-Key", "other")])
    with pytest.raises(UnauthenticatedError):
        auth.check_metadata(["k"], [("authorization", "Bearer nope")])


def test_an_oip_target_below_minus_one_is_refused(annotator):
    """-1 explains the predicted class; any other negative index is not a class."""
    x = np.zeros((2, len(annotator.get(None).model.genes)), np.float32)
    name = annotator.get(None).name
    with pytest.raises(InvalidInputError, match="out of range") as e:
        asyncio.run(annotator.infer(name, x, np.array([-5], np.int64)))
    assert e.value.field == "target"
    asyncio.run(annotator.infer(name, x, np.array([-1], np.int64)))


def test_top_genes_are_ranked_only_for_the_doors_that_send_them(annotator, cells):
    """/v1 with attributions='full' sends the whole vector: its writers never rank top genes
    (8 ms per 1024 cells); the AnnData door, which stores both, does."""
    res = run(annotator, cells, attributions="full", top_k=3)
    v1.json_bytes(res)
    v1.protobuf_bytes(res)
    assert "_for" not in res.answer.__dict__ and "_against" not in res.answer.__dict__
    ann = anndata_io.to_annotations(res)
    assert ann.top_genes is not None and ann.genes_against is not None
    assert res.answer.top is not None and res.answer.top[0].shape[1] == 3


def test_a_novelty_threshold_of_1_turns_the_flag_off(annotator, cells):
    genes, X = cells
    far = (genes, np.clip(3 * X, 0, 15))  # further from every type than any known cell
    res = run(annotator, far, attributions="none")
    assert res.novelty is not None and (res.novelty == 1).any() and res.novel.any()
    off = run(annotator, far, attributions="none", novelty_threshold=1.0)
    assert not off.novel.any() and off.novelty_threshold == 1.0
    np.testing.assert_array_equal(off.novelty, res.novelty)


def test_the_wire_demand_names_the_model_and_cells_without_parsing_them():
    """What a full queue refuses before parsing (v1.annotate_wire_demand): the model (options
    merged as protobuf merges them) and the dense n_cells or sparse cells counted, at most
    ``most``; bytes that are not a message give None."""
    dense = pb.AnnotateRequest(
        options=pb.AnnotateOptions(model="m1", top_k=3),
        genes=["A", "B"],
        dense=pb.DenseMatrix(n_cells=3, raw_le_float32=np.zeros(6, "<f4").tobytes()),
    ).SerializeToString()
    assert v1.annotate_wire_demand(dense) == ("m1", 3)
    later = pb.AnnotateRequest(options=pb.AnnotateOptions(model="m2")).SerializeToString()
    assert v1.annotate_wire_demand(dense + later) == ("m2", 3)  # a later options wins its field
    sparse = pb.AnnotateRequest(
        genes=["A"], sparse=pb.SparseCells(cells=[pb.SparseCell(values={"A": 1.0})] * 7)
    ).SerializeToString()
    assert v1.annotate_wire_demand(sparse) == (None, 7)
    assert v1.annotate_wire_demand(sparse, most=4) == (None, 5)  # a lower bound: 4 + 1
    assert v1.annotate_wire_demand(b"\xff\xff\xff") is None
    assert v1.annotate_wire_demand(dense, max_fields=3) is None  # cells past 3 fields: not read
    assert v1.annotate_wire_demand(b"") == (None, 0)
