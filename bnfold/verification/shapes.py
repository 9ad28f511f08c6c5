"""The shapes generated verification inputs are made at, for inputs with dynamic dimensions.

A model exported with ``[N, 3, ?, ?]`` inputs runs at many sizes; random inputs need one. In order:

1. **given** -- ``input_shapes`` (the CLI's ``--input-shape NAME:1x3x640x640``), used as given;
2. **metadata** -- the model's own hints in ``metadata_props``: ``input_shapes`` / ``input_shape``
   (the same ``NAME:DIMS`` spelling, several separated by spaces, commas or semicolons; a bare
   ``DIMS`` for a single input) and Ultralytics' ``imgsz`` (``[640, 640]`` or ``640``: H and W of
   a rank-4 input);
3. **probe** -- every dynamic non-batch dim set to one size of :data:`PROBE_SIZES` in turn;
4. **inferred** -- where the graph fixes the size (a ``Reshape`` to a constant shape, a ``Gemm`` or
   ``MatMul`` weight after a ``Flatten``, a ``value_info`` annotation): the sizes :data:`SCAN_MIN`
   to :data:`SCAN_LIMIT` (multiples of 32, then of 8, then all), kept only when onnx's strict shape
   inference finds them consistent (and a constant ``Reshape`` target keeps the element count); the
   scan stops after :data:`SCAN_SECONDS`.

Every candidate but a given one must pass onnx's strict shape inference on a weightless copy of the
model (milliseconds: no data is computed), then onnxruntime must run the reference on it; at most
:data:`MAX_RUNS` onnxruntime runs are tried. A batch dim (a symbolic dim 0) is the caller's batch.
When nothing runs, :class:`BadInputError` says what was tried and how to give the shape.
"""
from __future__ import annotations

import ast
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from bnfold.errors import BadInputError, first_line
from bnfold.onnx.runtime import make_session, ort_message
from bnfold.records import InputSpec
from bnfold.verification.shape_spec import format_shape, parse_dims, parse_input_shape

__all__ = ["MAX_RUNS", "PROBE_SIZES", "SCAN_LIMIT", "SCAN_MIN", "SCAN_SECONDS", "ShapeChoice", "check_given",
           "choose_shapes", "reference_runner"]

#: the sizes probed for every dynamic non-batch dim, in order: common image sizes (classifiers
#: 224..., detectors 320..640, all multiples of 32 so stride-32 backbones line up), then smaller ones
PROBE_SIZES = (224, 256, 320, 384, 416, 448, 512, 640, 128, 160, 192, 96, 64, 32)
#: the sizes the shape-inference scan tries: SCAN_MIN..SCAN_LIMIT (a smaller image exercises a 3x3
#: convolution's border taps only, or none: such a size must be given)
SCAN_MIN = 8
SCAN_LIMIT = 1024
#: at most this many candidate shapes are run in onnxruntime
MAX_RUNS = 4
#: the scan stops after this many seconds of shape inference (a graph of thousands of nodes takes
#: a fraction of a second per size): then the error names the last size tried
SCAN_SECONDS = 20.0
#: initializers with more elements than this become inputs of the shape-inference copy
_SMALL = 64

Shapes = dict[str, tuple[int, ...]]
#: runs the reference at the given shapes: None when it ran, else onnxruntime's reason
Runner = Callable[[Shapes], "str | None"]


@dataclass(frozen=True)
class ShapeChoice:
    """The shape each generated input is fed at, and where it came from: ``declared`` (static in
    the model), ``given``, ``metadata``, ``probe`` or ``inferred``."""

    shapes: Shapes
    sources: dict[str, str]

    @property
    def chosen(self) -> bool:
        """True when some shape was not the model's declared one."""
        return any(s != "declared" for s in self.sources.values())

    def record(self) -> dict[str, Any]:
        """``verification.inputs.shapes`` of the report: ``{name: {"shape": [...], "source": ...}}``."""
        return {name: {"shape": list(shape), "source": self.sources[name]} for name, shape in self.shapes.items()}


def check_given(specs: list[InputSpec], given: Mapping[str, tuple[int, ...]]) -> None:
    """Given shapes must name inputs the model has, with its rank and its static dims."""
    names = {s.name: s for s in specs}
    for name, shape in given.items():
        spec = names.get(name)
        if spec is None:
            raise BadInputError(f"input shape given for '{name}', which is not a model input; its inputs are "
                                f"{', '.join(repr(n) for n in names) or 'none'}")
        if spec.shape is None:
            continue
        if len(shape) != len(spec.shape):
            raise BadInputError(f"input '{name}' has rank {len(spec.shape)} ({_template(spec, 1)}), the shape given "
                                f"for it {format_shape(shape)} has rank {len(shape)}")
        fixed = [(i, d, g) for i, (d, g) in enumerate(zip(spec.shape, shape)) if d is not None and d != g]
        if fixed:
            i, d, g = fixed[0]
            raise BadInputError(f"input '{name}' has a static dim {i} of {d}; the shape given for it "
                                f"{format_shape(shape)} says {g}")


