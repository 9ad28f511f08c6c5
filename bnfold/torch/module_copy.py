"""Copies of a module for calibration and folding (the module passed in is never changed).

:func:`copy_module` is ``copy.deepcopy`` with two differences: it copies modules with lazy
(uninitialised) parameters, and it is several times faster on networks of many small modules
(timm's). Most of a module's ``__dict__`` is empty hook dictionaries (a dozen ``OrderedDict`` per
module), which ``deepcopy`` reconstructs through ``__reduce_ex__`` one by one; an empty
``dict``/``OrderedDict``/``set``/``list`` of exactly that type holds nothing but its type, so a
fresh one is put in the memo instead (shared containers stay shared, as the memo maps one object
to one copy); and the walk over the module tree is done by :func:`_copy_tree` with deepcopy's own
steps.

:class:`DeferredCopy` is for a calibration run, which reads the weights and does not write them:
the copy's parameters start on the original's storage, and a background thread clones them while
the first forward pass runs (torch releases the GIL while it copies), so the copy of ResNet-50's
100 MB of weights (~30 ms of a one-shot calibration) overlaps that pass where a core is free
(calibrate defers its copy only then: ``bnfold.torch.calibrate.spare_core``; without one it makes a
plain :func:`copy_module` first, which measured 14-28 ms faster on ResNet-50 than clones made after
the first forward under the guard, stop 23; :meth:`DeferredCopy.finish` still makes whatever clones
the thread has not). During that pass a
``TorchFunctionMode`` (:meth:`DeferredCopy.guard`) sees every torch call: one that may write into a
parameter still on the original's storage, or make an alias of it (an in-place method, ``out=``,
``.data``, a view, any function it does not know to only read), first gives that parameter its
own storage (cloning it itself where the thread has not got there yet), so whatever the forward
writes goes into the copy. After the first forward every parameter has its own storage and the
mode is gone. Only plain dense CPU ``nn.Parameter`` tensors are deferred; buffers (which a forward
may update: BN counters, spectral-norm vectors) are copied at once. A write the mode cannot see
(``torch.ops`` called directly on a parameter, a C++ extension, or another thread that the forward
starts: the mode belongs to the calling thread) shows in the copy's version counter at the end:
the original then gets its values back from the clone where the clone was taken before the
write, else the run stops with an error that says so; such a write through ``.data`` (no version
counter sees it) changes the module passed in. A forward like that is the one case for
``calibrate(copy.deepcopy(module), data, inplace=True)``. Modules whose computation differs under
a torch-function mode (torch's fused attention fast path) take the plain copy.

Not used: torch's copy-on-write clone (``torch._lazy_clone``), which would make the copy free and
see every write (stop 22 tried it; ``tests/test_review22_cow.py`` holds what broke). In torch 2.13
it links the original's storage to the copy's, and then: threads making first writes into one such
tensor (disjoint rows of the caller's module after a calibration, or the module and its copy at
once) abort the process (``refcount_ == 0`` INTERNAL ASSERT in COWDeleter.cpp) or hang; a storage
grown in place (``resize_``, an ``out=`` of another size: torch.ao's per-channel FakeQuantize at
its first forward) fails every later write, on both sides; a storage without an allocator
(``torch.load``, ``torch.export.load``) is accepted and kills the process (SIGSEGV) at the first
write; a DLPack or raw-pointer view of the original taken before the copy writes into the copy.
"""
from __future__ import annotations

import copy
import copyreg
import threading
import types
from collections import OrderedDict
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy
from torch.overrides import TorchFunctionMode

from bnfold.errors import BadInputError, UnsupportedModelError, one_line

__all__ = ["DeferredCopy", "copy_module", "deferred_copy"]

_EMPTY_TYPES = (OrderedDict, dict, set, list)


