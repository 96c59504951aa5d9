"""Optional API-key authentication on a real server: REST /v1, /v2 and gRPC; probes stay open."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cellexplain.api.codegen import load
from cellexplain.api.schemas import AnnotateOptions
from cellexplain.client.remote import AsyncClient, Chunk, ClientError
from tests.integration.servers import bentoml_server

pytestmark = pytest.mark.integration
pb = load("cellexplain_v1_pb2")
pb_grpc = load("cellexplain_v1_pb2_grpc")
KEYS = ("first-secret", "second-secret")


@pytest.fixture(scope="module")
def server(programs_home):
    home = programs_home
    env = {"CELLEXPLAIN_MODELS": "pbmc-programs", "CELLEXPLAIN_API_KEYS": ",".join(KEYS)}
    with bentoml_server(home, env) as srv:
        yield srv


def test_rest_needs_a_key_but_probes_do_not(server):
    url = server.url
    for path in ("/livez", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"):
        assert httpx.get(url + path).status_code == 200, path
    r = httpx.get(f"{url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthenticated"
    assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{url}/v1/models", headers={"X-API-Key": "wrong"}).status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"X-API-Key": KEYS[1]}).status_code == 200
    ok = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEYS[0]}"})
    assert ok.status_code == 200
    r = httpx.get(f"{url}/v2/models/pbmc-programs")
    assert r.status_code == 401 and "missing API key" in r.json()["error"]
    assert (
        httpx.get(f"{url}/v2/models/pbmc-programs", headers={"X-API-Key": KEYS[0]}).status_code
        == 200
    )
    assert (
        'cellexplain_request_errors_total{door="rest",type="unauthenticated"}'
        in httpx.get(f"{url}/metrics").text
    )


def test_grpc_needs_a_key_but_health_does_not(server):
    with grpc.insecure_channel(server.grpc) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.CellExplainStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.ListModels(pb.ListModelsRequest())
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            list(stub.AnnotateStream(iter([pb.AnnotateRequest()])))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        res = stub.ListModels(
            pb.ListModelsRequest(), metadata=[("authorization", f"Bearer {KEYS[1]}")]
        )
        assert [m.name for m in res.models] == ["pbmc-programs"]


def test_client_sends_its_key(server, cells_matrix):
    genes, X = cells_matrix

    async def run(transport: str, key: str | None):
        async with AsyncClient(
            server.url, transport=transport, grpc_target=server.grpc, api_key=key, retries=0
        ) as c:
            chunks = [Chunk(0, genes, X[:20]), Chunk(20, genes, X[20:40])]
            return [r async for _, r in c.annotate_chunks(chunks, AnnotateOptions(), 2)]

    for transport in ("rest", "grpc"):
        results = asyncio.run(run(transport, KEYS[0]))
        assert sum(len(r.cells) for r in results) == 40
        with pytest.raises(ClientError) as e:
            asyncio.run(run(transport, None))
        assert e.value.status in (401, "UNAUTHENTICATED")


@pytest.fixture(scope="module")
def cells_matrix(pbmc):
    return list(pbmc.raw.var_names), np.asarray(pbmc.raw.X.toarray(), dtype=np.float32)


def test_with_keys_on_only_the_probes_answer_without_one(server):
    """BentoML's own pages (the Swagger UI at /, /docs.json) and every API document need a key
    too; a request for an unknown path is refused before routing (401, not 404)."""
    url = server.url
    for path in ("/", "/docs.json", "/v1/openapi.json", "/v1/docs", "/v2", "/nope"):
        r = httpx.get(url + path)
        assert r.status_code == 401, (path, r.status_code, r.text[:200])
        assert "openapi" not in r.text.lower() and "swagger" not in r.text.lower()
    for path in ("/", "/docs.json", "/v1/openapi.json"):
        assert httpx.get(url + path, headers={"X-API-Key": KEYS[0]}).status_code == 200, path


def test_non_utf8_header_bytes_get_a_400(server):
    import socket
    from urllib.parse import urlparse

    u = urlparse(server.url)
    for path in ("/v1/models", "/v2/models/pbmc-programs", "/readyz"):
        with socket.create_connection((u.hostname, u.port)) as s:
            s.sendall(
                f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
                + b"X-API-Key: \xff\xfe"
                + KEYS[0].encode()
                + b"\r\n\r\n"
            )
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        status = int(answer.split(b" ", 2)[1])
        assert status == 400, (path, answer[:300])
        assert b"not UTF-8" in answer


def test_a_credential_header_given_twice_is_refused(server):
    """With two copies one is read, silently (the last, here), and a proxy in front may read
    the other: the two must never disagree, so two copies are a 400, whatever their order."""
    url = server.url + "/v1/models"
    for name, good, bad in (
        ("X-API-Key", KEYS[0], "nope"),
        ("Authorization", f"Bearer {KEYS[0]}", "Bearer nope"),
    ):
        for pair in ([(name, bad), (name, good)], [(name, good), (name, good)]):
            r = httpx.get(url, headers=pair)
            assert r.status_code == 400 and "more than once" in r.text, (pair, r.text[:200])
        assert httpx.get(url, headers=[(name, good)]).status_code == 200


def test_an_unauthenticated_grpc_message_is_never_parsed(server):
    """The key is checked before the message is read: garbage bytes without a key are
    UNAUTHENTICATED, not the INVALID_ARGUMENT that parsing them would give."""
    with grpc.insecure_channel(server.grpc) as ch:
        call = ch.unary_unary(
            "/cellexplain.v1.CellExplain/Annotate",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as e:
            call(b"\xff" * (1 << 20), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:  # with a key, the same bytes are parsed
            call(b"\xff" * (1 << 20), timeout=30, metadata=(("x-api-key", KEYS[0]),))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_credentials_given_twice_are_refused(server):
    with grpc.insecure_channel(server.grpc) as ch:
        stub = pb_grpc.CellExplainStub(ch)
        for metadata in (
            (("x-api-key", KEYS[0]), ("x-api-key", KEYS[1])),
            (("authorization", f"Bearer {KEYS[0]}"), ("authorization", "Bearer other")),
        ):
            with pytest.raises(grpc.RpcError) as e:
                stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "given more than once" in (e.value.details() or "")


def test_unauthenticated_requests_to_random_paths_add_no_metric_series(server):
    with httpx.Client(base_url=server.url) as c:
        for i in range(300):
            assert c.get(f"/probe-{i}-{np.random.randint(1 << 30)}").status_code == 401
        text = c.get("/metrics").text
    endpoints = set()
    for line in text.splitlines():
        if line.startswith("bentoml_service_request_total{"):
            endpoints.add(line.split('endpoint="', 1)[1].split('"', 1)[0])
    assert "other" in endpoints
    assert not any(e.startswith("/probe-") for e in endpoints), endpoints
