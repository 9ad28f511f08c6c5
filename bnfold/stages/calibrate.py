"""Stage 2: run the training network over the calibration batches and accumulate BnStats.

One onnxruntime session, one run per mini-batch; per BN only C means, C variances and a shape
come back to Python, where they are accumulated in float64 (see ``stats.update``).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx

from bnfold.data.sources import Batches
from bnfold.errors import BadInputError, UnsupportedModelError
from bnfold.formulas.stats import update
from bnfold.graph.constants import tensor_to_array
from bnfold.graph.index import has_subgraph, subgraph_free_names
from bnfold.onnx import deferred
from bnfold.onnx import io as onnx_io
from bnfold.onnx.io import prepare_for_save
from bnfold.records import BnStats
from bnfold.stages.calibration_net import build_calibration_model
from bnfold.stages.work import Work
from bnfold.verification.reference_session import ReferenceSession, needs_reference

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime

Progress = Callable[[int, "int | None"], None]  # (done, total); total None: not known (a stream)


def _has_float16(model: onnx.ModelProto) -> bool:
    half = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    infos = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    return any(t.data_type in half for t in model.graph.initializer) or \
        any(v.type.tensor_type.elem_type in half for v in infos)


def _session(model: onnx.ModelProto, held: dict[str, onnx.TensorProto], threads: int | None = None
             ) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session of the calibration network; the ``held`` initializers' data
    (see ``build_calibration_model``) is handed over from memory."""
    import onnxruntime as ort

    prepare_for_save(model)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # FATAL only: onnxruntime's colour error line stays off stderr
    if threads:
        opts.intra_op_num_threads = threads
    if _has_float16(model):
        # onnxruntime 1.32 with its graph optimisations (already at ORT_ENABLE_BASIC) returns the last
        # training-mode BN's batch statistics for an earlier one in a float16 network (found by
        # tests/test_fuzz_fold_graphs.py); unoptimised, the same network is right
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    tmpdir = None
    values: list[onnxruntime.OrtValue] = []
    kept = {t.name for t in model.graph.initializer}  # pruning may have dropped some: those are not read
    held = {name: t for name, t in held.items() if name in kept}
    try:
        if model.ByteSize() < onnx_io.PROTO_LIMIT:  # a skeleton: the large weights are not in it
            source: bytes | str = model.SerializeToString()
            # the values must outlive the session's creation: onnxruntime copies them only then
            values = [ort.OrtValue.ortvalue_from_numpy(tensor_to_array(t)) for t in held.values()]
            if held:
                opts.add_external_initializers(list(held), values)
        else:  # too large for one protobuf even so: through a file with external data
            for t in model.graph.initializer:
                if t.name in held:
                    src = held[t.name]
                    t.CopyFrom(deferred.loaded_copy(src) if deferred.is_deferred(src) else src)
            tmpdir = tempfile.mkdtemp(prefix="bnfold-cal-")
            path = os.path.join(tmpdir, "calibration.onnx")
            onnx.save_model(model, path, save_as_external_data=True, location="calibration.data")
            source = path
        sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        del values
        return sess
    except Exception as exc:  # onnxruntime raises its own exception types
        if needs_reference(str(exc), model):  # float64: onnxruntime has no double Conv; exact numpy instead
            for t in model.graph.initializer:
                if t.name in held:
                    src = held[t.name]
                    t.CopyFrom(deferred.loaded_copy(src) if deferred.is_deferred(src) else src)
            return ReferenceSession(model)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(f"onnxruntime cannot run the calibration network: {first}") from exc
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _unlist_unread_inputs(cal: onnx.ModelProto) -> list[str]:
    """Drop the graph inputs (without an initializer) that no node of the pruned calibration
    network reads, and return the ones it reads: only those must come from the data (an input read
    after the last BN, such as ``s`` in ``BN(x) + s``, need not)."""
    graph = cal.graph
    read: set[str] = set()
    for node in graph.node:
        read.update(node.input)
        if has_subgraph(node):
            read.update(subgraph_free_names(node))
    inits = {t.name for t in graph.initializer}
    unread = [i for i, v in enumerate(graph.input) if v.name not in inits and v.name not in read]
    for i in reversed(unread):
        del graph.input[i]
    return [v.name for v in graph.input if v.name not in inits]


def calibrate(work: Work, data: Batches, progress: Progress | None = None,
              only: set[str] | None = None, threads: int | None = None) -> dict[str, BnStats]:
    """Per-BN float64 sums over every calibration batch (main-graph BNs only).

    ``only``: the names of the BNs to calibrate (default: every main-graph BN). Those normalise
    with their batch statistics in the calibration network (Algorithm 2); every other BN stays as
    the model has it, so an inference BN normalises with its stored statistics, as it will in the
    deployed model."""
    model, index, consts, sites = work.model, work.index, work.consts, work.sites
    main = [s for s in sites if s.pos is not None and (only is None or s.info.name in only)]
    if not main:
        return {}
    cal, outs, held = build_calibration_model(model, index, consts, main)
    needed = _unlist_unread_inputs(cal)
    sess = _session(cal, held, threads)
    del cal, held
    names = [n for o in outs for n in (o.mean, o.var, o.shape)]
    stats: dict[str, BnStats] = {}
    total = data.num_batches
    eps_of = {s.info.name: s.info.epsilon for s in main}
    if progress:
        progress(0, total)
    for done, batch in enumerate(data, start=1):
        missing = [n for n in needed if n not in batch]
        if missing:
            raise BadInputError(
                f"calibration data has no array for model input '{missing[0]}', which the BN statistics depend "
                "on; add one (leading axis = samples) named after that input")
        try:
            values = sess.run(names, {n: batch[n] for n in needed})
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BadInputError(
                f"onnxruntime failed on calibration batch {done}: {first}; check the data's shapes"
            ) from exc
        dead: tuple[str, np.ndarray] | None = None  # the first BN that divided 0 by sqrt(0 + 0) on this batch
        for k, o in enumerate(outs):
            mu = np.asarray(values[3 * k], dtype=np.float64).reshape(-1)
            var = np.asarray(values[3 * k + 1], dtype=np.float64).reshape(-1)
            shape = [int(v) for v in values[3 * k + 2]]
            c = mu.shape[0]
            m_b = int(np.prod(shape, dtype=np.int64)) // max(c, 1)
            if not (np.isfinite(mu).all() and np.isfinite(var).all()):
                if dead is not None:
                    shown = ", ".join(map(str, dead[1][:5].tolist())) + (", ..." if dead[1].size > 5 else "")
                    raise BadInputError(
                        f"BN '{dead[0]}' has epsilon=0 and a batch variance of 0 in channel(s) {shown} on calibration "
                        f"batch {done}, so normalising with batch statistics divides by zero (NaN from there on, "
                        f"at BN '{o.bn}'); give the BN a positive epsilon (e.g. 1e-5) when exporting the model")
                raise BadInputError(
                    f"activations at BN '{o.bn}' became non-finite on calibration batch {done}; "
                    "check the data's scale and the model's weights"
                )
            if dead is None and eps_of.get(o.bn, 1.0) <= 0 and not (var > 0).all():
                dead = (o.bn, np.flatnonzero(~(var > 0)))
            st = stats.get(o.bn)
            if st is None:
                st = stats[o.bn] = BnStats(channels=c)
            update(st, mu, var, m_b, n_b=shape[0] if shape else 0)
        if progress:
            progress(done, total)
    return stats
