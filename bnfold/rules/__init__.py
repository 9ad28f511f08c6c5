"""One rule object per producer kind: what is specific to folding a BN into that kind.

``RULES`` maps an ONNX op type to its backward rule (the BN folds into the node that produces its
input); ``FORWARD`` folds a BN into the unpadded Conv that reads its output. Both the ONNX planner
(``bnfold.stages.plan``) and the PyTorch front end (``bnfold.torch.fold``) use these objects.
"""
from __future__ import annotations

from bnfold.rules.base import BackwardRule, FoldAttrs, GraphView, Match, Refuse
from bnfold.rules.conv import CONV
from bnfold.rules.conv_transpose import CONV_TRANSPOSE
from bnfold.rules.forward_conv import FORWARD
from bnfold.rules.gemm import GEMM
from bnfold.rules.matmul import MATMUL

RULES: dict[str, BackwardRule] = {rule.op_type: rule for rule in (CONV, CONV_TRANSPOSE, GEMM, MATMUL)}

__all__ = ["CONV", "CONV_TRANSPOSE", "FORWARD", "GEMM", "MATMUL", "RULES", "BackwardRule", "FoldAttrs",
           "GraphView", "Match", "Refuse"]