def _seed_memo(module: nn.Module) -> tuple[dict[int, Any], list[nn.Parameter]]:
    """A ``deepcopy`` memo, and the module's parameters (each once, in ``parameters()`` order), from
    one walk over its modules. In the memo: a fresh container for every empty container of
    exactly a plain type in a module's ``__dict__``, a detached copy of each non-leaf tensor there,
    a fresh uninitialised tensor for each lazy one (``deepcopy`` refuses non-leaf tensors and an
    ``UninitializedParameter``), and a clone of each buffer whose deepcopy is one (Tensor.__deepcopy__
    is slow Python: ~45 us a buffer, 3 buffers a BN)."""
    memo: dict[int, Any] = {}
    params: dict[int, nn.Parameter] = {}
    buffers: dict[int, torch.Tensor] = {}
    storages: dict[int, int] = {}  # storage -> tensors on it, among those the modules hold

    def hold(t: torch.Tensor) -> None:
        if not is_lazy(t) and t.layout == torch.strided and t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            storages[ptr] = storages.get(ptr, 0) + 1

    for m in module.modules():
        for v in m.__dict__.values():
            if type(v) in _EMPTY_TYPES and not v:
                if type(v) is OrderedDict and v.__dict__:
                    continue  # an OrderedDict's attributes, which deepcopy copies
                memo[id(v)] = type(v)()
            elif isinstance(v, torch.Tensor):
                hold(v)
                if v.grad_fn is not None:
                    # a non-leaf attribute, which deepcopy refuses: the weight that torch's pruning and old
                    # weight_norm recompute from their parameters in a forward pre-hook; its detached value
                    memo[id(v)] = v.detach().clone(memory_format=torch.preserve_format)
        for p in m._parameters.values():
            if p is not None and id(p) not in params:
                params[id(p)] = p
                hold(p)
        for b in m._buffers.values():
            if b is not None and id(b) not in buffers:
                buffers[id(b)] = b
                hold(b)
    # the clones' storages are deepcopy's copies of the buffers' storages (Tensor.__deepcopy__ keeps
    # storage copies under "torch"): a view of one held anywhere else (a list, a hook's partial, an
    # unregistered module) is copied onto the clone, as deepcopy would
    storage_copies: dict[int, torch.UntypedStorage] = {}
    for t in buffers.values():
        if (id(t) not in memo and not is_lazy(t) and _plain_buffer(t) and t.numel()
                and storages.get(t.untyped_storage().data_ptr()) == 1):
            c = t.clone(memory_format=torch.preserve_format)
            if not t.is_contiguous() and c.stride() != t.stride():
                continue  # overlapping (stride 0): deepcopy keeps the layout and the storage
            memo[id(t)] = c
            storage_copies[t.untyped_storage()._cdata] = c.untyped_storage()
    if storage_copies:
        cast(dict[Any, Any], memo)["torch"] = storage_copies
    for t in [*params.values(), *buffers.values()]:
        if is_lazy(t):
            if isinstance(t, UninitializedParameter):
                # torch's parameter.pyi omits the device/dtype that UninitializedParameter.__new__ takes
                memo[id(t)] = UninitializedParameter(  # type: ignore[call-arg]
                    requires_grad=t.requires_grad, device=t.device, dtype=t.dtype)
            else:  # the same for UninitializedBuffer
                memo[id(t)] = UninitializedBuffer(  # type: ignore[call-arg]
                    requires_grad=False, device=t.device, dtype=t.dtype)
    return memo, list(params.values())


#: values ``deepcopy`` returns as they are
_ATOMIC = frozenset({type(None), int, float, bool, complex, str, bytes, type, types.FunctionType,
                     types.BuiltinFunctionType})
#: what deepcopy looks up on the instance itself (an attribute in its ``__dict__`` overrides the class's)
_OVERRIDES = frozenset({"__deepcopy__", "__reduce_ex__", "__reduce__", "__getstate__", "__getnewargs_ex__",
                        "__getnewargs__"})
_PLAIN: dict[type, bool] = {}  # module class -> copied by the same steps as nn.Module's deepcopy


