"""Apply a :class:`bnfold.torch.plan.TorchPlan` to the traced module: each folded BN call's
producer gets its folded weight and bias (new ``Parameter`` objects: the module that was traced
keeps its own), and the BN call is removed.

Where a producer's weights also serve other calls, this call is pointed at a private copy (the
attribute reserved by the plan); the other calls keep the original, as a shared ONNX initializer
does. Everything else (which module, which parameters) is read from the graph as it stands when
the fold is applied, so a second fold into the same call finds the first one's parameters.
"""
from __future__ import annotations

from typing import Any, cast

import torch
from torch import fx, nn

from bnfold.records import Action
from bnfold.torch.bn_kinds import ActPart
from bnfold.torch.calibrate import copy_module
from bnfold.torch.plan import SiteFold, TorchPlan
from bnfold.torch.producers import BIAS_POS, WEIGHT_POS, arg, resolve_attr, target_of


def _new_param(value: torch.Tensor, like: torch.Tensor | None) -> nn.Parameter:
    return nn.Parameter(value, requires_grad=bool(like.requires_grad) if like is not None else True)


def _fresh_attr(owner: nn.Module, base: str) -> str:
    name, k = base, 1
    while hasattr(owner, name):
        name, k = f"{base}{k}", k + 1
    return name


def _set_arg(node: fx.Node, pos: int, name: str, value: Any) -> None:
    """Set a call's argument where it was given (positionally, else as a keyword)."""
    if len(node.args) > pos:
        args = list(node.args)
        args[pos] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def _owner(gm: fx.GraphModule, target: str) -> tuple[str, nn.Module, str]:
    """(owner path, owner module, attribute) of a dotted attribute path of ``gm``."""
    owner_name, _, attr = target.rpartition(".")
    return owner_name, (gm.get_submodule(owner_name) if owner_name else gm), attr


def _apply_module(gm: fx.GraphModule, f: SiteFold, private: bool) -> None:
    node = f.producer.node
    target = target_of(node)
    live = gm.get_submodule(target)
    w_like, b_like = cast(torch.Tensor, live.weight), cast("torch.Tensor | None", live.bias)
    mod = live if private and f.copy_attr is None else copy_module(live)
    mod.weight = _new_param(f.weight, w_like)
    mod.bias = _new_param(f.bias, b_like if b_like is not None else w_like)
    if mod is not live:
        parent_name, parent, attr = _owner(gm, target)
        if f.copy_attr is not None:  # the module's other calls keep it: this call moves to the copy
            attr = f.copy_attr
            node.target = f"{parent_name}.{attr}" if parent_name else attr
        setattr(parent, attr, mod)


def _apply_functional(gm: fx.GraphModule, f: SiteFold) -> None:
    node = f.producer.node
    w_node, _ = arg(node, WEIGHT_POS, "weight")
    b_node, _ = arg(node, BIAS_POS, "bias")
    w_like = resolve_attr(gm, target_of(w_node))
    b_like = resolve_attr(gm, target_of(b_node)) if b_node is not None else None
    owner_name, owner, w_attr = _owner(gm, target_of(w_node))
    if f.copy_attr is not None:  # this call alone reads new, folded parameters; the shared ones stay
        for pos, key, value, like in ((WEIGHT_POS, "weight", f.weight, w_like),
                                      (BIAS_POS, "bias", f.bias, b_like if b_like is not None else w_like)):
            attr = f.copy_attr if key == "weight" else _fresh_attr(owner, "bias_bnfold")
            owner.register_parameter(attr, _new_param(value, like))
            with gm.graph.inserting_before(node):
                ref = gm.graph.get_attr(f"{owner_name}.{attr}" if owner_name else attr)
            _set_arg(node, pos, key, ref)
        return
    setattr(owner, w_attr, _new_param(f.weight, w_like))
    if b_node is not None:
        _, b_owner, b_attr = _owner(gm, target_of(b_node))
        setattr(b_owner, b_attr, _new_param(f.bias, b_like))
        return
    b_attr = "bias"
    k = 0
    while getattr(owner, b_attr, None) is not None:
        k += 1
        b_attr = f"bnfold_bias{k}"
    if b_attr in owner._parameters:
        owner._parameters.pop(b_attr)
    owner.register_parameter(b_attr, _new_param(f.bias, w_like))
    with gm.graph.inserting_before(node):
        ref = gm.graph.get_attr(f"{owner_name}.{b_attr}" if owner_name else b_attr)
    _set_arg(node, BIAS_POS, "bias", ref)


def apply_folds(gm: fx.GraphModule, plan: TorchPlan, *, private: bool) -> None:
    """Carry out every fold of ``plan`` on ``gm`` (in plan order). ``private``: a producer that
    only this call uses may be changed in place (else it is copied first, leaving the module that
    was traced as it was)."""
    for d in plan.plan.decisions:
        if d.action is not Action.FOLDED:
            continue
        for f in plan.folds[d.bn]:
            if f.producer.module is not None:
                _apply_module(gm, f, private)
            else:
                _apply_functional(gm, f)
            if f.keep_act:  # a BatchNormAct2d: the BN part is in the producer, its drop and act stay
                _, owner, attr = _owner(gm, target_of(f.bn_node))
                bn = getattr(owner, attr)
                if not isinstance(bn, ActPart):
                    setattr(owner, attr, ActPart(bn.drop, bn.act))
                continue
            f.bn_node.replace_all_uses_with(f.producer.node)
            gm.graph.erase_node(f.bn_node)
