"""Vectorized emission: one line per matrix operation, batched matmuls, the softmax in place where its input
is dead (``emit.EmitXP`` writes the lines, ``emit.optimise`` makes them in place)."""

from __future__ import annotations

from symattn.codegen.emit import EmitXP, Var, needed, optimise
from symattn.codegen.gradients import gradient_lines, gradient_steps, input_gradients
from symattn.codegen.sources import Sources

_LOWER = ("Q", "K", "V", "M", "dM")  # steps whose variables are their names in lower case (q1, m, dm)


class Vectorized:
    """The functions of a vectorized module."""

    strategy = "vectorized"

    def __init__(self, layout):
        self.layout = layout
        self.sources = Sources(layout)
        self.gradients = input_gradients(layout.graph) if layout.grad else []

    def function(self, kind: str) -> list[str]:
        """The lines of ``forward``, ``intermediates`` or ``backward``."""
        layout, graph, sources = self.layout, self.layout.graph, self.sources
        leaves = {}
        for name, matrix in graph.leaves.items():
            text, batched = sources.leaf(name)
            leaves[name] = Var(text, matrix.shape, batched, temporary=False)
        xp = EmitXP(
            leaves,
            {name: sources.param(p) for name, (p, _) in layout.roles.params.items()},
            {
                name: Var(sources.const(c), c.value.shape, False, temporary=False)
                for name, (c, _) in layout.roles.consts.items()
            },
        )
        backward = kind == "backward" or (kind == "intermediates" and layout.grad)
        if kind == "forward":  # the outputs' nodes alone (no line of a step nothing reads, such as lse)
            need = graph.needed(graph.outputs)
            values = graph.forward(xp, [n.name for n in graph.nodes if n.name in need])
        else:
            values = graph.forward(xp, keep=[n.name for n in graph.nodes] if backward else None)
        grads = {}
        if backward:
            douts = {}
            for k, name in enumerate(graph.outputs):
                douts[name] = Var(sources.dout(k), graph.step(name).shape, True, temporary=False)
            grads = graph.backward(xp, values, douts)
        if kind == "forward":
            returned = [values[name] for name in graph.outputs]
        elif kind == "intermediates":
            returned = [values[s.name] for s in graph.steps] + [grads[s.name] for s in graph.backward_steps if backward]
        else:
            returned = [grads[name] for name in gradient_steps(self.gradients)]
        lines, storage = xp.program.lines, {}
        if kind == "forward":  # in place where a value is dead
            lines, storage = optimise(lines, {id(v) for v in returned})
        lines = needed(lines, [storage.get(id(v), v) for v in returned])
        _name_vars(graph, values, grads, storage)

        def name(v):
            return storage.get(id(v), v).name

        result = layout.result()
        out = [f"def {kind}({layout.signature(kind)}):", layout.docstring(kind), *layout.prologue(kind)]
        # intermediates(..., dout=None) runs the forward lines only: the backward ones (those the forward steps
        # do not need) go under ``if dout is not None``
        first = {id(line) for line in needed(lines, [values[s.name] for s in graph.steps])} if backward else None
        later = []
        for line in lines:
            for helper in line.helpers:
                layout.helpers.call(helper)
            if kind == "intermediates" and first is not None and id(line) not in first:
                later.append("    " + line.text())
            else:
                out.append(line.text())
        if kind == "forward":
            if layout.kernel:
                out.append(f"return {result}(numpy.stack([{', '.join(name(v) for v in returned)}], axis=-3), dtype)")
            else:
                out.append(f"return {result}({name(returned[0])}, dtype)")
        elif kind == "intermediates":
            out.append("steps = {" + ", ".join(f"{s.name!r}: {name(values[s.name])}" for s in graph.steps) + "}")
            if backward:
                out += ["if dout is not None:", *later]
                entries = ", ".join(f"{s.name!r}: {name(grads[s.name])}" for s in graph.backward_steps)
                out.append("    steps.update({" + entries + "})")
            out.append(f"return {{name: {result}(value, dtype) for name, value in steps.items()}}")
        else:
            text = {step: name(grads[step]) for step in gradient_steps(self.gradients)}
            out += gradient_lines(self.gradients, text, layout.helpers)
        return out

    def constants(self) -> list[str]:
        return [f"{name} = {text}" for name, text in self.sources.constants.items()]


def _name_vars(graph, values, grads, storage) -> None:
    """Give the variables that hold steps their steps' names (the first step a variable holds names it)."""
    named = set()
    for step in graph.steps + graph.backward_steps:
        value = values.get(step.name, grads.get(step.name))
        if not isinstance(value, Var):
            continue
        holder = storage.get(id(value), value)
        if holder.temporary and id(holder) not in named:
            holder.name = step.name.lower() if step.kind in _LOWER else step.name
            named.add(id(holder))
