"""Load a PyTorch model for ``bnfold fold``: from a file, or from a factory plus a state_dict.

Four sources, told apart by the file's content (never by its suffix alone):

* an **ExportedProgram** (``torch.export.save``, usually ``.pt2``): a zip archive with
  ``archive_format`` / ``models/*.json``. Loaded with ``torch.export.load`` from the bytes that
  :mod:`bnfold.torch.archive` checked: every pickle inside must read with ``weights_only=True``
  (else refused, or loaded as torch does with ``unsafe_pickle=True``); its ``.module()`` is
  rewritten by :func:`exported_program_module` so that the front end sees BatchNorm modules again.
* a **TorchScript** archive (``torch.jit.save``): a zip archive with ``code/``. Loaded with
  ``torch.jit.load`` (its C++ unpickler resolves no Python global), unless its code calls a file
  op (:func:`bnfold.torch.archive.check_torchscript_code`; that code runs at load and in
  forward). TorchScript modules cannot be fx-traced; the CLI folds them through an ONNX export.
* a **whole pickled module** (``torch.save(model)``): a zip archive with ``data.pkl`` (or the
  legacy pickle format) that ``torch.load(weights_only=True)`` refuses. Unpickling it runs code
  from the file, so it is loaded only with ``unsafe_pickle=True``.
* ``factory`` + ``weights``: ``package.module:callable`` imported with importlib (the working
  directory on ``sys.path``) and called without arguments; the weights file is a state_dict read
  with ``torch.load(..., weights_only=True)`` and loaded with ``strict=True``.

Every problem is a :class:`bnfold.errors.BadInputError` (or :class:`UnsupportedModelError`) with
a one-line message.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import io
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from warnings import catch_warnings, simplefilter, warn_explicit

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from bnfold.errors import BadInputError, UnsupportedModelError, one_line
from bnfold.factory_import import call_factory, cwd_on_path, load_callable
from bnfold.torch.archive import (
    check_exported_program,
    check_graph_callables,
    check_inflation,
    check_torchscript_code,
    guarded_export_load,
    unsafe_hint,
)
from bnfold.torch.process_state import PROCESS_STATE_LOCK

__all__ = [
    "EXPORTED_PROGRAM", "FACTORY", "PICKLE", "TORCHSCRIPT", "LoadedTorchModel", "detect_kind",
    "exported_program_module", "forward_inputs", "load_factory", "load_model_file", "sha256_of",
]

EXPORTED_PROGRAM = "exported_program"
TORCHSCRIPT = "torchscript"
PICKLE = "pickle"
FACTORY = "factory"

#: what each kind is called in messages
KIND_LABELS = {
    EXPORTED_PROGRAM: "ExportedProgram",
    TORCHSCRIPT: "TorchScript archive",
    PICKLE: "pickled module",
    FACTORY: "factory model",
}


@dataclass
class ForwardInput:
    """One input of the model's forward: its name, whether it must be given, and its default."""

    name: str
    required: bool = True
    default: Any = None
    keyword_only: bool = False  # after ``*`` in forward's signature: never passed positionally


@dataclass
class LoadedTorchModel:
    """A model ready for the front end."""

    module: nn.Module  # an nn.Module, or a torch.jit.ScriptModule for TorchScript
    kind: str  # one of EXPORTED_PROGRAM, TORCHSCRIPT, PICKLE, FACTORY
    label: str  # how the report names the input (a path, or 'factory pkg.mod:fn')
    path: Path | None  # the file read (model file, or the weights of a factory)
    sha256: str | None
    inputs: list[ForwardInput]  # forward's inputs, in order
    var_keyword: bool = False  # forward takes **kwargs: other data keys are passed by name
    example_inputs: dict[str, torch.Tensor] | None = None  # ExportedProgram: its stored example
    static_batch: int | None = None  # ExportedProgram exported with a static batch dimension
    warnings: list[str] = field(default_factory=list)
    factory: str | None = None  # FACTORY: the 'pkg.mod:callable' spec that built it

    @property
    def scripted(self) -> bool:
        return isinstance(self.module, torch.jit.ScriptModule)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- detection


