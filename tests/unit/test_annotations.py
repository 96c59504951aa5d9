"""Client-side shaping of responses into AnnData arrays."""

from __future__ import annotations

import numpy as np
import pytest

from cellexplain.api.annotations import Annotations
from cellexplain.api.schemas import AnnotateResponse

CLASSES = ["B cell", "T cell", "Monocyte"]


def _response(probabilities: list[dict[str, float]]) -> AnnotateResponse:
    matching = {
        "n_model_genes": 3, "n_found": 3, "n_missing": 0, "missing": [], "n_submitted": 3,
        "n_unused": 0, "missing_fraction": 0.0,
    }  # fmt: skip
    cells = [
        {
            "id": str(i),
            "label": max(p, key=p.__getitem__),
            "predicted_label": max(p, key=p.__getitem__),
            "confidence": max(p.values()),
            "probabilities": p,
        }
        for i, p in enumerate(probabilities)
    ]
    return AnnotateResponse.model_validate(
        {
            "model": "m",
            "model_version": "1",
            "input_kind": "counts",
            "attribution_method": "integrated_gradients",
            "unassigned_threshold": 0.5,
            "gene_matching": matching,
            "cells": cells,
        }
    )


def test_probability_columns_follow_the_classes_not_the_map_order():
    """gRPC maps (and any JSON producer) may list classes in any order: the columns of
    obsm['cellexplain_probabilities'] must be in uns['cellexplain']['classes'] order."""
    res = _response(
        [
            {"Monocyte": 0.7, "B cell": 0.1, "T cell": 0.2},
            {"T cell": 0.6, "Monocyte": 0.3, "B cell": 0.1},
        ]
    )
    ann = Annotations.from_response(res, CLASSES, [])
    assert ann.probabilities is not None
    np.testing.assert_allclose(ann.probabilities, [[0.1, 0.2, 0.7], [0.1, 0.6, 0.3]])
    best = np.asarray(CLASSES)[ann.probabilities.argmax(1)]
    assert list(best) == list(ann.predicted_label)


def test_probabilities_that_do_not_name_the_classes_are_an_error():
    res = _response([{"Monocyte": 0.7, "B cell": 0.3}])
    with pytest.raises(ValueError, match="not the model's classes"):
        Annotations.from_response(res, CLASSES, [])


def test_majority_vote_matches_pandas():
    """Each cell gets its cluster's most common label among the cells that are not Unassigned,
    and the share of the cluster carrying it; a cluster of only Unassigned stays so."""
    import pandas as pd

    from cellexplain.api.annotations import UNASSIGNED, majority_vote

    rng = np.random.default_rng(0)
    n = 600
    labels = rng.choice(["B", "T", "NK", UNASSIGNED], size=n, p=[0.5, 0.3, 0.1, 0.1])
    clusters = rng.integers(0, 12, size=n).astype(str)
    labels[clusters == "7"] = UNASSIGNED  # a cluster nobody votes in
    voted, share = majority_vote(labels.astype(object), clusters)
    frame = pd.DataFrame({"label": labels, "cluster": clusters})
    for cluster, group in frame.groupby("cluster"):
        voters = group[group["label"] != UNASSIGNED]["label"]
        rows = (clusters == cluster).nonzero()[0]
        if voters.empty:
            assert set(voted[rows]) == {UNASSIGNED}
            continue
        counts = voters.value_counts()
        assert voted[rows[0]] in set(counts[counts == counts.max()].index)
        assert set(voted[rows]) == {voted[rows[0]]}
        np.testing.assert_allclose(share[rows], counts.max() / len(group), rtol=1e-6)


def test_novel_cells_vote_unassigned_and_doubtful_ones_abstain():
    from cellexplain.api.annotations import UNASSIGNED, majority_vote

    # cluster a: 3 novel, 2 B, 2 low-confidence; cluster b: 3 low-confidence, 2 T
    labels = np.array(
        [UNASSIGNED] * 3 + ["B"] * 2 + [UNASSIGNED] * 2 + [UNASSIGNED] * 3 + ["T"] * 2
    )
    novel = np.array([True] * 3 + [False] * 4 + [False] * 5)
    clusters = np.array(["a"] * 7 + ["b"] * 5)
    voted, share = majority_vote(labels.astype(object), clusters, novel)
    assert list(voted[:7]) == [UNASSIGNED] * 7 and share[0] == pytest.approx(3 / 7)
    assert list(voted[7:]) == ["T"] * 5 and share[7] == pytest.approx(2 / 5)
    # without the novelty flags, Unassigned cells abstain: cluster a goes to B
    voted, _ = majority_vote(labels.astype(object), clusters)
    assert list(voted[:7]) == ["B"] * 7


def test_label_colours_for_an_anndata_in_memory_and_a_file_frame():
    """write_annotations passes categoricals, the file writer a DataFrame's columns: the same
    colours either way, Unassigned grey, a class's colour its place among the model's."""
    import pandas as pd

    from cellexplain.api.annotations import PALETTE, UNASSIGNED, UNASSIGNED_COLOR, label_colors

    classes = ["B", "NK", "T"]
    col = pd.Categorical(["T", UNASSIGNED, "T"], categories=["T", UNASSIGNED])
    for obs in ({"cellexplain_label": col}, pd.DataFrame({"cellexplain_label": col})):
        assert label_colors(obs, classes) == {
            "cellexplain_label_colors": [PALETTE[2], UNASSIGNED_COLOR]
        }
