"""The same ONNX graph served by us, by KServe's Python model server and by MLServer, side by side.

Each server runs the model artifact's ``model.onnx`` with the same onnxruntime settings (CPU
provider, ``ORT_ENABLE_ALL``, ``--threads`` intra-op threads, no spinning, one process) and
answers the Open Inference Protocol; each is driven by the same load, Triton's client library
(``tritonclient``), REST with binary tensors and gRPC: ``--clients`` clients, each with its
own connection, sending ``--cells`` real cells per call for ``--seconds``, asking for
probabilities, attributions and labels. In-process onnxruntime on the same cells is the
baseline. KServe (0.21) and MLServer (1.7.1) run in their own venvs
(:mod:`benchmarks.peers`), with a model class of a few lines written here (KServe's
``kserve.Model``, MLServer's ``MLModel``: their documented way to serve a custom model). Usage:

    python -m benchmarks.peer_serving [--artifact DIR] [--cells 1024] [--clients 4]
        [--seconds 10] [--threads 2] [--peers kserve mlserver] [--json out.json]

Prints one row per server and door: cells/s, p50/p99 latency, the ratio to in-process
onnxruntime and to our own door (``--our-defaults`` adds ours as ``make serve`` runs it, a
worker per CPU). A door a peer fails is reported with the error, and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from benchmarks.peers import peer_python, versions
from benchmarks.serving import in_process, measure, oip_doors
from cellexplain.models.data import load_default_adata
from cellexplain.models.preprocess import normalize_log1p
from cellexplain.models.runtime import OnnxModel
from tests.integration.servers import bentoml_server, import_into_store

ROOT = Path(__file__).resolve().parents[1]
NAME = "cellexplain"  # the model's name on every server

#: the onnxruntime session every server builds (the options OnnxModel uses)
SESSION = """
import numpy as np, onnxruntime as ort, json, os
ART = os.environ["PEER_ARTIFACT"]
opts = ort.SessionOptions()
opts.log_severity_level = 3
opts.intra_op_num_threads = int(os.environ["PEER_THREADS"])
opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
CLASSES = np.array(json.load(open(os.path.join(ART, "model.json")))["classes"], dtype=object)
OUTPUTS = ["probabilities", "attributions"]

def session():
    return ort.InferenceSession(os.path.join(ART, "model.onnx"), sess_options=opts,
                                providers=["CPUExecutionProvider"])

def run(sess, x):
    probs, attrs = sess.run(OUTPUTS, {"x": x})
    return probs, attrs, CLASSES[probs.argmax(1)].astype(np.bytes_)
"""

KSERVE_SERVER = (
    SESSION
    + """
import kserve
from kserve import InferOutput, InferResponse

class Cells(kserve.Model):
    def load(self):
        self.sess = session()
        self.ready = True
        return True

    async def predict(self, payload, headers=None, response_headers=None):
        x = payload.inputs[0].as_numpy()
        probs, attrs, labels = run(self.sess, x)
        outs = []
        for name, arr, dtype in (("probabilities", probs, "FP32"),
                                 ("attributions", attrs, "FP32"), ("labels", labels, "BYTES")):
            o = InferOutput(name=name, shape=list(arr.shape), datatype=dtype)
            o.set_data_from_numpy(arr, binary_data=True)
            outs.append(o)
        return InferResponse(response_id=payload.id or "", model_name=self.name,
                             infer_outputs=outs, use_binary_outputs=True)

if __name__ == "__main__":
    m = Cells("%(name)s")
    m.load()
    ports = {"http_port": int(os.environ["PEER_HTTP"]), "grpc_port": int(os.environ["PEER_GRPC"])}
    kserve.ModelServer(**ports, workers=1, enable_latency_logging=False).start([m])
"""
)

MLSERVER_RUNTIME = (
    SESSION
    + """
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.types import InferenceRequest, InferenceResponse

class Cells(MLModel):
    async def load(self):
        self.sess = session()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        probs, attrs, labels = run(self.sess, x)
        return InferenceResponse(model_name=self.name, outputs=[
            NumpyCodec.encode_output("probabilities", probs),
            NumpyCodec.encode_output("attributions", attrs),
            StringCodec.encode_output("labels", [s.decode() for s in labels]),
        ])
