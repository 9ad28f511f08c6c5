"""The graph index: producers, consumers, initializers, built once per graph in linear time.

Every pass reads it instead of scanning the graph; the mutators below keep it current.
"""
from __future__ import annotations

from collections import defaultdict

import onnx


def _subgraph_free_names(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing scope."""
    free: set[str] = set()
    for attr in node.attribute:
        graphs = []
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs = [attr.g]
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs = list(attr.graphs)
        for g in graphs:
            defined = {i.name for i in g.input} | {t.name for t in g.initializer}
            defined |= {t.name for t in g.sparse_initializer}
            for n in g.node:
                defined.update(o for o in n.output if o)
            for n in g.node:
                free.update(i for i in n.input if i and i not in defined)
                free.update(x for x in _subgraph_free_names(n) if x not in defined)
            free.update(o.name for o in g.output if o.name not in defined)
    return free


# Standard operators that carry subgraphs; other domains may too, so they are checked as well.
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})
_STD = ("", "ai.onnx")


def has_subgraph(node: onnx.NodeProto) -> bool:
    if node.op_type not in _CONTROL_FLOW and node.domain in ("", "ai.onnx"):
        return False
    return any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
    )


def _delete_positions(field, positions) -> None:
    """Delete the given positions of a repeated protobuf field, in runs, from the back."""
    runs: list[list[int]] = []
    for i in sorted(set(positions)):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    for a, b in reversed(runs):
        del field[a:b]


class GraphIndex:
    """Producers and consumers of every tensor name in one graph.

    ``consumers[name]`` lists node positions, once per input slot that reads ``name``; a node whose
    subgraph reads ``name`` from the outer scope counts as a consumer too. Graph outputs are kept
    separately in ``graph_outputs``.
    """

    def __init__(self, graph: onnx.GraphProto, opset: int) -> None:
        self.graph = graph
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.removed: set[int] = set()
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        producer, consumers = self.producer, self.consumers
        self._subgraph_reads: dict[int, set[str]] = {}  # node position -> outer names its subgraphs read
        self.bn_positions: list[int] = []  # standard BatchNormalization nodes, in node order
        for i, node in enumerate(self.nodes):
            for out in node.output:
                producer[out] = i
            for inp in node.input:
                consumers[inp].append(i)
            op = node.op_type
            if op == "BatchNormalization" and node.domain in _STD:
                self.bn_positions.append(i)
            elif (op in _CONTROL_FLOW or node.domain not in _STD) and has_subgraph(node):
                free = _subgraph_free_names(node)
                self._subgraph_reads[i] = free
                for name in free:
                    consumers[name].append(i)
        producer.pop("", None)
        consumers.pop("", None)
        self.initializers: dict[str, onnx.TensorProto] = {}
        self._init_pos: dict[str, int] = {}  # position in graph.initializer, for ``commit``
        for k, t in enumerate(graph.initializer):
            self.initializers[t.name] = t
            self._init_pos[t.name] = k
        self.graph_outputs: set[str] = {o.name for o in graph.output}
        graph_input_names = [i.name for i in graph.input]
        self.graph_inputs: set[str] = set(graph_input_names).difference(self.initializers)
        self.value_info: dict[str, onnx.ValueInfoProto] = {}
        for group in (graph.input, graph.output):
            for vi in group:
                self.value_info.setdefault(vi.name, vi)
        self._vi_pos: dict[str, list[int]] = defaultdict(list)  # positions in graph.value_info
        for k, vi in enumerate(graph.value_info):
            self.value_info.setdefault(vi.name, vi)
            self._vi_pos[vi.name].append(k)
        self._orphaned: set[str] = set()  # names that lost their producer (their value_info may go)
        self._spent = False
        self._graph_input_names = graph_input_names
        self._names_cache: set[str] | None = None  # every tensor name; built on first use
        self._node_names_cache: set[str] | None = None
        self.new_initializers: list[onnx.TensorProto] = []
        self.dropped_initializers: set[str] = set()
        self.new_nodes: list[tuple[int, int]] = []  # (insert before position, position of new node)

    @property
    def subgraph_positions(self) -> list[int]:
        """Positions of the live nodes that carry subgraphs, in node order."""
        return sorted(self._subgraph_reads)

    # ---- queries -------------------------------------------------------------------------
    def node_of(self, name: str) -> onnx.NodeProto | None:
        i = self.producer.get(name)
        return None if i is None or i in self.removed else self.nodes[i]

    def use_count(self, name: str) -> int:
        """How many readers ``name`` has: node input slots, subgraph references, graph outputs.

        ``remove_node`` takes a removed node out of every list, so the lists hold live readers only.
        """
        readers = self.consumers.get(name)
        return (len(readers) if readers else 0) + (name in self.graph_outputs)

    def consumer_nodes(self, name: str) -> list[int]:
        return list(self.consumers.get(name, ()))

    def rank(self, name: str) -> int | None:
        vi = self.value_info.get(name)
        if vi is None or not vi.type.HasField("tensor_type"):
            return None
        tt = vi.type.tensor_type
        return len(tt.shape.dim) if tt.HasField("shape") else None

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        vi = self.value_info.get(name)
        if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            return None
        return tuple(d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim)

    def elem_type(self, name: str) -> int | None:
        if name in self.initializers:
            return self.initializers[name].data_type
        vi = self.value_info.get(name)
        if vi is not None and vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            return vi.type.tensor_type.elem_type
        return None

    # ---- naming --------------------------------------------------------------------------
    @property
    def _names(self) -> set[str]:
        if self._names_cache is None:
            # every name the graph had or has: removed tensors' names are not handed out again
            names = set(self.producer)
            names.update(self.initializers, self._graph_input_names, self.graph_outputs, self._orphaned,
                         self.value_info)
            self._names_cache = names
        return self._names_cache

    @property
    def _node_names(self) -> set[str]:
        if self._node_names_cache is None:
            names = {n.name for n in self.nodes}
            names.discard("")
            self._node_names_cache = names
        return self._node_names_cache

    def fresh_name(self, base: str) -> str:
        name, k = base, 1
        names = self._names
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.add(name)
        return name

    def fresh_node_name(self, base: str) -> str:
        name, k = base, 1
        while name in self._node_names:
            name, k = f"{base}_{k}", k + 1
        self._node_names.add(name)
        return name

    # ---- mutation (recorded; ``commit`` writes it into the GraphProto once) ---------------
    def set_input(self, pos: int, slot: int, name: str) -> None:
        node = self.nodes[pos]
        old = node.input[slot] if slot < len(node.input) else ""
        if old:
            lst = self.consumers[old]
            lst.remove(pos)
        while len(node.input) <= slot:
            node.input.append("")
        node.input[slot] = name
        if name:
            self.consumers[name].append(pos)

    def set_output(self, pos: int, slot: int, name: str) -> None:
        node = self.nodes[pos]
        old = node.output[slot]
        if self.producer.get(old) == pos:
            del self.producer[old]
            self._orphaned.add(old)
        node.output[slot] = name
        self.producer[name] = pos
        if self._names_cache is not None:
            self._names_cache.add(name)

    def add_initializer(self, tensor: onnx.TensorProto) -> None:
        self.new_initializers.append(tensor)
        self.initializers[tensor.name] = tensor
        if self._names_cache is not None:
            self._names_cache.add(tensor.name)

    def remove_node(self, pos: int) -> list[str]:
        """Drop the node at ``pos``; returns its inputs."""
        node = self.nodes[pos]
        self.removed.add(pos)
        consumers = self.consumers
        inputs = list(node.input)
        # one list entry per reading slot (and per name a subgraph reads): drop one per occurrence
        for inp in inputs:
            readers = consumers.get(inp)
            if readers and pos in readers:
                readers.remove(pos)
        if pos in self._subgraph_reads:
            for inp in self._subgraph_reads.pop(pos):
                readers = consumers.get(inp)
                if readers and pos in readers:
                    readers.remove(pos)
        producer = self.producer
        for out in node.output:
            if producer.get(out) == pos:
                del producer[out]
                self._orphaned.add(out)
        return inputs

    def insert_node(self, before: int, node: onnx.NodeProto) -> int:
        """Queue ``node`` to be placed just before position ``before``; returns its position."""
        pos = len(self.nodes)
        self.nodes.append(node)
        self.new_nodes.append((before, pos))
        if node.op_type == "BatchNormalization" and node.domain in _STD:
            self.bn_positions.append(pos)
        for inp in node.input:
            if inp:
                self.consumers[inp].append(pos)
        for out in node.output:
            if out:
                self.producer[out] = pos
                if self._names_cache is not None:
                    self._names_cache.add(out)
        if node.name:
            if self._node_names_cache is not None:
                self._node_names_cache.add(node.name)
        return pos

    def drop_if_unused(self, name: str) -> None:
        """Remove an initializer nobody reads any more (not a graph input or output)."""
        if name in self.initializers and self.use_count(name) == 0 and name not in self.graph_outputs:
            self.dropped_initializers.add(name)

    def remove_dead_producers(self, name: str, limit: int = 64) -> None:
        """Remove the chain of side-effect-free nodes that only fed ``name`` (now unread)."""
        stack, steps = [name], 0
        while stack and steps < limit:
            cur = stack.pop()
            steps += 1
            if self.use_count(cur) != 0:
                continue
            if cur in self.initializers:
                self.drop_if_unused(cur)
                continue
            pos = self.producer.get(cur)
            if pos is None or pos in self.removed:
                continue
            node = self.nodes[pos]
            if has_subgraph(node) or node.domain not in ("", "ai.onnx"):
                continue
            if any(self.use_count(o) for o in node.output if o):
                continue
            self.remove_node(pos)
            stack.extend(i for i in node.input if i)

    def commit(self) -> None:
        """Write the recorded changes into the GraphProto (one linear pass). The index is spent
        afterwards: positions have changed, so build a new one to go on."""
        if self._spent:
            raise RuntimeError("this GraphIndex was committed already; build a new one")
        g = self.graph
        inserts: dict[int, list[onnx.NodeProto]] = defaultdict(list)
        for before, pos in self.new_nodes:
            if pos not in self.removed:
                inserts[before].append(self.nodes[pos])
        n_orig = len(self.nodes) - len(self.new_nodes)
        if self.new_nodes:
            ordered: list[onnx.NodeProto] = []
            for i in range(n_orig):
                ordered.extend(inserts.get(i, ()))
                if i not in self.removed:
                    ordered.append(self.nodes[i])
            ordered.extend(inserts.get(n_orig, ()))
            del g.node[:]
            g.node.extend(ordered)
        elif self.removed:  # deleting in place is cheaper than copying every kept node
            _delete_positions(g.node, self.removed)
        stale = [k for name in self._orphaned if name not in self.producer and name not in self.graph_inputs
                 for k in self._vi_pos.get(name, ())]
        _delete_positions(g.value_info, stale)
        if self.dropped_initializers:
            _delete_positions(g.initializer, [self._init_pos[n] for n in self.dropped_initializers
                                              if n in self._init_pos])
            dead_in = [i for i, v in enumerate(g.input) if v.name in self.dropped_initializers]
            _delete_positions(g.input, dead_in)
        if self.new_initializers:
            g.initializer.extend(self.new_initializers)
        # positions changed: a caller that goes on using the graph builds a new index
        self._spent = True