def _plain_class(cls: type) -> bool:
    """Whether ``deepcopy`` copies instances of ``cls`` as it copies an ``nn.Module``: no
    ``__deepcopy__``, ``__reduce__``/``__reduce_ex__``, ``__getstate__``/``__setstate__``,
    ``__getnewargs__``, ``__getattr__`` or ``__slots__`` of its own (parametrized modules, ScriptModules,
    GraphModules have some)."""
    plain = _PLAIN.get(cls)
    if plain is None:
        plain = (getattr(cls, "__deepcopy__", None) is None and cls.__reduce_ex__ is object.__reduce_ex__
                 and cls.__reduce__ is object.__reduce__
                 and getattr(cls, "__getstate__", None) is nn.Module.__getstate__
                 and getattr(cls, "__setstate__", None) is nn.Module.__setstate__
                 and getattr(cls, "__getnewargs_ex__", None) is None and getattr(cls, "__getnewargs__", None) is None
                 # (deepcopy looks __deepcopy__ up through a __getattr__ of its own: a wrapper's may find the wrapped's)
                 and getattr(cls, "__getattr__", None) is nn.Module.__getattr__
                 and cls.__getattribute__ is object.__getattribute__
                 and not any("__slots__" in vars(k) for k in cls.__mro__ if k is not object))
        _PLAIN[cls] = plain
    return plain


