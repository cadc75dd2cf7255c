"""bench/launches.py's counting, on hand-built profiler events: what counts as a kernel launch,
a compiled graph's call, a host read or host work, and which part of the step it goes to."""
from __future__ import annotations

from types import SimpleNamespace

from tests.conftest import load_bench


class Trace:
    """Events as torch.profiler's FunctionEvents show them: a name, a parent, a start."""

    def __init__(self):
        self.events, self.clock = [], 0.0

    def op(self, name: str, parent=None, *children: str):
        self.clock += 1
        e = SimpleNamespace(name=name, cpu_parent=parent, time_range=SimpleNamespace(start=self.clock))
        self.events.append(e)
        for child in children:
            self.op(child, e)
        return e


def test_launches_graph_calls_and_host_work_per_part():
    bench = load_bench("launches")
    t = Trace()
    # a compute op: one launch; views and allocations inside a dispatcher: none of their own
    t.op("aten::add")
    contiguous = t.op("aten::contiguous")
    clone = t.op("aten::clone", contiguous, "aten::empty_like")
    t.op("aten::copy_", clone)
    t.op("aten::view")
    # a multi-tensor op is one kernel on a GPU, whatever the CPU runs per tensor below it
    t.op("aten::_foreach_add_", None, "aten::add_", "aten::add_", "aten::add_")
    teacher = t.op("part:teacher_probs")
    region = t.op("Torch-Compiled Region: 0/0", teacher)
    t.op("## Call CompiledFxGraph abc ##", region, "aten::convolution", "aten::add")
    # a host draw's value read on the host is host work; a device value read is a host read
    box = t.op("part:box_mask")
    t.op("aten::randint", box)
    t.op("aten::item", box, "aten::_local_scalar_dense")
    t.op("aten::ones", box, "aten::empty", "aten::fill_")
    pseudo = t.op("part:pseudo_labels")
    t.op("aten::is_nonzero", pseudo, "aten::item")  # bool() of a device tensor
    t.op("aten::_local_scalar_dense", t.events[-1])
    host = t.op("part:host")
    t.op("aten::rand", host)
    t.op("aten::matmul", host, "aten::mm")
    t.op("part:upload")
    backward = t.op("autograd::engine::evaluate_function: torch::autograd::AccumulateGrad")
    t.op("aten::add_", backward)
    late = t.op("aten::mul")  # after the window: not counted
    counted = bench.count(t.events, 0, late.time_range.start)
    parts = counted["parts"]
    assert parts["other"] == {"launches": 3}  # add, the copy in contiguous, the foreach
    assert counted["top_ops"]["other"] == {"aten::add": 1, "aten::contiguous": 1, "aten::_foreach_add_": 1}
    assert parts["teacher_probs"] == {"graph_calls": 1}
    assert parts["box_mask"] == {"host_ops": 2, "launches": 1}
    assert parts["pseudo_labels"] == {"host_reads": 1}
    assert parts["host"] == {"host_ops": 2}  # the draw and the matrix product's innermost op
    assert parts["upload"] == {"uploads": 1} and parts["backward"] == {"launches": 1}
