"""The task graph (pure): ready set, critical-path-first priority, cycles and bad ids named, schedulers on a
graph; and the house: no import circles in lthmpi/, mpi4py imported in one module only."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lthmpi.graph import Graph, GraphError, Task
from lthmpi.schedule import assign_lpt, assign_static, list_schedule, plan

ROOT = Path(__file__).resolve().parents[1]


def diamond():
    #   a(1) -> b(5) -> d(1)
    #   a    -> c(1) -> d ;  e(3) alone
    return Graph([Task("a", "t", cost=1), Task("b", "t", ("a",), 5), Task("c", "t", ("a",), 1),
                  Task("d", "t", ("b", "c"), 1), Task("e", "t", (), 3)])


def test_ready_set_and_critical_path_first():
    g = diamond()
    assert g.path == {"a": 7.0, "b": 6.0, "c": 2.0, "d": 1.0, "e": 3.0}
    assert g.critical_path() == 7.0
    assert [t.id for t in g.ready(set())] == ["a", "e"]  # a heads the longest path, though e costs more
    assert [t.id for t in g.ready({"a"})] == ["b", "e", "c"]
    assert [t.id for t in g.ready({"a"}, running={"b"})] == ["e", "c"]
    assert [t.id for t in g.ready({"a", "b"})] == ["e", "c"], "d waits for both its inputs"
    assert [t.id for t in g.ready({"a", "b", "c", "e"})] == ["d"]
    assert [t.id for t in g.topological] == ["a", "b", "c", "d", "e"]


def test_without_edges_priority_is_longest_first_then_list_order():
    g = Graph([Task(f"t{i}", "t", cost=c) for i, c in enumerate([2, 5, 2, 7])])
    assert [t.id for t in g.ready(set())] == ["t3", "t1", "t0", "t2"]
    assert g.width() == 4 and g.width({"t0"}) == 3


def test_width_counts_tasks_that_can_run_at_once():
    assert diamond().width() == 2  # {a, e}, then {b, c}, then {d}
    chain = Graph([Task("x", "t"), Task("y", "t", ("x",)), Task("z", "t", ("y",))])
    assert chain.width() == 1


@pytest.mark.parametrize("tasks, words", [
    ([Task("a", "t"), Task("a", "t")], ["two tasks have the id 'a'"]),
    ([Task("a", "t", ("zz",))], ["'a' depends on 'zz'", "not a task"]),
    ([Task("a", "t", ("c",)), Task("b", "t", ("a",)), Task("c", "t", ("b",)), Task("d", "t")],
     ["cycle through", "a -> b -> c -> a"]),
    ([Task("s", "t", ("s",))], ["cycle through s -> s"]),
])
def test_malformed_graphs_are_named(tasks, words):
    with pytest.raises(GraphError) as e:
        Graph(tasks)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_lpt_on_a_graph_without_edges_is_lpt():
    costs = [3.0, 7.0, 2.0, 7.0, 5.0, 1.0, 4.0]
    tasks = [Task(f"t{i}", "t", cost=c) for i, c in enumerate(costs)]
    g = Graph(tasks)
    for n in (1, 2, 3, 5):
        assert [[t.id for t in lst] for lst in list_schedule(g, tasks, n)] == \
               [[t.id for t in lst] for lst in assign_lpt(tasks, costs, n)]


def test_static_on_a_graph_deals_groups_in_graph_order():
    tasks = [Task(f"m{m}_r{r}", "t", cost=1, group=m) for m in range(3) for r in range(2)]
    g = Graph(tasks)
    got = plan(g, tasks, "static", 2)
    assert got == assign_static(tasks, 2, group_key=lambda t: t.group)
    assert [[t.id for t in lst] for lst in got] == [["m0_r0", "m0_r1", "m2_r0", "m2_r1"], ["m1_r0", "m1_r1"]]
    assert plan(g, tasks, "dynamic", 2) is None


@pytest.mark.parametrize("scheduler", ["static", "lpt"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_planned_lists_never_deadlock(scheduler, n):
    """Each rank runs its list in order, a task waiting for its inputs: replayed, every task runs once and
    after its inputs, whatever the number of ranks."""
    g = diamond()
    lists = [list(lst) for lst in plan(g, g.tasks, scheduler, n)]
    done, order = set(), []
    while any(lists):
        moved = False
        for lst in lists:
            if lst and all(d in done for d in lst[0].deps):
                t = lst.pop(0)
                done.add(t.id)
                order.append(t.id)
                moved = True
        assert moved, f"deadlock: {lists}"
    assert sorted(order) == sorted(g.by_id)


def test_list_schedule_starts_the_critical_path_first():
    g = diamond()
    lists = list_schedule(g, g.tasks, 2)
    assert [t.id for t in lists[0]][:2] == ["a", "b"] and lists[1][0].id == "e"


def _imports(path: Path) -> set[str]:
    """lthmpi modules that `path` imports (absolute or relative), at any depth of the file."""
    base = list(path.relative_to(ROOT).with_suffix("").parts[:-1])  # the package the file is in
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("lthmpi")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base[:len(base) - node.level + 1]
                mod = ".".join(parts + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("lthmpi"):
                out.add(mod)
                out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def test_no_import_circles_in_lthmpi():
    """Every import, also those inside functions, between lthmpi's modules: the graph has no cycle."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "lthmpi").rglob("*.py")}
    edges = {m: sorted({i for i in _imports(p) if i in files and i != m}) for m, p in files.items()}
    assert "lthmpi.errors" in edges["lthmpi.main"] and "lthmpi.coordinator" in edges["lthmpi.main"]
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in edges[m]:
            if state.get(n) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_mpi4py_is_imported_in_one_module_only():
    def imports_mpi4py(p):
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n == "mpi4py" or n.startswith("mpi4py.") for n in names):
                return True
        return False

    users = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "lthmpi").rglob("*.py") if imports_mpi4py(p))
    assert users == ["lthmpi/mpi.py"]
