"""A PyTorch model's inputs: InputSpecs for its data file, and example tensors laid out the way
its forward takes them (used by :mod:`bnfold.torch.convert`)."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from bnfold.data import sources
from bnfold.data.sources import InputSpec
from bnfold.data.stream import StreamSource, array_dtype
from bnfold.errors import BadInputError
from bnfold.torch.load import KIND_LABELS, LoadedTorchModel

__all__ = ["input_specs", "ordered", "sample_count", "split", "stream_input_specs", "tensors", "to_device"]


def _data_members(path: Path) -> list[tuple[str | None, np.dtype | None]]:
    """(array name or None for a .npy, dtype) of the first data file under ``path``."""
    if path.is_dir():
        files = sorted(n for n in os.listdir(path) if not n.startswith(".")
                       and os.path.splitext(n)[1].lower() in (".npz", ".npy") and (path / n).is_file())
        if not files:
            return []
        first = path / files[0]
    else:
        first = path
    label = f"'{first}'"
    suffix = first.suffix.lower()
    if suffix == ".npy":
        m = sources._scan_npy(str(first), label, "input")
        return [(None, m.dtype)]
    if suffix == ".npz":
        return [(m.key, np.dtype(m.dtype)) for m in sources._scan_npz(str(first), label)]
    return []


def _spec_dtype(dtype: np.dtype | None) -> np.dtype:
    if dtype is None or dtype.kind == "f":
        return np.dtype(np.float32)
    return np.dtype(dtype)


def input_specs(loaded: LoadedTorchModel, data: Path) -> list[InputSpec]:
    """InputSpecs named after forward's parameters (shapes from the data, float32 unless the data
    says otherwise): a .npy feeds the one required input; an .npz feeds every required input and
    the optional ones it names (other names too where forward takes ``**kwargs``)."""
    return _specs(loaded, _data_members(data))


def stream_input_specs(loaded: LoadedTorchModel, source: StreamSource) -> list[InputSpec]:
    """:func:`input_specs` for a streamed source, from its first batch: a dict's keys as an .npz's
    names, a bare array as a .npy, a tuple or list as the leading forward parameters in order."""
    head = source.head
    if isinstance(head, Mapping):
        return _specs(loaded, [(str(k), array_dtype(v)) for k, v in head.items()])
    if isinstance(head, (tuple, list)) and head:
        names = [i.name for i in loaded.inputs][:len(head)]
        return [InputSpec(n, _spec_dtype(array_dtype(v)), None) for n, v in zip(names, head)] or _specs(loaded, [])
    return _specs(loaded, [(None, array_dtype(head))])


def _specs(loaded: LoadedTorchModel, members: list[tuple[str | None, np.dtype | None]]) -> list[InputSpec]:
    if members and members[0][0] is None:  # .npy: one array
        required = [i.name for i in loaded.inputs if i.required]
        if len(required) > 1:  # let open_data say that a .npy cannot feed them
            return [InputSpec(n, np.dtype(np.float32), None) for n in required]
        name = required[0] if required else (loaded.inputs[0].name if loaded.inputs else "input")
        return [InputSpec(name, _spec_dtype(members[0][1]), None)]
    keys = {k: d for k, d in members if k is not None}
    specs = [InputSpec(i.name, _spec_dtype(keys.get(i.name)), None)
             for i in loaded.inputs if i.required or i.name in keys]
    if loaded.var_keyword:
        known = {s.name for s in specs}
        specs += [InputSpec(k, _spec_dtype(d), None) for k, d in keys.items() if k not in known]
    if not specs:
        kind = KIND_LABELS.get(loaded.kind, loaded.kind)
        raise BadInputError(f"cannot tell the inputs of the model's forward ({kind}); "
                            "give an .npz keyed by forward's parameter names")
    return specs


def tensors(arrays: Mapping[str, np.ndarray], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The arrays as tensors, floating ones cast to ``dtype``."""
    out = {}
    for name, arr in arrays.items():
        t = torch.from_numpy(np.ascontiguousarray(arr))
        out[name] = t.to(dtype) if t.is_floating_point() else t
    return out


def ordered(loaded: LoadedTorchModel, example: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The example in forward's parameter order (export names the inputs in that order)."""
    order = [i.name for i in loaded.inputs if i.name in example]
    return {**{n: example[n] for n in order}, **{n: t for n, t in example.items() if n not in order}}


def split(loaded: LoadedTorchModel, example: Mapping[str, torch.Tensor]) -> tuple[
        tuple[torch.Tensor, ...], dict[str, torch.Tensor], list[str]]:
    """Positional args (the leading forward parameters the example gives, in order), the rest as
    keyword args, and the names of the positional ones: a written model is called like the original."""
    names: list[str] = []
    for i in loaded.inputs:
        if i.name not in example or i.keyword_only:
            break
        names.append(i.name)
    args = tuple(example[n] for n in names)
    kwargs = {n: t for n, t in example.items() if n not in names}
    return args, kwargs, names


def to_device(example: Mapping[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in example.items()}


def sample_count(example: Mapping[str, torch.Tensor]) -> int:
    """The leading axis of the first tensor that has one (1 when none has)."""
    for t in example.values():
        if t.dim() >= 1:
            return int(t.shape[0])
    return 1
