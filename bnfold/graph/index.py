"""The graph index: producers, consumers, initializers, built once per graph in linear time.

Every pass reads it instead of scanning the graph; the mutators below keep it current.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, MutableSequence
from itertools import chain
from typing import Any

import onnx


def subgraph_free_names(node: onnx.NodeProto) -> set[str]:
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
                free.update(x for x in subgraph_free_names(n) if x not in defined)
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


def _delete_positions(field: MutableSequence[Any], positions: Iterable[int]) -> None:
    """Delete the given positions of a repeated protobuf field, in runs, from the back."""
    runs: list[list[int]] = []
    for i in sorted(set(positions)):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    for a, b in reversed(runs):
        del field[a:b]


def unlist_old_ir_constants(model: onnx.ModelProto) -> bool:
    """Take the initializers of an IR < 4 model out of ``graph.input`` (in place); returns
    whether any was listed.

    IR < 4 lists every initializer as an input and means constants (onnxruntime refuses a feed for
    one: "Invalid input name"). bnfold writes IR >= 4, where a listed initializer is an overridable
    default: unlisted, the constants stay constants (for planning too), and no folded weight is
    left under an input name a caller could feed. onnxruntime runs an IR 3 model without them.
    """
    if not 0 < model.ir_version < 4:
        return False
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    listed = [i for i, v in enumerate(graph.input) if v.name in inits]
    _delete_positions(graph.input, listed)
    return bool(listed)


#: operators whose output is a matrix (rank 2) whatever their inputs (the ONNX spec)
_MATRIX_OPS = frozenset({"Flatten", "Gemm"})


class GraphIndex:
    """Producers and consumers of every tensor name in one graph.

    ``use_count(name)`` counts the input slots that read ``name`` (a node whose subgraph reads it
    from the outer scope counts too) and graph outputs; ``consumer_nodes(name)`` lists the reading
    nodes. ``ins[pos]`` and ``outs[pos]`` are the node's input and output names as Python lists
    (read-only for callers: reading a protobuf field costs far more, and the mutators below keep
    them in step with the nodes).
    """

    def __init__(self, graph: onnx.GraphProto, opset: int) -> None:
        self.graph = graph
        self.opset = opset
        nodes = self.nodes = list(graph.node)
        self.removed: set[int] = set()
        # comprehensions and a Counter: one pass of C loops over names already read, where a loop
        # of dict updates per node would cost most of the index's time
        self.ins: list[list[str]] = [n.input[:] for n in nodes]
        self.outs: list[list[str]] = [n.output[:] for n in nodes]
        self.producer: dict[str, int] = {o: i for i, outs in enumerate(self.outs) for o in outs}
        self._readers: Counter[str] = Counter(chain.from_iterable(self.ins))
        self._consumers: dict[str, list[int]] | None = None  # reading positions, built on first use
        self._subgraph_reads: dict[int, set[str]] = {}  # node position -> outer names its subgraphs read
        # standard BatchNormalization nodes, in node order
        self.bn_positions: list[int] = []
        for i, (op, domain) in enumerate(zip([n.op_type for n in nodes], [n.domain for n in nodes])):
            if domain in _STD and op not in _CONTROL_FLOW:
                if op == "BatchNormalization":
                    self.bn_positions.append(i)
                continue
            if has_subgraph(nodes[i]):
                free = subgraph_free_names(nodes[i])
                self._subgraph_reads[i] = free
                self._readers.update(free)
        self.producer.pop("", None)
        self._readers.pop("", None)
        inits = list(graph.initializer)
        init_names = [t.name for t in inits]
        self.initializers: dict[str, onnx.TensorProto] = dict(zip(init_names, inits))
        # position in graph.initializer, for ``commit``
        self._init_pos: dict[str, int] = dict(zip(init_names, range(len(init_names))))
        self.graph_outputs: set[str] = {o.name for o in graph.output}
        graph_input_names = [i.name for i in graph.input]
        self.graph_inputs: set[str] = set(graph_input_names).difference(self.initializers)
        # initializers listed among the inputs: defaults a caller may replace (IR >= 4; an IR < 4
        # model's listed constants are unlisted at load, ``unlist_old_ir_constants``)
        self.overridable: frozenset[str] = frozenset(self.initializers.keys() & set(graph_input_names))
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

        ``remove_node`` takes a removed node's reads off the counts, so they count live readers only.
        """
        return self._readers.get(name, 0) + (name in self.graph_outputs)

    def readers(self, name: str) -> int:
        """How many input slots and subgraph references read ``name`` (graph outputs not counted)."""
        return self._readers.get(name, 0)

    def consumer_nodes(self, name: str) -> list[int]:
        """Positions of the live nodes that read ``name``, in node order, once per reading slot."""
        if self._consumers is None:
            lists: dict[str, list[int]] = defaultdict(list)
            reads = self._subgraph_reads
            for i, ins in enumerate(self.ins):
                if i in self.removed:
                    continue
                for x in ins:
                    if x:
                        lists[x].append(i)
                for x in reads.get(i, ()):
                    lists[x].append(i)
            self._consumers = lists
        return sorted(self._consumers.get(name, ()))  # mutations append: back into node order

    def _add_reader(self, name: str, pos: int) -> None:
        self._readers[name] += 1
        if self._consumers is not None:
            self._consumers[name].append(pos)

    def _drop_reader(self, name: str, pos: int) -> None:
        self._readers[name] -= 1
        if self._consumers is not None:
            self._consumers[name].remove(pos)

    def rank(self, name: str) -> int | None:
        """The rank of tensor ``name`` from its value_info, else from the operator that writes it
        where that fixes it (Flatten and Gemm always write a matrix), else None."""
        vi = self.value_info.get(name)
        tt = vi.type.tensor_type if vi is not None and vi.type.HasField("tensor_type") else None
        if tt is not None and tt.HasField("shape"):
            return len(tt.shape.dim)
        node = self.node_of(name)
        if node is not None and node.domain in ("", "ai.onnx") and node.op_type in _MATRIX_OPS:
            return 2
        return None

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
        ins = self.ins[pos]
        old = ins[slot] if slot < len(ins) else ""
        if old:
            self._drop_reader(old, pos)
        while len(ins) <= slot:
            node.input.append("")
            ins.append("")
        node.input[slot] = name
        ins[slot] = name
        if name:
            self._add_reader(name, pos)

    def set_output(self, pos: int, slot: int, name: str) -> None:
        node = self.nodes[pos]
        outs = self.outs[pos]
        old = outs[slot]
        if self.producer.get(old) == pos:
            del self.producer[old]
            self._orphaned.add(old)
        node.output[slot] = name
        outs[slot] = name
        self.producer[name] = pos
        if self._names_cache is not None:
            self._names_cache.add(name)

    def add_initializer(self, tensor: onnx.TensorProto) -> None:
        self.new_initializers.append(tensor)
        self.initializers[tensor.name] = tensor
        if self._names_cache is not None:
            self._names_cache.add(tensor.name)

    def drop_outputs(self, pos: int, keep: int) -> list[str]:
        """Cut the node's outputs to the first ``keep``; returns the names cut (which keep no
        producer: a caller that still needs one gives it another)."""
        outs = self.outs[pos]
        cut = outs[keep:]
        del self.nodes[pos].output[keep:]
        del outs[keep:]
        for name in cut:
            if name and self.producer.get(name) == pos:
                del self.producer[name]
                self._orphaned.add(name)
        return cut

    def remove_node(self, pos: int) -> list[str]:
        """Drop the node at ``pos``; returns its inputs."""
        inputs = list(self.ins[pos])
        if pos in self.removed:
            return inputs
        self.removed.add(pos)
        # one reader per reading slot (and per name a subgraph reads): drop one per occurrence
        for inp in inputs:
            if inp:
                self._drop_reader(inp, pos)
        for inp in self._subgraph_reads.pop(pos, ()):
            self._drop_reader(inp, pos)
        producer = self.producer
        for out in self.outs[pos]:
            if producer.get(out) == pos:
                del producer[out]
                self._orphaned.add(out)
        return inputs

    def insert_node(self, before: int, node: onnx.NodeProto) -> int:
        """Queue ``node`` to be placed just before position ``before``; returns its position."""
        pos = len(self.nodes)
        self.nodes.append(node)
        self.ins.append(node.input[:])
        self.outs.append(node.output[:])
        self.new_nodes.append((before, pos))
        if node.op_type == "BatchNormalization" and node.domain in _STD:
            self.bn_positions.append(pos)
        for inp in self.ins[pos]:
            if inp:
                self._add_reader(inp, pos)
        for out in self.outs[pos]:
            if out:
                self.producer[out] = pos
                if self._names_cache is not None:
                    self._names_cache.add(out)
        if node.name:
            if self._node_names_cache is not None:
                self._node_names_cache.add(node.name)
        return pos

    def drop_if_unused(self, name: str) -> None:
        """Remove an initializer nobody reads any more (not a graph input or output: an
        overridable default stays in the interface, unread)."""
        if name in self.initializers and self.use_count(name) == 0 and name not in self.graph_outputs \
                and name not in self.overridable:
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
            if any(self.use_count(o) for o in self.outs[pos] if o):
                continue
            self.remove_node(pos)
            stack.extend(i for i in self.ins[pos] if i)

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
        dropped = self.dropped_initializers - self.overridable  # an input's default stays with it
        if dropped:
            _delete_positions(g.initializer, [self._init_pos[n] for n in dropped if n in self._init_pos])
            dead_in = [i for i, v in enumerate(g.input) if v.name in dropped]
            _delete_positions(g.input, dead_in)
        if self.new_initializers:
            g.initializer.extend(self.new_initializers)
        # positions changed: a caller that goes on using the graph builds a new index
        self._spent = True
