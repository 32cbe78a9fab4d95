"""A bundle's ONNX graphs as onnxruntime sessions, run as the runtime runs them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import BundleError


def open_session(path: Path, threads: int, data: bytes | None = None):
    """An onnxruntime CPU session as the runtime runs its graphs, of the file at path or of its
    bytes already read (data); BundleError if it cannot load."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Fatal only: a graph that fails while running is reported once, by Graph.run, on one line.
    options.log_severity_level = 4
    # Without the arena each run's buffers go back to the allocator: with it, one large batch
    # would stay resident for the life of the process (a 4,096-image decode: +150 MB), and
    # a batch-1 run is no slower (benchmarks/footprint.py).
    options.enable_cpu_mem_arena = False
    try:
        return ort.InferenceSession(str(path) if data is None else data, options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise BundleError(f"{path.name}: onnxruntime cannot load it ({exc})") from None


@dataclass(frozen=True)
class Graph:
    """One bundle graph, run as bundle.graph_sections describes it: one input, named outputs."""

    session: Any
    file: str
    input: str
    outputs: list[str]

    @classmethod
    def load(cls, root: Path, spec: dict, threads: int, data: bytes | None = None) -> Graph:
        """A session for the section `spec` (of the file's bytes `data` where given), whose
        inputs and outputs (names and non-batch dims) must be the ones the section states."""
        session = open_session(root / spec["file"], threads, data)
        for kind, actual, expected in (("input", session.get_inputs(), spec["inputs"]),
                                       ("output", session.get_outputs(), spec["outputs"])):
            got = [(a.name, list(a.shape[1:])) for a in actual]
            want = [(name, list(shape[1:])) for name, shape in expected.items()]
            if got != want:
                raise BundleError(f"{spec['file']}: {kind}s are {got}, expected {want}")
        (name,) = spec["inputs"]
        return cls(session, spec["file"], name, list(spec["outputs"]))

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs for one input batch; its failures and non-finite outputs
        become BundleError. The input was validated before, so a failure here is the
        graph's (a Reshape that cannot apply, an allocation that cannot be met)."""
        try:
            results = self.session.run(self.outputs, {self.input: batch})
        except Exception as exc:  # onnxruntime raises its own Fail/RuntimeException types
            detail = " ".join(str(exc).split())
            raise BundleError(f"{self.file}: onnxruntime failed running the graph "
                              f"({detail})") from None
        for output, result in zip(self.outputs, results):
            if not np.isfinite(result).all():
                raise BundleError(f"{self.file}: output {output!r} holds NaN or infinite values")
        return results