def detect_kind(path: Path) -> str:
    """EXPORTED_PROGRAM, TORCHSCRIPT or PICKLE from the file's content; BadInputError otherwise."""
    if not path.exists():
        raise BadInputError(f"model file not found: {path}")
    if not path.is_file():
        raise BadInputError(f"model path is not a file: {path}")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise BadInputError(f"cannot read model file '{path}': {exc.strerror or exc}") from exc
    not_torch = (f"'{path}' is not a PyTorch model file (expected an ExportedProgram from torch.export.save, "
                 "a TorchScript archive from torch.jit.save, or a module saved with torch.save)")
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise BadInputError(f"{not_torch}: {one_line(exc, 240)}") from exc
        rel = {n.split("/", 1)[1] if "/" in n else n for n in names}
        if ("archive_format" in rel or "serialized_exported_program.json" in rel
                or any(r.startswith("models/") and r.endswith(".json") for r in rel)):
            return EXPORTED_PROGRAM
        if any(r.startswith("code/") for r in rel) or "constants.pkl" in rel:
            return TORCHSCRIPT
        if "data.pkl" in rel:
            return PICKLE
        raise BadInputError(not_torch)
    if head[:1] == b"\x80":  # a pickle stream: torch.save's legacy (non-zip) format
        return PICKLE
    raise BadInputError(not_torch)


# ----------------------------------------------------------------------------- forward inputs


def forward_inputs(module: nn.Module) -> tuple[list[ForwardInput], bool]:
    """The named inputs of ``module.forward`` in order, and whether it takes ``**kwargs``.

    TorchScript: from the method's schema. ``*args`` is skipped (such inputs cannot be named).
    """
    if isinstance(module, torch.jit.ScriptModule):
        try:
            forward: Any = module.forward  # a torch.jit ScriptMethod; torch types it as a plain Callable
            args = forward.schema.arguments[1:]
        except Exception as exc:  # noqa: BLE001 - a ScriptModule without a usable forward
            raise UnsupportedModelError(f"cannot read the TorchScript forward signature: {one_line(exc, 240)}") from exc
        out = []
        for a in args:
            has_default = a.has_default_value()
            out.append(ForwardInput(a.name, required=not has_default,
                                    default=a.default_value if has_default else None))
        return out, False
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError) as exc:
        raise UnsupportedModelError(f"cannot read the signature of {type(module).__name__}.forward: "
                                    f"{one_line(exc, 240)}") from exc
    out = []
    var_kw = False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind is p.VAR_POSITIONAL:
            continue
        else:
            required = p.default is inspect.Parameter.empty
            out.append(ForwardInput(p.name, required=required, default=None if required else p.default,
                                    keyword_only=p.kind is p.KEYWORD_ONLY))
    return out, var_kw


# ----------------------------------------------------------------------------- ExportedProgram

_A = torch.ops.aten
_FUNCTIONAL: dict[Any, Callable[..., Any]] = {
    _A.conv1d.default: F.conv1d, _A.conv2d.default: F.conv2d, _A.conv3d.default: F.conv3d,
    _A.conv_transpose1d.default: F.conv_transpose1d, _A.conv_transpose2d.input: F.conv_transpose2d,
    _A.conv_transpose3d.input: F.conv_transpose3d, _A.linear.default: F.linear,
}
for _name in ("conv1d", "conv2d", "conv3d"):  # padding='same'/'valid' overloads
    _ov = getattr(getattr(_A, _name), "padding", None)
    if _ov is not None:
        _FUNCTIONAL[_ov] = getattr(F, _name)

