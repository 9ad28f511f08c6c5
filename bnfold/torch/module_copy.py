"""Copies of a module for calibration and folding (the module passed in is never changed).

:func:`copy_module` is ``copy.deepcopy`` with three differences: it copies modules with lazy
(uninitialised) parameters; it is several times faster on networks of many small modules (timm's);
and on the CPU its tensors are copy-on-write clones, made in microseconds whatever their size.

Copy-on-write (``torch._lazy_clone``, torch >= 2.4): the copy's parameter or buffer starts on the
same memory as the original's, and the first write into either one, by any torch operation from
any thread (an in-place method, ``out=``, ``.data``, ``torch.ops``, a C++ extension that asks for a
writable pointer), first gives the written side memory of its own; torch's own kernels are audited
for it on the CPU. A calibration only reads the weights, so ResNet-50's 100 MB are never copied
(~30-50 ms of a one-shot calibration on 2 cores, and the memory). Where the original's memory is
not torch's own (``torch.from_numpy``, shared memory, a memory-mapped checkpoint), not on the CPU,
or a tensor does not span its storage exactly, the tensor is cloned, as ``deepcopy`` does.

What a copy-on-write copy changes about the original: nothing in its values, ever. While the copy
lives, the original's first write into a tensor moves that tensor to fresh memory (the copy keeps
the old); once the copy is gone, the original writes in place as before. Code that holds a raw
pointer to the original's memory from before the copy (a numpy array made with ``.numpy()``, an
engine bound to ``data_ptr()``) and writes through it writes into the copy too; code that needs
the original's tensors to keep their addresses across writes should pass ``inplace=True`` to a
copy of its own.

Most of a module's ``__dict__`` is empty hook dictionaries (a dozen ``OrderedDict`` per module),
which ``deepcopy`` reconstructs through ``__reduce_ex__`` one by one; an empty
``dict``/``OrderedDict``/``set``/``list`` of exactly that type holds nothing but its type, so a
fresh one is put in the memo instead (shared containers stay shared, as the memo maps one object
to one copy); and the walk over the module tree is done by :func:`_copy_tree` with deepcopy's own
steps.
"""
from __future__ import annotations

import copy
import copyreg
import types
from collections import OrderedDict
from typing import Any, cast

import torch
from torch import nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy

from bnfold.errors import BadInputError, one_line

__all__ = ["copy_module", "lazy_clone"]

_EMPTY_TYPES = (OrderedDict, dict, set, list)


def _lazy_clone_fn() -> Any:
    """``torch._lazy_clone`` where torch has it and its CPU kernels respect it (2.4 and later)."""
    try:
        major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    except ValueError:
        return None
    return getattr(torch, "_lazy_clone", None) if (major, minor) >= (2, 4) else None


_LAZY_CLONE = _lazy_clone_fn()


def lazy_clone(t: torch.Tensor) -> torch.Tensor:
    """``t.detach().clone(memory_format=torch.preserve_format)``, copy-on-write where it can be (a
    CPU tensor on torch's own memory that spans its storage exactly: the module docstring)."""
    # (a storage without an allocator, not resizable, takes the lazy clone and then crashes the process
    # at the first write: torch.export.load's weights, torch 2.13)
    if _LAZY_CLONE is not None and t.device.type == "cpu" and _whole(t) and t.untyped_storage().resizable():
        try:
            return cast(torch.Tensor, _LAZY_CLONE(t.detach()))
        except (RuntimeError, NotImplementedError):  # memory that is not torch's own: numpy, shared, mapped
            pass
    return t.detach().clone(memory_format=torch.preserve_format)


def _whole(t: torch.Tensor) -> bool:
    """A dense strided tensor that spans its whole storage without overlap, so that a clone of the
    storage is a clone of the tensor with the same strides (what ``clone(preserve_format)`` makes)."""
    if t.layout != torch.strided or t.is_quantized or t.storage_offset() != 0 or not t.numel():
        return False
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return False
    return t.is_contiguous() or torch.empty_like(t, memory_format=torch.preserve_format).stride() == t.stride()


def _seed_memo(module: nn.Module) -> dict[int, Any]:
    """A ``deepcopy`` memo, from one walk over the module's modules. In it: a fresh container for
    every empty container of exactly a plain type in a module's ``__dict__``, a detached copy of
    each non-leaf tensor there, a fresh uninitialised tensor for each lazy one (``deepcopy`` refuses
    non-leaf tensors and an ``UninitializedParameter``), a (copy-on-write) clone of each parameter
    of exactly ``nn.Parameter`` (what ``Parameter.__deepcopy__`` makes), and of each buffer whose
    deepcopy is one (Tensor.__deepcopy__ is slow Python: ~45 us a buffer, 3 buffers a BN)."""
    memo: dict[int, Any] = {}
    params: dict[int, nn.Parameter] = {}
    buffers: dict[int, torch.Tensor] = {}
    storages: dict[int, int] = {}  # storage -> tensors on it, among those the modules hold

    def hold(t: torch.Tensor) -> None:
        if not is_lazy(t) and t.layout == torch.strided and t.device.type != "meta":
            key = t.untyped_storage()._cdata  # (its data_ptr() would give a copy-on-write storage memory of its own)
            storages[key] = storages.get(key, 0) + 1

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
    for p in params.values():
        if id(p) not in memo and type(p) is nn.Parameter and p.layout == torch.strided and p.device.type != "meta":
            memo[id(p)] = nn.Parameter(lazy_clone(p), p.requires_grad)  # Parameter.__deepcopy__, copy-on-write
    # the clones' storages are deepcopy's copies of the buffers' storages (Tensor.__deepcopy__ keeps
    # storage copies under "torch"): a view of one held anywhere else (a list, a hook's partial, an
    # unregistered module) is copied onto the clone, as deepcopy would
    storage_copies: dict[int, torch.UntypedStorage] = {}
    for t in buffers.values():
        if (id(t) not in memo and not is_lazy(t) and _plain_buffer(t) and t.numel()
                and storages.get(t.untyped_storage()._cdata) == 1):
            c = lazy_clone(t)
            if c.stride() != t.stride():
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
    return memo


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
    return _deepcopy(module, _seed_memo(module))
