"""The work that flows through the ONNX stages: the model being processed and its index.

Every stage takes a ``Work`` and returns its own result (statistics, a plan, the final plan);
a stage that edits the graph commits its edits with ``Work.commit()``, which also rebuilds the
index, constants and BN sites, so the next stage always starts from a consistent view and no
caller re-indexes by hand.
"""
from __future__ import annotations

import onnx

from bnfold.graph.constants import Constants
from bnfold.graph.index import GraphIndex
from bnfold.onnx.io import LoadedModel
from bnfold.stages.discover import BnSite, default_opset, find_bns, name_nodes


class Work:
    """The model being processed (``loaded.model``, edited in place) with its index."""

    index: GraphIndex
    consts: Constants
    sites: list[BnSite]

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model: onnx.ModelProto = loaded.model
        # whether node names now differ from the input's (which then cannot serve as the reference)
        self.renamed = name_nodes(self.model.graph)
        self.opset = default_opset(self.model)
        self._reindex()

    def _reindex(self) -> None:
        self.index = GraphIndex(self.model.graph, self.opset)
        self.consts = Constants(self.index)
        self.sites = find_bns(self.model, self.index, self.consts)

    def commit(self) -> None:
        """Write the edits recorded on the index into the graph, then index the result."""
        self.index.commit()
        self._reindex()