def _functional_convolution(gm: fx.GraphModule, node: fx.Node) -> None:
    """``aten.convolution`` (core ATen IR) as ``F.conv*d`` / ``F.conv_transpose*d``, where its rank is known."""
    args = list(node.args) + [None] * (9 - len(node.args))
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = args[:9]
    weight, _ = _attr_value(gm, w)
    shape = getattr(weight, "shape", None) if weight is not False else None
    if shape is None and isinstance(w, fx.Node) and w.meta.get("val") is not None:
        shape = w.meta["val"].shape
    dims = len(shape) - 2 if shape is not None else None
    if dims not in (1, 2, 3) or not isinstance(transposed, bool) or node.kwargs:
        return
    if transposed:
        node.target = getattr(F, f"conv_transpose{dims}d")
        node.args = (x, w, b, stride, padding, output_padding, groups, dilation)
    else:
        node.target = getattr(F, f"conv{dims}d")
        node.args = (x, w, b, stride, padding, dilation, groups)


def _transposed_weight(node: Any) -> fx.Node | None:
    """The matrix ``w`` where ``node`` is ``aten.permute(w, [1, 0])`` or ``aten.t(w)`` of a module tensor."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.kwargs:
        return None
    if node.target is _A.permute.default and len(node.args) == 2:
        perm = node.args[1]
        if not isinstance(perm, (list, tuple)) or list(perm) != [1, 0]:
            return None
        w = node.args[0]
    elif node.target is _A.t.default and len(node.args) == 1:
        w = node.args[0]
    else:
        return None
    return w if isinstance(w, fx.Node) and w.op == "get_attr" else None


def _functional_linear(g: fx.Graph, node: fx.Node) -> None:
    """``aten.addmm(b, x, w.T)`` and ``aten.mm(x, w.T)`` (what ``run_decompositions`` makes of a
    Linear, ``w`` a module tensor, ``alpha = beta = 1``) as ``F.linear(x, w, b)``."""
    if node.kwargs and any(node.kwargs.get(k, 1) != 1 for k in ("alpha", "beta")):
        return
    if node.target is _A.addmm.default and len(node.args) == 3:
        bias, x, wt = node.args
    elif node.target is _A.mm.default and len(node.args) == 2:
        (x, wt), bias = node.args, None
    else:
        return
    w = _transposed_weight(wt)
    bias_ok = bias is None or (isinstance(bias, fx.Node) and bias.op == "get_attr")
    if w is None or not isinstance(wt, fx.Node) or not bias_ok:
        return
    node.target, node.args, node.kwargs = F.linear, (x, w, bias), {}
    if not wt.users:
        g.erase_node(wt)


# batch-norm ops: (input, weight, bias, running_mean, running_var) first; how to read the rest
_BN_SINGLE = {_A.batch_norm.default}  # (..., training, momentum, eps, cudnn_enabled) -> Tensor
_BN_TUPLE_NO_TRAINING = {_A._native_batch_norm_legit_no_training.default}  # (..., momentum, eps) -> tuple
_BN_TUPLE = {_A.native_batch_norm.default}  # (..., training, momentum, eps) -> tuple
_BN_ATTRS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


class _AnyRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm whose input rank is not known (no shape metadata in the ExportedProgram)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 - torch's name
        if input.dim() < 2:
            raise ValueError(f"expected an input of rank >= 2 (got rank {input.dim()})")


def _attr_value(gm: fx.GraphModule, node: Any) -> tuple[Any, str | None]:
    if node is None:
        return None, None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return False, None
    target = node.target
    assert isinstance(target, str)  # fx: a get_attr node's target is the attribute's qualified name
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj, target


def _bn_class(node: fx.Node) -> type:
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    rank = len(val.shape) if val is not None and hasattr(val, "shape") else None
    by_rank: dict[int | None, type] = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
    return by_rank.get(rank, _AnyRankBatchNorm)


def _install(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, attr, module)


def _bn_module_for(gm: fx.GraphModule, node: fx.Node, training: bool, momentum: Any, eps: float,
                   used_paths: set[str], counter: list[int]) -> tuple[str, nn.Module]:
    """A BatchNorm module holding the op's tensors, and the qualified name to install it at."""
    values = {}
    targets = {}
    for key, arg in zip(("weight", "bias", "running_mean", "running_var"), node.args[1:5]):
        value, target = _attr_value(gm, arg)
        if value is False:
            raise UnsupportedModelError(
                f"the ExportedProgram's batch-norm op '{node.name}' gets its {key} from a computation, not a "
                "parameter or buffer; bnfold cannot rebuild it as a BatchNorm module (fold an ONNX export instead)")
        values[key], targets[key] = value, target
    present = [t for t in targets.values() if t is not None]
    owners = {t.rpartition(".")[0] for t in present}
    if values["weight"] is not None:
        channels = int(values["weight"].shape[0])
    elif values["running_mean"] is not None:
        channels = int(values["running_mean"].shape[0])
    else:
        val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        if val is None or len(val.shape) < 2 or not isinstance(val.shape[1], int):
            raise UnsupportedModelError(f"cannot tell the channel count of the ExportedProgram's batch-norm op "
                                        f"'{node.name}' (no weight, no running statistics, no shape metadata)")
        channels = int(val.shape[1])
    track = values["running_mean"] is not None and values["running_var"] is not None
    bn = _bn_class(node)(channels, eps=float(eps), momentum=momentum, affine=values["weight"] is not None,
                         track_running_stats=track)
    for key in ("weight", "bias"):
        v = values[key]
        if v is not None:
            setattr(bn, key, v if isinstance(v, nn.Parameter) else nn.Parameter(v, requires_grad=False))
        elif key in bn._parameters:
            bn.register_parameter(key, None)
    if track:
        bn.running_mean = values["running_mean"]
        bn.running_var = values["running_var"]
    bn.train(bool(training))

    # keep the original qualified name where the tensors live in one container holding nothing else
    if len(owners) == 1 and all(t.rpartition(".")[2] == k for k, t in targets.items() if t is not None):
        owner = owners.pop()
        if owner and owner not in used_paths:
            holder = gm.get_submodule(owner)
            names = set(holder._parameters) | set(holder._buffers) | set(holder.__dict__.get("_modules", {}))
            if not list(holder.children()) and names <= _BN_ATTRS:
                nbt = holder._buffers.get("num_batches_tracked")
                if nbt is not None and track:
                    bn.num_batches_tracked = nbt
                return owner, bn
    while True:
        counter[0] += 1
        name = f"bnfold_batch_norm_{counter[0]}"
        if not hasattr(gm, name):
            return name, bn