def _declared(spec: InputSpec, batch: int) -> tuple[int, ...] | None:
    if spec.shape is None or any(d is None for d in spec.shape[1:]):
        return None
    if not spec.shape:
        return ()  # a declared scalar is fed as one (as the feeds do): it has no batch axis
    return (spec.shape[0] if spec.shape[0] is not None else batch,) + tuple(d for d in spec.shape[1:] if d is not None)


def _template(spec: InputSpec, batch: int) -> str:
    """``1x3xHxW``: the shape with its dynamic dims as letters, for messages."""
    shape = spec.shape or ()
    dynamic = [i for i, d in enumerate(shape) if d is None and i > 0]
    letters = dict(zip(dynamic, "HW" if len(shape) == 4 and dynamic == [2, 3] else
                       (f"D{k}" for k in range(1, len(dynamic) + 1))))
    return "x".join(letters.get(i, str(batch if i == 0 and d is None else d)) for i, d in enumerate(shape))


def _at_size(spec: InputSpec, batch: int, size: int) -> tuple[int, ...]:
    assert spec.shape is not None
    return tuple((batch if i == 0 else size) if d is None else d for i, d in enumerate(spec.shape))


def _fits(spec: InputSpec, shape: tuple[int, ...], batch: int) -> bool:
    if spec.shape is None or len(shape) != len(spec.shape):
        return False
    return all(d is None or d == g for d, g in zip(spec.shape, shape)) and (
        spec.shape[0] is not None or shape[0] == batch)


