"""Load an exported model (ONNX + JSON card, never pickle) and run it with onnxruntime.

No torch here: this is what serving and ``--local`` annotation use.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from cellexplain.models.card import ONNX_FILE, ModelCard, sha256_file
from cellexplain.models.errors import ArtifactError

log = logging.getLogger(__name__)


Provider = str | tuple[str, dict[str, Any]]

#: onnxruntime tensor types of the graph's outputs, as numpy dtypes
_NUMPY = {"tensor(float)": np.float32, "tensor(int64)": np.int64}


def available_providers(
    prefer_gpu: bool = True, tensorrt: bool = False, trt_cache_dir: str | Path | None = None
) -> list[Provider]:
    """onnxruntime providers to use, best first, with their options.

    TensorRT (only when asked for and installed; engines cached in ``trt_cache_dir`` so a
    restart does not rebuild them), then CUDA (when onnxruntime-gpu sees a GPU and
    ``prefer_gpu``), then the CPU, which always comes last as the fallback for any node the
    others cannot run.
    """
    have = ort.get_available_providers()
    chosen: list[Provider] = []
    if prefer_gpu and tensorrt and "TensorrtExecutionProvider" in have:
        cache = str(trt_cache_dir or Path(tempfile.gettempdir()) / "cellexplain-trt")
        Path(cache).mkdir(parents=True, exist_ok=True)
        chosen.append(
            (
                "TensorrtExecutionProvider",
                {
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": cache,
                    "trt_timing_cache_enable": True,
                    "trt_timing_cache_path": cache,
                },
            )
        )
    if prefer_gpu and "CUDAExecutionProvider" in have:
        # grow the memory arena by what is asked, not in doubling steps: IG at large batches
        # would otherwise reserve up to twice what it needs
        # and no TF32: onnxruntime turns it on by default for float32 matrix products on
        # Ampere and later, which moved probabilities by 4e-4 and attributions by 3e-3 (p99,
        # relative) from the CPU's on an H200; float32 graphs must stay faithful to Captum
        # (a float16 export is the explicit, checked way to trade accuracy for speed)
        cuda_options = {"arena_extend_strategy": "kSameAsRequested", "use_tf32": 0}
        chosen.append(("CUDAExecutionProvider", cuda_options))
    return [*chosen, "CPUExecutionProvider"]


def provider_name(p: Provider) -> str:
    return p if isinstance(p, str) else p[0]


@dataclass
class Prediction:
    """Outputs of the graph for ``n`` cells (all numpy, float32 unless noted)."""

    logits: np.ndarray  # [n, C]
    probabilities: np.ndarray  # [n, C]
    attributions: np.ndarray  # [n, G]
    explained_class: np.ndarray  # [n] int64
    program_attributions: np.ndarray | None  # [n, P] for program models
    #: [n] |sum(attributions) - (F(x) - F(x0))| / |F(x) - F(x0)| (graphs exported since it was
    #: added; None for older ones)
    completeness_gap: np.ndarray | None = None
    #: [n] the share of known-type cells nearer to a known type (graphs exported with a
    #: novelty reference; None for older ones): :mod:`cellexplain.models.novelty`
    novelty: np.ndarray | None = None


def session_options() -> ort.SessionOptions:
    """Options for every session of our graphs: onnxruntime's warning that the optional
    ``target`` input is an initializer (true by design: an overridable default) is not shown."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return opts