def exported_program_module(ep: Any) -> tuple[fx.GraphModule, list[str], int | None, list[str]]:
    """``ep.module()`` rewritten for the front end.

    Every ``aten.batch_norm`` (and ``_native_batch_norm_legit_no_training`` / ``native_batch_norm``)
    becomes a call of a BatchNorm module holding the same tensors, under the module name the
    tensors had (``layer1.0.bn1``), in training mode where the op normalised with batch statistics;
    ``aten.conv*d`` / ``conv_transpose*d`` / ``linear`` (and ``addmm``/``mm`` of a transposed
    module weight) become their ``torch.nn.functional`` forms so the fold recognises them; the
    input guards and the in-place ``num_batches_tracked`` updates
    are dropped; forward takes the flat user inputs by name and returns the original structure.

    Returns ``(module, input names, static batch size or None, warnings)``.
    """
    from torch.utils import _pytree as pytree

    gm = ep.module()
    g = gm.graph
    warnings: list[str] = []
    codegen = getattr(g, "_codegen", None)
    output = next(n for n in g.nodes if n.op == "output")
    if codegen is not None and type(codegen).__name__ == "_PyTreeCodeGen":
        out_spec = codegen.pytree_info.out_spec
        g.set_codegen(fx.graph.CodeGen())
        flat = output.args[0]
        if out_spec is not None:
            output.args = (pytree.tree_unflatten(list(flat) if isinstance(flat, (list, tuple)) else [flat], out_spec),)

    for node in list(g.nodes):  # input guards: shape asserts of the export, not part of the function
        if node.op == "call_module" and not node.users:
            sub = gm.get_submodule(node.target)
            if type(sub).__name__ == "GuardsFn" or node.target == "_guards_fn":
                g.erase_node(node)
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        if node.target in _FUNCTIONAL:
            node.target = _FUNCTIONAL[node.target]
        elif node.target is _A.convolution.default:
            _functional_convolution(gm, node)
        elif node.target in (_A.addmm.default, _A.mm.default):
            _functional_linear(g, node)
        elif node.target is _A.lift_fresh_copy.default:
            # a tensor built in forward (a lifted constant): torch.onnx's exporter has no
            # lift_fresh_copy; a clone computes the same and exports as Identity
            node.target = _A.clone.default
        elif (node.target in (_A.add_.Tensor, _A.add_.Scalar) and not node.users and node.args
              and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"
              and str(node.args[0].target).endswith("num_batches_tracked")):
            g.erase_node(node)

    written = sorted({str(node.args[0].target) for node in g.nodes
                      if node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node)
                      and node.args[0].op == "get_attr" and getattr(getattr(node.target, "_schema", None),
                                                                    "is_mutable", False)})
    if written:  # a buffer the forward writes in place (not a BN's statistics: those are rebuilt)
        warnings.append(
            f"the ExportedProgram's forward writes buffer {', '.join(repr(w) for w in written[:3])} in place: "
            "every forward bnfold runs (calibration, checks) changes it, so the written models hold the value it "
            "has when each is written, and the folded and frozen models may differ in it")

    used_paths: set[str] = set()
    seen: dict[tuple[int, ...], str] = {}  # the same tensors: the same BN module, called again
    counter = [0]
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        target = node.target
        if target in _BN_SINGLE:
            training, momentum, eps = node.args[5], node.args[6], node.args[7]
        elif target in _BN_TUPLE_NO_TRAINING:
            training, momentum, eps = False, node.args[5], node.args[6]
        elif target in _BN_TUPLE:
            training, momentum, eps = node.args[5], node.args[6], node.args[7]
        elif "batch_norm" in str(target):
            raise UnsupportedModelError(
                f"the ExportedProgram uses the batch-norm op {target}, which bnfold does not rebuild as a "
                "BatchNorm module; export with torch.export.export (no run_decompositions) or fold an ONNX export")
        else:
            continue
        if not isinstance(training, bool):
            raise UnsupportedModelError(f"the ExportedProgram's batch-norm op '{node.name}' has a computed "
                                        "training flag; bnfold cannot rebuild it")
        key = tuple(id(_attr_value(gm, a)[0]) for a in node.args[1:5]) + (bool(training),)
        if key in seen and any(a is not None for a in node.args[1:5]):
            path = seen[key]
        else:
            path, bn = _bn_module_for(gm, node, training, momentum, eps, used_paths, counter)
            used_paths.add(path)
            seen[key] = path
            _install(gm, path, bn)
        with g.inserting_before(node):
            call = g.call_module(path, (node.args[0],))
        call.meta = dict(node.meta)
        if target in _BN_SINGLE:
            node.replace_all_uses_with(call)
        else:  # tuple result: only item 0 (the output) may be used
            for user in list(node.users):
                index = user.args[1] if user.op == "call_function" and len(user.args) > 1 else None
                if index == 0 and user.target.__name__ == "getitem":
                    user.replace_all_uses_with(call)
                    g.erase_node(user)
                elif user.users:
                    raise UnsupportedModelError(
                        f"the ExportedProgram uses the saved statistics of batch-norm op '{node.name}'; "
                        "bnfold cannot rebuild it as a BatchNorm module")
                else:
                    g.erase_node(user)
        g.erase_node(node)
    for node in list(g.nodes):
        if node.op == "get_attr" and not node.users:
            g.erase_node(node)
    g.lint()
    module = fx.GraphModule(gm, g, type(gm).__name__)
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    names = [str(n.target) for n in placeholders]
    batches = set()
    for n in placeholders:
        val = n.meta.get("val")
        shape = getattr(val, "shape", None)
        if shape is None or len(shape) == 0:
            continue
        batches.add(shape[0] if isinstance(shape[0], int) else None)
    static = batches.pop() if len(batches) == 1 and None not in batches else None
    return module, names, static, warnings


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BadInputError(f"cannot read model file '{path}': {exc.strerror or exc}") from exc