def _metadata_hints(model: onnx.ModelProto, open_: list[InputSpec], batch: int) -> Iterator[Shapes]:
    """Candidates from ``metadata_props`` (see the module docstring); entries that do not fit are skipped."""
    props = {p.key: p.value for p in model.metadata_props}
    for key in ("input_shapes", "input_shape"):
        text = props.get(key, "").strip()
        if not text:
            continue
        hinted: Shapes = {}
        for part in re.split(r"[\s;]+|,(?![^\[]*\])(?=[^,\]]*:)", text):
            if not part:
                continue
            try:
                if ":" in part:
                    name, shape = parse_input_shape(part)
                elif len(open_) == 1:
                    name, shape = open_[0].name, parse_dims(part, key)
                else:
                    continue
            except BadInputError:
                continue
            spec = next((s for s in open_ if s.name == name), None)
            if spec is not None and _fits(spec, shape, batch):
                hinted[name] = shape
        if hinted:
            yield hinted
    imgsz = props.get("imgsz")
    if imgsz:
        try:
            value = ast.literal_eval(imgsz)
            hw = (int(value), int(value)) if isinstance(value, (int, float)) else tuple(int(v) for v in value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return
        if len(hw) != 2 or min(hw) < 1:
            return
        hinted = {}
        for spec in open_:
            if spec.shape is not None and len(spec.shape) == 4:
                shape = (batch if spec.shape[0] is None else spec.shape[0], spec.shape[1] or 3, *hw)
                if _fits(spec, shape, batch):
                    hinted[spec.name] = shape
        if hinted:
            yield hinted


class _InferenceCheck:
    """onnx's strict shape inference on a copy of the model without its large initializers (they
    become inputs of the same type and shape): is an assignment of input shapes consistent with
    the shapes the graph fixes? ``active`` is False when the model does not pass strict inference
    with its dynamic inputs at all (an op onnx cannot infer): then every candidate is let through."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        skeleton = onnx.ModelProto()
        # built field by field: the weights are never copied
        skeleton.ir_version = model.ir_version
        skeleton.opset_import.extend(model.opset_import)
        skeleton.functions.extend(model.functions)
        g = skeleton.graph
        g.name = graph.name
        g.node.extend(graph.node)
        g.input.extend(graph.input)
        g.output.extend(graph.output)
        g.value_info.extend(graph.value_info)
        declared = {v.name for v in graph.input}
        for t in graph.initializer:
            if int(np.prod(t.dims, dtype=np.int64)) <= _SMALL and t.data_location != onnx.TensorProto.EXTERNAL:
                g.initializer.append(t)
            elif t.name not in declared:
                g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        self._model = skeleton
        self.error = self._infer({})
        self.active = self.error is None

    def _infer(self, shapes: Shapes) -> str | None:
        for value in self._model.graph.input:
            if value.name in shapes:
                dims = value.type.tensor_type.shape.dim
                del dims[:]
                for d in shapes[value.name]:
                    dims.add().dim_value = d
        try:
            inferred = onnx.shape_inference.infer_shapes(self._model, check_type=True, strict_mode=True,
                                                         data_prop=True)
        except Exception as exc:  # onnx raises InferenceError / ValidationError
            return first_line(exc)
        return _reshape_mismatch(inferred) if shapes else None

    def consistent(self, shapes: Shapes) -> bool:
        return not self.active or self._infer(shapes) is None


def _reshape_mismatch(model: onnx.ModelProto) -> str | None:
    """A ``Reshape`` to a constant shape without ``-1`` whose input, as inferred, has another number
    of elements (onnx's inference checks the count only when it has a ``-1`` to solve for)."""
    graph = model.graph
    known: dict[str, list[int]] = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            known[value.name] = [d.dim_value for d in dims]
    consts = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in consts:
            continue
        data = known.get(node.input[0])
        target = [int(v) for v in onnx.numpy_helper.to_array(consts[node.input[1]]).reshape(-1)]
        allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
        if data is None or -1 in target:
            continue
        target = [data[i] if v == 0 and not allowzero and i < len(data) else v for i, v in enumerate(target)]
        if int(np.prod(data, dtype=np.int64)) != int(np.prod(target, dtype=np.int64)):
            return f"Reshape {node.name or node.output[0]}: {data} has no shape {target}"
    return None


def _candidates(model: onnx.ModelProto, open_: list[InputSpec], batch: int, scan: bool
                ) -> Iterator[tuple[Shapes, str]]:
    for hinted in _metadata_hints(model, open_, batch):
        full = {s.name: hinted.get(s.name) or _at_size(s, batch, PROBE_SIZES[0]) for s in open_}
        yield full, "metadata"
    for size in PROBE_SIZES:
        yield {s.name: _at_size(s, batch, size) for s in open_}, "probe"
    if scan:
        order = [*range(32, SCAN_LIMIT + 1, 32), *range(SCAN_MIN, SCAN_LIMIT + 1, 8), *range(SCAN_MIN, SCAN_LIMIT + 1)]
        for size in dict.fromkeys(order):
            yield {s.name: _at_size(s, batch, size) for s in open_}, "inferred"


def choose_shapes(model: onnx.ModelProto, specs: list[InputSpec], *, given: Mapping[str, tuple[int, ...]],
                  batch: int, run: Runner | None) -> ShapeChoice:
    """The shape each of ``specs`` (the inputs verification generates) is fed at.

    ``given`` (checked with :func:`check_given`) wins; static inputs keep their declared shape; the
    others get the first candidate (see the module docstring) that passes shape inference and that
    ``run`` runs. With ``run=None`` the first consistent candidate is taken.
    """
    shapes: Shapes = {}
    sources: dict[str, str] = {}
    open_: list[InputSpec] = []
    for spec in specs:
        declared = _declared(spec, batch)
        if spec.name in given:
            shapes[spec.name], sources[spec.name] = tuple(given[spec.name]), "given"
        elif declared is not None:
            shapes[spec.name], sources[spec.name] = declared, "declared"
        elif spec.shape is None:
            raise BadInputError(f"input '{spec.name}' has an unknown rank, so no shape can be probed for it; pass "
                                f"input_shapes={{'{spec.name}': '1x3xHxW'}} (its full shape) or the data argument")
        else:
            open_.append(spec)
    if not open_:
        return ShapeChoice(shapes, sources)

    check = _InferenceCheck(model)
    tried: list[str] = []
    last_error = ""
    seen: set[tuple[tuple[str, tuple[int, ...]], ...]] = set()
    deadline = None
    stopped = ""
    for candidate, source in _candidates(model, open_, batch, scan=check.active):
        key = tuple(sorted(candidate.items()))
        if key in seen:
            continue
        seen.add(key)
        if source == "inferred":
            deadline = deadline or time.monotonic() + SCAN_SECONDS
            if time.monotonic() > deadline:
                at = format_shape(next(iter(candidate.values())))
                stopped = f" (the scan stopped after {SCAN_SECONDS:g} s, at {at})"
                break
        full = {**shapes, **candidate}
        if not check.consistent(full):
            continue
        error = run(full) if run is not None else None
        if error is None:
            return ShapeChoice(full, {**sources, **{name: source for name in candidate}})
        tried.append(", ".join(f"{n}: {format_shape(s)}" for n, s in candidate.items()) + f" ({source})")
        last_error = error
        if len(tried) >= MAX_RUNS:
            break
    example = open_[0]
    fix = f"pass input_shapes={{'{example.name}': '{_template(example, batch)}'}}, the shape it runs at"
    if tried:
        raise BadInputError(f"no input shape found at which onnxruntime runs the model: tried {'; '.join(tried)}; "
                            f"last error: {last_error}; {fix}")
    raise BadInputError(f"no input shape found for {', '.join(repr(s.name) for s in open_)}: none of the probe "
                        f"sizes nor any size from {SCAN_MIN} to {SCAN_LIMIT} fits the shapes the graph fixes"
                        f"{stopped}; {fix}")


def reference_runner(path: str, make_feed: Callable[[Shapes], dict[str, np.ndarray] | str]) -> Runner:
    """A :data:`Runner` that runs the model at ``path`` (a CPU session, made on first use) on
    ``make_feed(shapes)``."""
    session: list[Any] = []

    def run(shapes: Shapes) -> str | None:
        feed = make_feed(shapes)
        if isinstance(feed, str):
            return feed
        if not session:
            session.append(make_session(path, "cpu"))
        sess = session[0]
        try:
            sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})
        except Exception as exc:  # onnxruntime's own exception types
            return ort_message(exc)
        return None

    return run