class OnnxModel:
    """An exported model, loaded and verified.

    Args:
        directory: folder holding ``model.onnx`` and ``model.json``.
        providers: onnxruntime providers, names or ``(name, options)`` (default:
            :func:`available_providers`).
        intra_op_threads: threads per inference call (0: onnxruntime decides).
        spinning: onnxruntime's idle threads busy-wait for the next call (its default: the
            fastest back-to-back calls; a server whose cores also parse requests turns it off).
        io_binding: bind the input and outputs explicitly, outputs into the host arrays
            returned (each batch's rows written in place). Off by default, on every provider:
            on an H200 (onnxruntime 1.31) it was 10-20% slower than ``run()`` at 1k-8k cells
            per call and 2x slower at 65k, because arrays we allocate come fresh from the OS
            (the device's copy pays the page faults) while ``run()``'s outputs come from
            onnxruntime's reused arena; ``predict`` makes no copy of its own either way.
    """

    def __init__(
        self,
        directory: str | Path,
        providers: Sequence[Provider] | None = None,
        intra_op_threads: int = 0,
        io_binding: bool = False,
        spinning: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.card = ModelCard.read(self.directory)
        onnx_path = self.directory / ONNX_FILE
        if not onnx_path.is_file():
            raise ArtifactError(f"no ONNX graph at {onnx_path}")
        digest = sha256_file(onnx_path)
        if digest != self.card.onnx.sha256:
            raise ArtifactError(
                f"{onnx_path} has sha256 {digest}, but its model card says {self.card.onnx.sha256}:"
                " the graph was modified or does not belong to this card"
            )
        opts = session_options()
        opts.intra_op_num_threads = intra_op_threads
        if not spinning:  # idle threads sleep instead of busy-waiting for the next call
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(onnx_path), sess_options=opts, providers=list(providers or available_providers())
        )
        self.providers = self.session.get_providers()
        self.io_binding = io_binding
        self._output_meta = self.session.get_outputs()
        for o in self._output_meta:
            if o.type not in _NUMPY or not all(isinstance(d, int) for d in o.shape[1:]):
                raise ArtifactError(f"output {o.name} is {o.type} {o.shape}: not [n, fixed...]")
        self._outputs = [o.name for o in self._output_meta]
        log.info("loaded model %s on %s", self.card.name, self.providers[0])

    @property
    def genes(self) -> list[str]:
        return self.card.genes

    @property
    def classes(self) -> list[str]:
        return self.card.classes

    def has_output(self, name: str) -> bool:
        """Whether the graph has this output (``completeness_gap`` came later than the rest)."""
        return name in self._outputs

    def predict(
        self,
        x: np.ndarray,
        target: np.ndarray | int | None = None,
        batch_size: int = 4096,
    ) -> Prediction:
        """Run the graph on model input.

        Args:
            x: ``[n, n_genes]`` log1p-CP10k values of the model's genes, in card order.
            target: class index to explain, per cell ``[n]`` or one for all; ``None`` or a
                negative value explains the predicted class.
            batch_size: cells per onnxruntime call (bounds memory on large inputs).
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != len(self.genes):
            raise ValueError(f"x must be [n, {len(self.genes)}], got {list(x.shape)}")
        n = x.shape[0]
        if target is None:
            t = np.full(n, -1, dtype=np.int64)
        else:
            t = np.broadcast_to(np.asarray(target, dtype=np.int64), (n,)).copy()
        if np.any(t >= len(self.classes)):
            raise ValueError(f"target class index out of range (model has {len(self.classes)})")
        batches = [slice(i, i + batch_size) for i in range(0, n, batch_size)] or [slice(0, 0)]
        # `target` is an overridable initializer, which IO binding cannot bind: requests that
        # choose the explained class go through run(); the default (predicted class) binds
        if self.io_binding and not np.any(t >= 0):
            out = self._run_bound(x, batches)
        else:
            parts = [self.session.run(self._outputs, {"x": x[b], "target": t[b]}) for b in batches]
            out = {
                name: parts[0][i] if len(parts) == 1 else np.concatenate([p[i] for p in parts])
                for i, name in enumerate(self._outputs)
            }
        return Prediction(
            logits=out["logits"],
            probabilities=out["probabilities"],
            attributions=out["attributions"],
            explained_class=out["explained_class"],
            program_attributions=out.get("program_attributions"),
            completeness_gap=out.get("completeness_gap"),
            novelty=out.get("novelty"),
        )

    def _run_bound(self, x: np.ndarray, batches: list[slice]) -> dict[str, np.ndarray]:
        """Run with IO binding: each output is allocated once, whole, and every batch's results
        are written by onnxruntime straight into its rows (the one copy from the device; no
        concatenation or copy-out afterwards)."""
        n = x.shape[0]
        out = {o.name: np.empty((n, *o.shape[1:]), _NUMPY[o.type]) for o in self._output_meta}
        for b in batches:
            binding = self.session.io_binding()
            binding.bind_cpu_input("x", x[b])
            for name, arr in out.items():
                rows = arr[b]  # C-contiguous: a row slice of a C-contiguous array
                binding.bind_output(name, "cpu", 0, rows.dtype, list(rows.shape), rows.ctypes.data)
            self.session.run_with_iobinding(binding)
        return out