def _load_exported_program(path: Path, unsafe_pickle: bool,
                           warn: Callable[[str], None] | None) -> LoadedTorchModel:
    """``torch.export.load`` where every pickle inside reads with ``weights_only=True``
    (:mod:`bnfold.torch.archive`); an archive that needs more only with ``unsafe_pickle``."""
    data = _read_bytes(path)  # checked and loaded from the same bytes
    check_inflation(data, path, "ExportedProgram")
    unsafe = check_exported_program(data, path)
    if unsafe is not None:
        if not unsafe_pickle:
            raise BadInputError(unsafe.message(path))
        if warn is not None:
            warn(f"unsafe_pickle=True: unpickling '{path}' runs arbitrary code from the file; use it only on files "
                 f"you trust (member '{unsafe.member}' needs full unpickling)")
    with PROCESS_STATE_LOCK, catch_warnings(record=True) as caught:  # shown only where the archive is accepted
        simplefilter("always")
        try:
            ep = guarded_export_load(data, unsafe=unsafe is not None)
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds
            raise BadInputError(f"cannot load ExportedProgram '{path}': {one_line(exc, 240)}") from exc
        if not unsafe_pickle:
            check_graph_callables(ep, path)
    for w in caught:
        warn_explicit(w.message, w.category, w.filename, w.lineno)
    module, names, static, warnings = exported_program_module(ep)
    example = None
    try:
        args, kwargs = ep.example_inputs or ((), {})
        from torch.utils import _pytree as pytree

        leaves = pytree.tree_leaves((args, kwargs))
        if leaves and len(leaves) == len(names) and all(isinstance(t, torch.Tensor) for t in leaves):
            example = dict(zip(names, leaves))
    except Exception:  # noqa: BLE001 - an archive without example inputs
        example = None
    if static is not None:
        warnings.append(
            f"the ExportedProgram was exported with a static batch size of {static}; bnfold runs it at other "
            "batch sizes (export with a dynamic batch dimension if the model fails on them)")
    return LoadedTorchModel(module=module, kind=EXPORTED_PROGRAM, label=str(path), path=path,
                            sha256=hashlib.sha256(data).hexdigest(), inputs=[ForwardInput(n) for n in names],
                            example_inputs=example,
                            static_batch=static, warnings=warnings)


