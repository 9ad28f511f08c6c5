"""The producer of a BN call in a traced module: which node computes the BN's input, of which
kind (a Conv, ConvTranspose or Linear module, or the functional form on parameters), with which
weights; or the :class:`bnfold.rules.Refuse` saying why there is none that can take the fold.

The kind-specific arithmetic and channel counts are the rules' (:mod:`bnfold.rules`): a Conv is
``rules.CONV``, a ConvTranspose ``rules.CONV_TRANSPOSE`` and a Linear ``rules.GEMM`` with
transB=1 (``y = x @ W.T + b``, W of shape (out, in)).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnfold.records import Reason
from bnfold.rules import CONV, CONV_TRANSPOSE, GEMM, BackwardRule, FoldAttrs, Refuse

_MODULE_KINDS: tuple[tuple[type, BackwardRule, int], ...] = (
    (nn.Conv1d, CONV, 1), (nn.Conv2d, CONV, 2), (nn.Conv3d, CONV, 3),
    (nn.ConvTranspose1d, CONV_TRANSPOSE, 1), (nn.ConvTranspose2d, CONV_TRANSPOSE, 2),
    (nn.ConvTranspose3d, CONV_TRANSPOSE, 3),
    (nn.Linear, GEMM, 0),
)

# functional producers: (rule, spatial dims); argument order of each signature is fixed below
_FUNC_KINDS: dict[Any, tuple[BackwardRule, int]] = {
    F.conv1d: (CONV, 1), F.conv2d: (CONV, 2), F.conv3d: (CONV, 3),
    F.conv_transpose1d: (CONV_TRANSPOSE, 1), F.conv_transpose2d: (CONV_TRANSPOSE, 2),
    F.conv_transpose3d: (CONV_TRANSPOSE, 3),
    F.linear: (GEMM, 0),
}
WEIGHT_POS, BIAS_POS, _GROUPS_POS = 1, 2, 6  # conv: (x, w, b, stride, padding, dilation, groups);
# conv_transpose: (x, w, b, stride, padding, output_padding, groups, dilation); linear: (x, w, b)


def _module_kind(m: nn.Module) -> tuple[BackwardRule, int] | None:
    for cls, rule, dims in _MODULE_KINDS:
        if isinstance(m, cls):
            return (rule, dims) if getattr(type(m), "forward", None) is getattr(cls, "forward", None) else None
    return None


def target_of(node: fx.Node) -> str:
    """The target of a call_module or get_attr node (a dotted attribute path)."""
    return cast(str, node.target)


def channels_of(bn: nn.Module) -> int:
    """The channel count of a BN-like module that tracks statistics."""
    return int(cast(torch.Tensor, bn.running_mean).shape[0])


def _tensor(obj: object) -> torch.Tensor:
    return cast(torch.Tensor, obj)


def describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{type(gm.get_submodule(target_of(node))).__name__} '{node.target}'"
    if node.op in ("call_function", "call_method"):
        return f"{getattr(node.target, '__name__', node.target)} ('{node.name}')"
    return f"{node.op} '{node.name}'"


def resolve_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def arg(node: fx.Node, pos: int, name: str, default: Any = None) -> tuple[Any, str]:
    """The value of argument ``name`` (positional ``pos``) and where it is: 'args', 'kwargs' or 'default'."""
    if len(node.args) > pos:
        return node.args[pos], "args"
    if name in node.kwargs:
        return node.kwargs[name], "kwargs"
    return default, "default"


@dataclass
class Producer:
    node: fx.Node
    rule: BackwardRule  # CONV, CONV_TRANSPOSE, or GEMM for a Linear
    dims: int
    name: str  # module name for the report
    weight: torch.Tensor
    bias: torch.Tensor | None
    groups: int
    module: nn.Module | None = None  # call_module producers
    label: str = ""  # "Conv2d 'layer1.conv'" or "conv2d on 'stem.weight'", for the report
    weight_target: str | None = None  # call_function producers: get_attr targets
    bias_target: str | None = None
    shared: bool = False  # the module or its weight serves other calls too: fold into a private copy

    @property
    def is_linear(self) -> bool:
        return self.rule is GEMM

    @property
    def attrs(self) -> FoldAttrs:
        """The attributes the rule's formula reads (a Linear is a Gemm with transB=1)."""
        return FoldAttrs(trans_b=True) if self.is_linear else FoldAttrs(group=self.groups)

    @property
    def out_channels(self) -> int:
        return self.rule.out_channels(tuple(self.weight.shape), self.attrs)


def tensor_uses(gm: fx.GraphModule) -> tuple[Counter[int], Counter[str]]:
    """How often each parameter/buffer (by id) is used by a node, and each module target is called."""
    uses: Counter[int] = Counter()
    calls: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[target_of(node)] += 1
            sub = gm.get_submodule(target_of(node))
            for t in list(sub.parameters()) + list(sub.buffers()):
                uses[id(t)] += 1
        elif node.op == "get_attr":
            obj = resolve_attr(gm, target_of(node))
            if isinstance(obj, torch.Tensor):
                uses[id(obj)] += max(1, len(node.users))
    return uses, calls


