"""Reading and writing ONNX node attributes (the one copy of these helpers)."""
from __future__ import annotations

from typing import Any

import onnx
from onnx import helper


def get_attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of attribute ``name`` of ``node``, or ``default`` when it is absent."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def drop_attr(node: onnx.NodeProto, name: str) -> None:
    """Remove attribute ``name`` from ``node`` (nothing happens when it is absent)."""
    keep = [a for a in node.attribute if a.name != name]
    if len(keep) != len(node.attribute):
        del node.attribute[:]
        node.attribute.extend(keep)


def set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    """Set attribute ``name`` of ``node`` to ``value``, replacing any earlier one (appended last)."""
    keep = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(keep)
    node.attribute.append(helper.make_attribute(name, value))
