"""The annotation options are declared once (:class:`~cellexplain.api.schemas.AnnotateOptions`):
the CLI's flags and the upload form are made from it, and the client's arguments, the proto's
fields and every door's defaults are checked against it here."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from cellexplain.api import proto_v1
from cellexplain.api.codegen import load
from cellexplain.api.schemas import DEFAULTS, OPTION_NAMES, AnnotateOptions
from cellexplain.client.cli import NOT_FLAGS, OPTION_FLAGS, build_parser, options_from_args
from cellexplain.client.remote import AsyncClient

pb = load("cellexplain_v1_pb2")
SOME = AnnotateOptions(
    model="pbmc-linear",
    input="counts",
    top_k=3,
    attributions="full",
    target="CD19+ B",
    return_probabilities=True,
    unassigned_threshold=0.75,
    novelty_threshold=0.9,
)


def annotate_args(*flags: str):
    return build_parser().parse_args(["annotate", "x.h5ad", "--out", "y.h5ad", *flags])


def test_the_cli_has_a_flag_per_option_with_the_schemas_defaults():
    assert options_from_args(annotate_args()) == DEFAULTS.model_copy(
        update={n: getattr(DEFAULTS, n) for n in NOT_FLAGS}
    )
    flags = []
    for name in OPTION_NAMES:
        if name in NOT_FLAGS:
            continue
        flag = OPTION_FLAGS.get(name, "--" + name.replace("_", "-"))
        value = getattr(SOME, name)
        flags += [flag, str(value)]
    given = options_from_args(annotate_args(*flags))
    assert given == SOME.model_copy(update={n: getattr(DEFAULTS, n) for n in NOT_FLAGS})


def test_the_cli_refuses_what_the_schema_refuses_naming_the_flag(capsys):
    from cellexplain.client.cli import main

    assert main(["annotate", "x.h5ad", "--out", "y.h5ad", "--threshold", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--threshold" in err and "Traceback" not in err
    with pytest.raises(SystemExit):  # argparse's own check of a choice
        annotate_args("--attributions", "some")


def test_the_clients_arguments_are_the_options_with_their_defaults():
    sig = inspect.signature(AsyncClient.annotate).parameters
    for name in OPTION_NAMES:
        if name in NOT_FLAGS:  # the file pipeline always asks for them
            continue
        assert name in sig, f"AsyncClient.annotate lacks the option {name}"
        assert sig[name].default == getattr(DEFAULTS, name), name


def test_the_proto_has_a_field_per_option_and_maps_each_both_ways():
    assert set(pb.AnnotateOptions.DESCRIPTOR.fields_by_name) == set(OPTION_NAMES)
    assert proto_v1.options(pb.AnnotateOptions()) == DEFAULTS  # zero values: the defaults
    msg = proto_v1.request_to_proto(["A"], np.ones((1, 1), np.float32), SOME).options
    assert proto_v1.options(msg) == SOME


def test_the_upload_form_takes_every_option():
    from cellexplain.service.app import UPLOAD_FIELDS

    assert set(OPTION_NAMES) <= set(UPLOAD_FIELDS)


def test_cli_errors_name_the_flag_not_the_servers_variables(tmp_path, capsys):
    """--local with a missing model, a NaN threshold, a bad concurrency: one line, exit 2."""
    import anndata as ad

    from cellexplain.client.cli import main

    src = tmp_path / "c.h5ad"
    ad.AnnData(np.ones((3, 4), np.float32)).write_h5ad(src)
    base = ["annotate", str(src), "--out", str(tmp_path / "o.h5ad"), "-q"]
    cases = [
        (["--local", "--model-dir", str(tmp_path / "nope")], "--model-dir:"),
        (["--threshold", "nan"], "--threshold: Input should be a finite number"),
        (["--concurrency", "-3"], "--concurrency must be at least 1"),
    ]
    for extra, expected in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err and "CELLEXPLAIN_" not in err, err


@pytest.mark.parametrize("value", ["nan", "inf", "1.5", "-0.1", "half"])
def test_max_missing_fraction_is_a_share(value, capsys):
    with pytest.raises(SystemExit):
        annotate_args("--max-missing-fraction", value)
    assert "--max-missing-fraction" in capsys.readouterr().err
    assert annotate_args("--max-missing-fraction", "1").max_missing_fraction == 1.0


def test_the_service_url_comes_from_the_environment(monkeypatch):
    import asyncio

    from cellexplain.client.remote import AsyncClient

    monkeypatch.setenv("CELLEXPLAIN_URL", "http://annotator.lab:8000/")
    client = AsyncClient()
    assert client.url == "http://annotator.lab:8000"
    assert client.grpc_target == "annotator.lab:50051"  # gRPC on the URL's host
    asyncio.run(client.close())
    assert annotate_args().url is None  # the CLI passes None: the client reads the variable
    monkeypatch.delenv("CELLEXPLAIN_URL")
    client = AsyncClient()
    assert client.url == "http://localhost:3000"
    asyncio.run(client.close())


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["annotate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 10)" in text and "(default: top_k)" in text  # top-k, attributions
    assert "(default: rest)" in text and "(default: 2)" in text  # transport, concurrency
    assert "as many as fill half the server's announced body limit" in text  # chunk size
    assert "(default 0.5: " in text  # max missing fraction: said in its own words
    assert "(default: None)" not in text and "(default: False)" not in text