"""
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/v2/models/{NAME}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"not ready after {timeout} s:\n{log.read_text()[-3000:]}")


@contextmanager
def peer_server(
    peer: str, artifact: Path, threads: int, work: Path
) -> Iterator[tuple[str, str, int]]:
    """Start ``peer``'s server on the artifact; yields (REST URL, gRPC target, its pid)."""
    http, grpc_port = free_port(), free_port()
    env = {**os.environ, "PEER_ARTIFACT": str(artifact), "PEER_THREADS": str(threads),
           "PEER_HTTP": str(http), "PEER_GRPC": str(grpc_port),
           "OMP_NUM_THREADS": str(threads)}  # fmt: skip
    python = str(peer_python(peer))
    folder = work / peer
    folder.mkdir()
    if peer == "kserve":
        (folder / "server.py").write_text(KSERVE_SERVER % {"name": NAME})
        cmd = [python, str(folder / "server.py")]
    else:
        (folder / "runtime.py").write_text(MLSERVER_RUNTIME)
        (folder / "settings.json").write_text(json.dumps({
            "http_port": http, "grpc_port": grpc_port, "metrics_port": free_port(),
            "parallel_workers": 0, "debug": False, "logging_level": "WARNING"}))  # fmt: skip
        (folder / "model-settings.json").write_text(
            json.dumps({"name": NAME, "implementation": "runtime.Cells"})
        )
        mlserver = str(Path(python).with_name("mlserver"))
        cmd = [mlserver, "start", str(folder)]
        env["PYTHONPATH"] = str(folder)
    log = folder / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http}"
    try:
        wait_ready(url, proc, log)
        yield url, f"127.0.0.1:{grpc_port}", proc.pid
    except Exception:
        print(f"{peer}'s log, last lines:\n{log.read_text()[-2000:]}", flush=True)
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def cells(model: OnnxModel, n: int) -> np.ndarray:
    """``n`` real PBMCs as the model's input (log1p CP10k of its genes), tiled."""
    raw = load_default_adata().raw
    genes = list(raw.var_names)
    X = normalize_log1p(np.expm1(raw.X.toarray()))
    x = np.asarray(X[:, [genes.index(g) for g in model.genes]], dtype=np.float32)
    return np.ascontiguousarray(np.tile(x, (-(-n // len(x)), 1))[:n])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", type=Path, default=ROOT / "artifacts" / "pbmc-programs")
    ap.add_argument("--cells", type=int, default=1024)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--peers", nargs="*", default=["kserve", "mlserver"])
    ap.add_argument(
        "--our-defaults",
        action="store_true",
        help="also serve ours as `make serve` does (a worker per CPU)",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    n, k, secs = args.cells, args.clients, args.seconds
    model = OnnxModel(
        args.artifact, intra_op_threads=args.threads, providers=["CPUExecutionProvider"]
    )
    x = cells(model, n)
    cpu = platform.processor() or platform.machine()
    print(f"{cpu}, {os.cpu_count()} CPUs; {n} cells per call, {k} clients, {secs:g} s; "
          f"onnxruntime {args.threads} threads", flush=True)  # fmt: skip
    base = measure(n, "in-process onnxruntime", in_process(model, x), k, seconds=secs)
    rows = [base]
    failed: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        home = work / "bentoml"
        home.mkdir()
        import_into_store(args.artifact, home)
        env = {"CELLEXPLAIN_WORKERS": "1", "CELLEXPLAIN_INTRA_OP_THREADS": str(args.threads),
               "CELLEXPLAIN_MODEL_NAME": NAME}  # fmt: skip
        with bentoml_server(home, env) as srv:
            for door, connect in oip_doors(srv.url, srv.grpc, NAME, x).items():
                rows.append(measure(n, f"cellexplain {door}", connect, k, srv.proc.pid, base, secs))
        ours = {r.door.split(" ", 1)[1]: r for r in rows[1:]}
        if args.our_defaults:  # as `make serve` runs on this machine: a worker per CPU
            env = {"CELLEXPLAIN_MODEL_NAME": NAME, "CELLEXPLAIN_WORKERS": "0"}
            with bentoml_server(home, env) as srv:
                for door, connect in oip_doors(srv.url, srv.grpc, NAME, x).items():
                    label = f"cellexplain, its defaults, {door}"
                    rows.append(measure(n, label, connect, k, srv.proc.pid, base, secs))
        for peer in args.peers:
            with peer_server(peer, args.artifact, args.threads, work) as (url, target, pid):
                for door, connect in oip_doors(url, target, NAME, x).items():
                    try:
                        connect()()  # one call first: a door that fails says why
                        row = measure(n, f"{peer} {door}", connect, k, pid, base, secs)
                    except Exception as e:  # a peer failing a door is a result too
                        print(f"      {peer} {door}: FAILED ({type(e).__name__}: {e})")
                        failed.append({"door": f"{peer} {door}", "error": str(e)[:300]})
                        continue
                    print(f"      {peer} {door}: {row.rate / ours[door].rate:.2f}x of ours")
                    rows.append(row)
    if args.json:
        peers = {p: versions(p, [p]) for p in args.peers}
        args.json.write_text(
            json.dumps(
                {"peers": peers, "rows": [vars(r) for r in rows], "failed": failed}, indent=1
            )
        )


if __name__ == "__main__":
    main()