def refuse_run_time_parts(mod: nn.Module, label: str, hook_effect: str) -> None:
    """HOOKED for forward hooks or pre-hooks, NOT_CONSTANT for parametrizations (weight_norm,
    spectral_norm, ...: parameters computed at run time) of a producer or BN module."""
    if mod._forward_hooks or mod._forward_pre_hooks:
        raise Refuse(Reason.HOOKED, f"{label} has forward hooks or pre-hooks, {hook_effect}")
    if mod._backward_hooks or mod._backward_pre_hooks:
        raise Refuse(Reason.HOOKED, f"{label} has backward hooks, {hook_effect}")
    glob = torch.nn.modules.module
    if glob._global_forward_hooks or glob._global_forward_pre_hooks:
        raise Refuse(Reason.HOOKED, "global module forward hooks (register_module_forward_hook) run on every "
                     f"module call: they run on {label}, {hook_effect}")
    if glob._global_backward_hooks or glob._global_backward_pre_hooks:
        raise Refuse(Reason.HOOKED, "global module backward hooks (register_module_full_backward_hook) run on "
                     f"every module call: they run on {label}, {hook_effect}")
    if getattr(mod, "parametrizations", None):
        raise Refuse(Reason.NOT_CONSTANT, f"{label} has parametrizations (weight_norm, spectral_norm, ...) "
                     "that compute its parameters at run time")


def find_producer(node: Any, gm: fx.GraphModule, uses: Counter[int], calls: Counter[str]) -> Producer:
    if not isinstance(node, fx.Node):
        raise Refuse(Reason.NO_PRODUCER, "its input is not produced by a node of the traced graph")
    if node.op == "placeholder":
        raise Refuse(Reason.NO_PRODUCER, f"its input is the model input '{node.target}'")
    if node.op == "get_attr":
        raise Refuse(Reason.NO_PRODUCER, f"its input is the constant '{node.target}'")
    if node.op == "call_module":
        target = target_of(node)
        mod = gm.get_submodule(target)
        kind = _module_kind(mod)
        if kind is None:
            raise Refuse(Reason.UNSUPPORTED_PRODUCER, f"its input comes from {describe(node, gm)}, "
                         "not from a Conv, ConvTranspose or Linear")
        if "forward" in vars(mod):  # m.forward = ... on the instance: its class's forward is not what it computes
            raise Refuse(Reason.UNSUPPORTED_PRODUCER, f"its input comes from {describe(node, gm)}, whose forward "
                         f"is set on the instance, not {type(mod).__name__}'s own")
        refuse_run_time_parts(mod, f"'{target}'", "which would then see the folded output")
        w, b = _tensor(mod.weight), cast("torch.Tensor | None", mod.bias)
        # a module called again elsewhere, or a weight tied to another layer: scaling it in place
        # would change those other calls, so this call gets its own folded copy
        shared = calls[target] > 1 or uses[id(w)] > 1 or (b is not None and uses[id(b)] > 1)
        groups = int(getattr(mod, "groups", 1))
        return Producer(node, kind[0], kind[1], target, w, b, groups, module=mod,
                        label=f"{type(mod).__name__} '{target}'", shared=shared)
    if node.op == "call_function" and node.target in _FUNC_KINDS:
        fn = cast(Callable[..., Any], node.target)
        rule, dims = _FUNC_KINDS[fn]
        w_node, _ = arg(node, WEIGHT_POS, "weight")
        b_node, _ = arg(node, BIAS_POS, "bias")
        if not (isinstance(w_node, fx.Node) and w_node.op == "get_attr"):
            raise Refuse(Reason.NOT_CONSTANT, f"the weight of {describe(node, gm)} is computed in forward, "
                         "not a parameter")
        if b_node is not None and not (isinstance(b_node, fx.Node) and b_node.op == "get_attr"):
            raise Refuse(Reason.NOT_CONSTANT, f"the bias of {describe(node, gm)} is computed in forward, "
                         "not a parameter")
        w_target = target_of(w_node)
        b_target = target_of(b_node) if b_node is not None else None
        w = resolve_attr(gm, w_target)
        b = resolve_attr(gm, b_target) if b_target is not None else None
        if not isinstance(w, torch.Tensor) or (b is not None and not isinstance(b, torch.Tensor)):
            raise Refuse(Reason.NOT_CONSTANT, f"the weight or bias of {describe(node, gm)} is not a tensor")
        owner = w_target.rpartition(".")[0]
        shared = uses[id(w)] > 1 or (b is not None and uses[id(b)] > 1)
        groups = 1
        if rule is not GEMM:
            g, _ = arg(node, _GROUPS_POS, "groups", 1)
            if not isinstance(g, int):
                raise Refuse(Reason.NOT_CONSTANT, f"the group count of {describe(node, gm)} is computed in forward")
            groups = g
        return Producer(node, rule, dims, owner or w_target, w, b, groups,
                        weight_target=w_target, bias_target=b_target,
                        label=f"{fn.__name__} of '{owner or w_target}'", shared=shared)
    raise Refuse(Reason.UNSUPPORTED_PRODUCER, f"its input comes from {describe(node, gm)}, "
                 "not from a Conv, ConvTranspose or Linear")