def _copy_tree(m: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(m, memo)`` by the same steps (``cls.__new__``, the deep-copied state of
    ``Module.__getstate__``, ``__setstate__``), with the walk over submodules and the values that
    are returned as they are done here: ~3x faster on timm's networks of a few hundred modules. A
    class that customises its copying is left to ``deepcopy``."""
    found = memo.get(id(m))
    if found is not None:
        return cast(nn.Module, found)
    cls = type(m)
    if not _plain_class(cls) or cls in copyreg.dispatch_table or not _OVERRIDES.isdisjoint(m.__dict__):
        return copy.deepcopy(m, memo)
    new = cls.__new__(cls)
    memo[id(m)] = new
    state: dict[str, Any] = {}
    for k, v in m.__dict__.items():
        if k == "_compiled_call_impl":  # what Module.__getstate__ leaves out
            continue
        if type(v) in _ATOMIC:
            state[k] = v
        elif id(v) in memo:
            state[k] = memo[id(v)]
        elif k == "_modules" and type(v) is dict:
            subs: dict[str, Any] = {}
            memo[id(v)] = subs
            for name, sub in v.items():
                subs[name] = _copy_tree(sub, memo) if isinstance(sub, nn.Module) else copy.deepcopy(sub, memo)
            state[k] = subs
        else:
            state[k] = _copy_value(v, memo)
    new.__setstate__(state)
    return new


def _copy_value(v: Any, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy(v, memo)``, with the common cases of a module's ``__dict__`` done here: a
    ``dict``/``OrderedDict`` with string keys (``_parameters``, ``_buffers``), a tuple of atomic
    values (``kernel_size``: deepcopy returns the tuple itself)."""
    t = type(v)
    if t is dict or (t is OrderedDict and not v.__dict__):
        if not all(type(key) is str for key in v):
            return copy.deepcopy(v, memo)
        out: dict[Any, Any] = t()
        memo[id(v)] = out
        for key, val in v.items():
            out[key] = val if type(val) in _ATOMIC else memo[id(val)] if id(val) in memo else _copy_value(val, memo)
        return out
    if t is tuple and all(type(x) in _ATOMIC for x in v):
        return v
    return copy.deepcopy(v, memo)


def _plain_buffer(t: torch.Tensor) -> bool:
    """A tensor whose ``deepcopy`` is a clone: exactly ``torch.Tensor``, a dense leaf without
    gradient or Python attributes that spans its whole storage (so no other tensor can share it
    unless it is the same storage, which :func:`_seed_memo` checks)."""
    return (type(t) is torch.Tensor and t.layout == torch.strided and not t.requires_grad and t.grad is None
            and t.grad_fn is None and not t.is_quantized and t.device.type != "meta" and not t.__dict__
            and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def _deepcopy(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(module, memo)`` (by :func:`_copy_tree`); a module it refuses (a lock or file
    among its attributes, torch's old ``weight_norm``) is a one-line BadInputError."""
    try:
        return _copy_tree(module, memo)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise BadInputError(
            f"the module cannot be copied (copy.deepcopy: {type(exc).__name__}: {one_line(exc, 160)}), and bnfold "
            "works on a copy to leave it unchanged: pass inplace=True to work on the module itself, or make it "
            "copyable") from None


def copy_module(module: nn.Module) -> nn.Module:
    """``copy.deepcopy(module)``, lazy parameters included (see the module docstring)."""
    return _deepcopy(module, _seed_memo(module)[0])


def _deferrable(p: nn.Parameter) -> bool:
    # not an inference tensor (a module built under torch.inference_mode): it has no version counter
    return (type(p) is nn.Parameter and p.device.type == "cpu" and p.layout == torch.strided
            and not p.is_quantized and p.numel() > 0 and not p.is_inference())


class _Slot:
    """One deferred parameter: the original, its twin in the copy, and the clone for the twin."""

    __slots__ = ("original", "twin", "version", "lock", "clone", "clean", "done")

    def __init__(self, original: nn.Parameter, twin: nn.Parameter) -> None:
        self.original = original
        self.twin = twin
        self.version = twin._version
        self.lock = threading.Lock()
        self.clone: torch.Tensor | None = None
        self.clean = False  # the clone was taken from the values the run started with
        self.done = False  # the twin has its own storage

    def take(self) -> torch.Tensor:
        """The clone of the original, made now unless the thread made it."""
        with self.lock:
            if self.clone is None:
                before = self.twin._version
                self.clone = self.original.detach().clone(memory_format=torch.preserve_format)
                self.clean = before == self.version and self.twin._version == self.version
            return self.clone


#: torch functions that only read their tensor arguments and return new tensors (unless given
#: ``out=``): a parameter passed to one of them may stay on the original's storage. Not here: the
#: batch/instance norms (they update running statistics, which may be parameters) and F.embedding
#: (``max_norm`` renormalises the weight in place)
_READS = frozenset({
    torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
    torch.conv_transpose3d, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
    F.conv_transpose3d, F.linear, F.bilinear, torch.layer_norm, F.layer_norm,
    torch.group_norm, F.group_norm, F.prelu, torch.prelu,
    torch.addmm, torch.mm, torch.matmul, torch.bmm, torch.baddbmm, torch.addmv, torch.mv,
    torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__mul__, torch.Tensor.__rmul__,
    torch.Tensor.__sub__, torch.Tensor.__rsub__, torch.Tensor.__truediv__, torch.Tensor.__matmul__,
    torch.add, torch.mul, torch.sub, torch.div, torch.Tensor.add, torch.Tensor.mul, torch.Tensor.sub,
    torch.Tensor.div, torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.is_contiguous,
    torch.Tensor.is_floating_point, torch.Tensor.__len__, torch.Tensor.__format__, torch.Tensor.__repr__,
})
#: tensor properties that are metadata (no alias of the values)
_METADATA = frozenset({"shape", "dtype", "device", "requires_grad", "ndim", "is_leaf", "grad", "grad_fn", "layout",
                       "is_cuda", "is_cpu", "is_sparse", "is_quantized", "is_meta", "is_nested", "names",
                       "_version", "itemsize", "nbytes", "output_nr", "_base", "is_mkldnn", "is_xpu", "is_mps"})


#: modules whose forward takes a fused fast path only where no torch-function mode is active: under
#: the guard their first batch would be computed otherwise (to ~1e-7), and the copy would differ
#: from a plain copy's calibration
_MODE_SENSITIVE = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)


class _Guard(TorchFunctionMode):
    """The first forward's torch calls: a pending parameter passed to anything but a known read
    gets its own storage first (:class:`DeferredCopy`)."""

    def __init__(self, copy_: DeferredCopy) -> None:
        super().__init__()
        self.copy = copy_

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        pending = self.copy.pending
        if pending and (func not in _READS or kwargs.get("out") is not None):
            prop = getattr(getattr(func, "__self__", None), "__name__", None)
            if getattr(func, "__name__", None) != "__get__" or prop not in _METADATA:
                for a in (*args, *kwargs.values()):
                    if isinstance(a, (list, tuple)):
                        for b in a:
                            if id(b) in pending:
                                self.copy.swap(pending[id(b)])
                    elif id(a) in pending:
                        self.copy.swap(pending[id(a)])
        return func(*args, **kwargs)


class DeferredCopy:
    """A copy of a module whose parameters get their own storage while the first forward runs
    (module docstring). ``module``: the copy; :meth:`start` once the data's iterator exists (a
    DataLoader forks its workers then, and a fork is best made with no other thread running); the
    first forward under :meth:`guard`; :meth:`finish` after it (or with none), before anything else
    runs on the copy; :meth:`abandon` where the run failed."""

    def __init__(self, original: nn.Module) -> None:
        memo, params = _seed_memo(original)
        slots: dict[int, _Slot] = {}
        for p in params:
            if id(p) in memo or not _deferrable(p):
                continue
            # p.data: the original's storage, with a version counter of its own (a write into the
            # shared storage through the twin shows there; nothing done to the copy later reaches
            # the original's counter, which autograd checks)
            twin = nn.Parameter(p.data, p.requires_grad)
            memo[id(p)] = twin
            slots[id(twin)] = _Slot(p, twin)
        self.module: nn.Module = _deepcopy(original, memo)
        self._slots = list(slots.values())
        self.pending: dict[int, _Slot] = dict(slots)  # id(twin) -> slot, until the twin has its own storage
        self._thread: threading.Thread | None = None
        self._unrestored: list[str] = []

    def start(self) -> None:
        """Start the background clones."""
        if self._thread is None and self._slots:
            thread = threading.Thread(target=self._clone_all, name="bnfold-copy", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # no thread to be had (a thread limit): the guard and finish() clone here
                return
            self._thread = thread

    def guard(self) -> _Guard:
        """The mode to run the first forward under."""
        return _Guard(self)

    def _clone_all(self) -> None:
        try:
            for slot in self._slots:
                slot.take()
        except BaseException:  # noqa: BLE001 (the main thread clones what is missing, and fails there if it must)
            return

    def swap(self, slot: _Slot) -> None:
        """Give the twin storage of its own (unless the forward gave it some: ``.data = ...``)."""
        c = slot.take()
        slot.done = True
        self.pending.pop(id(slot.twin), None)
        p, twin = slot.original, slot.twin
        if twin.data_ptr() != p.data_ptr() or twin.shape != p.shape:
            return
        if twin._version == slot.version:
            twin.data = c
            return
        # written in place before the twin had its own storage: the copy keeps what was written, the
        # original gets its values back from a clone taken before the write
        twin.data = p.detach().clone(memory_format=torch.preserve_format)
        if slot.clean:  # through .data: the original's version counter (which autograd checks) stays as it was
            p.data.copy_(c)
        else:
            self._unrestored.append(f"{tuple(p.shape)}")

    def _settle(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for slot in self._slots:
            if not slot.done:
                self.swap(slot)
            slot.clone = None

    def abandon(self) -> None:
        """The run failed: wait for the thread, put back what a forward wrote into the original
        (where it can), and leave the copy to be dropped."""
        try:
            self._settle()
        except BaseException:  # noqa: BLE001 (the run's own error is the one to report)
            pass

    def finish(self) -> nn.Module:
        """The copy with storage of its own; the original as it was before the run."""
        self._settle()
        if self._unrestored:
            raise UnsupportedModelError(
                f"the module's forward wrote in place into {len(self._unrestored)} parameter(s) "
                "(shapes " + ", ".join(self._unrestored[:3]) + ") while bnfold copied them, and they could "
                "not be restored: the module passed in may have changed. Calibrate a copy of it with "
                "inplace=True (copy.deepcopy(module))")
        return self.module


def deferred_copy(module: nn.Module) -> DeferredCopy | None:
    """A :class:`DeferredCopy` of ``module``, or None where a plain copy is the one to make: no
    parameter worth deferring, lazy parameters (a first forward materialises them in place), or a
    module that computes differently under a torch-function mode (:data:`_MODE_SENSITIVE`)."""
    worth = False
    for m in module.modules():  # one walk (DeferredCopy makes its own)
        if isinstance(m, _MODE_SENSITIVE):
            return None
        for p in m._parameters.values():
            if p is not None:
                if is_lazy(p):
                    return None
                worth = worth or _deferrable(p)
    return DeferredCopy(module) if worth else None
