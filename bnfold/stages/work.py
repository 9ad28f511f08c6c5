"""The work that flows through the ONNX stages: the model being processed and its index.

Every stage takes a ``Work`` and returns its own result (statistics, a plan, the final plan);
a stage that edits the graph commits its edits with ``Work.commit()``. The index, constants and
BN sites are then rebuilt when a later stage first asks for them, so every stage starts from a
consistent view, no caller re-indexes by hand, and the last edit costs no index it never reads.
"""
from __future__ import annotations

import onnx

from bnfold.graph.constants import Constants
from bnfold.graph.index import GraphIndex, unlist_old_ir_constants
from bnfold.onnx.io import LoadedModel
from bnfold.stages.discover import BnSite, default_opset, find_bns, name_nodes


class Work:
    """The model being processed (``loaded.model``, edited in place) with its index."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model: onnx.ModelProto = loaded.model
        # whether node names now differ from the input's (which then cannot serve as the reference)
        self.renamed = name_nodes(self.model.graph)
        unlist_old_ir_constants(self.model)  # IR < 4: listed initializers are constants, not inputs
        self.opset = default_opset(self.model)
        self._view: tuple[GraphIndex, Constants, list[BnSite]] | None = None

    def _current(self) -> tuple[GraphIndex, Constants, list[BnSite]]:
        if self._view is None:
            index = GraphIndex(self.model.graph, self.opset)
            consts = Constants(index)
            self._view = (index, consts, find_bns(self.model, index, consts))
        return self._view

    @property
    def index(self) -> GraphIndex:
        """Producers, readers and initializers of the graph; edits are recorded here until ``commit``."""
        return self._current()[0]

    @property
    def consts(self) -> Constants:
        """The constant evaluator over ``index``."""
        return self._current()[1]

    @property
    def sites(self) -> list[BnSite]:
        """Every BN of the model (main graph, subgraphs and functions) with its mode."""
        return self._current()[2]

    def commit(self) -> None:
        """Write the edits recorded on the index into the graph; the next read indexes the result."""
        self.index.commit()
        self._view = None