def _load_torchscript(path: Path, unsafe_pickle: bool) -> LoadedTorchModel:
    data = _read_bytes(path)  # checked and loaded from the same bytes
    check_inflation(data, path, "TorchScript archive")
    found = check_torchscript_code(data, path)
    if found is not None and not unsafe_pickle:
        raise BadInputError(f"'{path}': {found.describe()}, so bnfold refuses it; " + unsafe_hint())
    try:
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise BadInputError(f"cannot load TorchScript archive '{path}': {one_line(exc, 240)}") from exc
    inputs, var_kw = forward_inputs(module)
    return LoadedTorchModel(module=module, kind=TORCHSCRIPT, label=str(path), path=path,
                            sha256=hashlib.sha256(data).hexdigest(), inputs=inputs, var_keyword=var_kw)


def _load_checkpoint(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU that also reads an ``argparse.Namespace`` (the
    training arguments timm's and torchvision's training scripts store beside the weights): it only holds
    attributes, which the weights-only unpickler restricts to the same plain types."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(str(path), map_location="cpu", weights_only=True)


def _is_weights_only_refusal(exc: BaseException) -> bool:
    return isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower()


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _load_pickle(path: Path, unsafe_pickle: bool, warn: Callable[[str], None] | None) -> LoadedTorchModel:
    check_inflation(path, path, "model file")
    try:
        obj = _load_checkpoint(path)
    except Exception as exc:  # noqa: BLE001
        if not _is_weights_only_refusal(exc):
            raise BadInputError(
                f"'{path}' is not a PyTorch model file torch.load can read: {one_line(exc, 240)}") from exc
        if not unsafe_pickle:
            raise BadInputError(
                f"'{path}' is a whole pickled module: loading it runs arbitrary code from the file, so bnfold "
                "refuses it; pass unsafe_pickle=True only if you trust the file, or save model.state_dict() and use "
                "load_factory('MODULE:CALLABLE', weights=FILE)") from None
        if warn is not None:
            warn(f"unsafe_pickle=True: unpickling '{path}' runs arbitrary code from the file; use it only on files "
                 "you trust")
        cwd_on_path()
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except (AttributeError, ImportError) as exc2:
            raise BadInputError(
                f"cannot unpickle '{path}': {type(exc2).__name__}: {one_line(exc2, 240)}; the module's class must be "
                "importable: run bnfold from the folder that holds its module or add it to PYTHONPATH") from exc2
        except Exception as exc2:  # noqa: BLE001 - a broken file, ...
            raise BadInputError(f"cannot unpickle '{path}': {type(exc2).__name__}: {one_line(exc2, 240)}") from exc2
    else:
        if _is_state_dict(obj) or (isinstance(obj, dict) and _unwrap_state_dict(obj) is not None):
            raise BadInputError(
                f"'{path}' holds a state_dict (weights only), not a model: build the model with "
                f"load_factory('MODULE:CALLABLE', weights=FILE) and pass this file as FILE: {path}")
    if not isinstance(obj, nn.Module):
        raise BadInputError(f"'{path}' holds a {type(obj).__name__}, not a torch.nn.Module")
    if isinstance(obj, torch.jit.ScriptModule):
        inputs, var_kw = forward_inputs(obj)
        kind = TORCHSCRIPT
    else:
        inputs, var_kw = forward_inputs(obj)
        kind = PICKLE
    return LoadedTorchModel(module=obj, kind=kind, label=str(path), path=path, sha256=sha256_of(path),
                            inputs=inputs, var_keyword=var_kw)


def load_model_file(path: Path, *, unsafe_pickle: bool = False,
                    warn: Callable[[str], None] | None = None) -> LoadedTorchModel:
    """Load MODEL (see the module docstring). ``warn`` receives the unsafe_pickle=True warning."""
    kind = detect_kind(path)
    if kind == EXPORTED_PROGRAM:
        return _load_exported_program(path, unsafe_pickle, warn)
    if kind == TORCHSCRIPT:
        return _load_torchscript(path, unsafe_pickle)
    return _load_pickle(path, unsafe_pickle, warn)


# ----------------------------------------------------------------------------- factory + weights


def _unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema"):
            inner = obj.get(key)
            if _is_state_dict(inner):
                return inner
    return None


# the prefixes wrappers add to every key: DataParallel/DDP (module.), torch.compile (_orig_mod.), a Lightning
# module or an EMA wrapper holding the network as self.model (model.)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def _strip_wrapper_prefixes(state: dict[str, torch.Tensor], expected: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``state`` without the wrapper prefixes that every one of its keys carries and the model's keys lack."""
    while True:
        for prefix in _WRAPPER_PREFIXES:
            if (all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected)):
                state = {k[len(prefix):]: v for k, v in state.items()}
                break
        else:
            return state


