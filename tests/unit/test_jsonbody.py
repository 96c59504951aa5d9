"""The JSON body reader (:mod:`cellexplain.service.jsonbody`) in-process: dense rows and
``{gene: value}`` maps into arrays, options into the schema, and the pre-checks that refuse a
body before its matrix is allocated, each naming its field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cellexplain.api.errors import InvalidInputError, TooLargeError, from_exception
from cellexplain.service import jsonbody


def parse(doc: object | bytes, max_cells: int = 100, max_genes: int = 100):
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return jsonbody.parse_annotate(body, max_cells, max_genes)


def test_dense_rows_become_one_float_matrix_with_the_options():
    r = parse(
        {"genes": ["A", "B"], "cells": [[1, 2.5], [0, 3]], "top_k": 3, "cell_ids": ["x", "y"]}
    )
    assert r.genes == ["A", "B"] and r.cell_ids == ["x", "y"] and r.genes_field == "genes"
    np.testing.assert_array_equal(r.X, [[1, 2.5], [0, 3]])
    assert r.options.top_k == 3 and r.options.attributions == "top_k"


def test_sparse_maps_become_csr_over_every_gene_named():
    r = parse({"cells": [{"A": 1, "C": 2}, {"B": 4}]})
    dense = r.X.toarray()
    assert dense.shape == (2, len(r.genes))
    by_gene = {g: dense[:, i].tolist() for i, g in enumerate(r.genes)}
    assert by_gene == {"A": [1, 0], "B": [0, 4], "C": [2, 0]}


def test_nan_and_infinity_are_read_as_values_for_the_core_to_name():
    r = parse(b'{"genes": ["A", "B"], "cells": [[NaN, Infinity]]}')
    assert np.isnan(r.X[0, 0]) and np.isposinf(r.X[0, 1])


@pytest.mark.parametrize(
    ("doc", "field", "message"),
    [
        ({"genes": ["A"]}, "cells", "field required"),
        ({"genes": ["A"], "cells": 3}, "cells", "list of rows"),
        ({"cells": [[1, 2]]}, "genes", "genes is required"),
        ({"genes": ["A", "B"], "cells": [[1, 2], [1]]}, "cells[1]", ""),
        ({"genes": ["A"], "cells": [[1]], "top_k": -1}, "top_k", ""),
        ({"genes": ["A"], "cells": [[1]], "topk": 3}, "topk", ""),
    ],
)
def test_malformed_bodies_name_their_field(doc, field, message):
    """Each a 400 naming its field (an option's, through the schema's validation)."""
    with pytest.raises(Exception) as e:
        parse(doc)
    err = from_exception(e.value)
    assert err.http_status == 400 and err.field == field, (err.field, err.message)
    assert message in err.message


def test_limits_are_checked_before_the_matrix_is_made():
    with pytest.raises(TooLargeError, match="the limit is 3") as e:
        parse({"genes": ["A"], "cells": [[1]] * 4}, max_cells=3)
    assert e.value.field == "cells"
    with pytest.raises(TooLargeError):  # counted from the body's brackets, before parsing
        jsonbody.check_containers(json.dumps({"cells": [[1]] * 500}).encode(), max_cells=10)
    with pytest.raises(TooLargeError, match="genes"):
        parse({"genes": [f"G{i}" for i in range(101)], "cells": [[0] * 101]})


def test_an_empty_cells_list_is_left_to_the_core():
    """The core refuses it with the message every door gives (one rule)."""
    r = parse({"genes": ["A"], "cells": []})
    assert r.X.shape == (0, 1)


def test_a_body_that_is_not_json_is_a_400():
    with pytest.raises(InvalidInputError, match="not valid JSON") as e:
        parse(b"{nope")
    assert e.value.field == "body"