def _sub_model_prefix(missing: list[str], unexpected: list[str]) -> str | None:
    """The prefix under which the file holds every missing key (a Lightning module's ``net.``, a
    detector's ``backbone.``), or None."""
    if not missing or not unexpected:
        return None
    first = missing[0]
    present = set(unexpected)
    for key in unexpected:
        if key.endswith("." + first):
            prefix = key[:len(key) - len(first)]
            if all(prefix + k in present for k in missing):
                return prefix
    return None


def _listing(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_factory(spec: str, weights: Path | None) -> LoadedTorchModel:
    """Build the model with the factory ``spec`` and load ``weights`` (a state_dict) into it."""
    model = call_factory(load_callable(spec), spec, "factory", "the torch.nn.Module")
    if not isinstance(model, nn.Module):
        raise BadInputError(f"factory '{spec}' returned a {type(model).__name__}, not a torch.nn.Module")
    sha = None
    if weights is not None:
        if not weights.exists():
            raise BadInputError(f"weights file not found: {weights}")
        if not weights.is_file():
            raise BadInputError(f"weights path is not a file: {weights}")
        check_inflation(weights, weights, "weights file")
        try:
            obj = _load_checkpoint(weights)
        except Exception as exc:  # noqa: BLE001
            if _is_weights_only_refusal(exc):
                raise BadInputError(
                    f"weights '{weights}' are not a plain state_dict (the file needs full unpickling); save "
                    "model.state_dict() with torch.save") from None
            raise BadInputError(f"'{weights}' is not a PyTorch checkpoint torch.load can read: "
                                f"{one_line(exc, 240)}") from exc
        state = _unwrap_state_dict(obj)
        if state is None:
            held = (f"a dict with keys {_listing([repr(k) for k in obj], 8)}" if isinstance(obj, dict)
                    else f"a {type(obj).__name__}")
            raise BadInputError(f"weights '{weights}' hold {held}, not a state_dict (a dict of parameter name -> "
                                "tensor, or one under 'state_dict', 'model_state_dict', 'model', 'state_dict_ema' "
                                "or 'model_ema'); save model.state_dict()")
        expected = model.state_dict()
        state = _strip_wrapper_prefixes(state, expected)
        # torch's own BN loading fills in a missing num_batches_tracked (checkpoints from before PyTorch 0.4.1
        # or with their key metadata dropped); it only counts training steps, so it does not change the fold
        state = dict(state)
        for k, v in expected.items():
            if k not in state and k.endswith(".num_batches_tracked"):
                state[k] = v.clone()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
        # load_state_dict casts with copy_: a complex value into a real tensor keeps only its real part
        complex_ = [f"{k} {state[k].dtype} vs {v.dtype}" for k, v in expected.items()
                    if k in state and isinstance(state[k], torch.Tensor) and state[k].is_complex()
                    and not v.is_complex()]
        if missing or unexpected or shapes or complex_:
            parts = []
            if missing:
                parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
            if unexpected:
                parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
            if shapes:
                parts.append(f"shape mismatches ({len(shapes)}): {_listing(shapes, 3)}")
            if complex_:
                parts.append(f"complex values for real tensors ({len(complex_)}; loading would drop their "
                             f"imaginary parts): {_listing(complex_, 3)}")
            prefix = _sub_model_prefix(missing, unexpected)
            if prefix is not None:
                parts.append(f"every missing key is in the file under the prefix '{prefix}' (the model is a part of "
                             "the checkpoint's module): save that part alone, torch.save({k[len(p):]: v for k, v in "
                             f"sd.items() if k.startswith(p)}}, FILE) with p = '{prefix}'")
            raise BadInputError(f"weights '{weights}' do not match the model built by {spec}: " + "; ".join(parts))
        try:
            model.load_state_dict(state, strict=True)
        except Exception as exc:  # noqa: BLE001
            raise BadInputError(f"loading weights '{weights}' failed: {one_line(exc, 240)}") from exc
        sha = sha256_of(weights)
    inputs, var_kw = forward_inputs(model)
    label = str(weights) if weights is not None else f"factory {spec}"
    return LoadedTorchModel(module=model, kind=FACTORY, label=label, path=weights, sha256=sha, inputs=inputs,
                            var_keyword=var_kw, factory=spec)
