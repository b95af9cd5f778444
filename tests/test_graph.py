"""The task graph (pure): ready set, critical-path-first priority, cycles and bad ids named, schedulers on a
graph; and the house: no import circles in lthmpi/, mpi4py imported in one module only."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lthmpi.parallel.graph import Graph, GraphError, Task
from lthmpi.parallel.scheduling import assign_lpt, assign_static, list_schedule, plan

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


def _imports(path: Path, modules: set[str]) -> set[str]:
    """lthmpi modules that `path` imports (absolute or relative), at any depth of the file. `from P import m`
    of a submodule m is an import of P.m (P's __init__ is running or has run by then)."""
    base = list(path.relative_to(ROOT).with_suffix("").parts[:-1])  # the package the file is in
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = {f"{mod}.{a.name}" for a in node.names}
            out |= subs if subs <= modules else {mod}
    return {m for m in out if m in modules}


def test_no_import_circles_in_lthmpi():
    """Every import, also those inside functions, between lthmpi's modules: the graph has no cycle."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "lthmpi").rglob("*.py")}
    edges = {m: sorted(_imports(p, set(files)) - {m}) for m, p in files.items()}
    assert "lthmpi.errors" in edges["lthmpi.main"] and "lthmpi.parallel.coordinator" in edges["lthmpi.main"]
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
    assert users == ["lthmpi/parallel/mpi.py"]


@pytest.mark.parametrize("scheduler", ["static", "lpt", "dynamic"])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_graph_replay_without_edges_is_the_flat_replay(scheduler, n):
    from lthmpi.parallel.scheduling import simulate, simulate_graph

    durations = [3.0, 7.0, 2.0, 7.0, 5.0, 1.0, 4.0, 2.5]
    groups = [0, 0, 1, 1, 2, 2, 3, 3]
    flat = simulate(scheduler, durations, n, 0.25, groups=groups)
    g = simulate_graph(scheduler, durations, [()] * len(durations), n, 0.25, groups=groups)
    assert g.per_rank == flat.per_rank and g.makespan == flat.makespan
    assert g.extra["critical_path"] == 7.0


@pytest.mark.parametrize("scheduler", ["static", "lpt", "dynamic"])
def test_graph_replay_respects_dependencies_and_the_critical_path(scheduler):
    from lthmpi.parallel.scheduling import simulate_graph

    # a chain 0 -> 1 -> 2 (4 s each) and six 1-s leaves, two of them off the chain's first task
    durations = [4.0, 4.0, 4.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    deps = [(), (0,), (1,), (0,), (0,), (), (), (), ()]
    for n in (1, 2, 3, 9):
        s = simulate_graph(scheduler, durations, deps, n)
        runs = {i: (a, b) for lst in s.per_rank for i, a, b in lst}
        assert sorted(runs) == list(range(9))
        for i, ds in enumerate(deps):
            assert all(runs[d][1] <= runs[i][0] + 1e-12 for d in ds), (n, i)
        assert s.extra["critical_path"] == 12.0 and s.makespan >= 12.0
        assert s.makespan >= sum(durations) / n - 1e-9
    assert simulate_graph("dynamic", durations, deps, 3).makespan == 12.0  # the chain first: nothing waits


class FakeComm:
    """Rank 0's side of the request/answer protocol, in one process: requests are queued, answers recorded."""

    def __init__(self):
        import queue

        self.requests, self.answers = queue.Queue(), queue.Queue()

    def poll(self, tag):
        import queue

        try:
            return self.requests.get_nowait()
        except queue.Empty:
            return None

    def send(self, obj, dest, tag):
        self.answers.put((dest, obj))


def test_dispatcher_hands_out_ready_tasks_only_and_says_stop_at_the_end():
    from lthmpi.parallel.dispatch import WAIT, Dispatcher

    g = diamond()
    d = Dispatcher(g, g.tasks, done=set())
    assert d.take().id == "a" and d.take().id == "e"
    assert d.take() is WAIT, "b and c wait for a"
    d.finished("a")
    assert [d.take().id, d.take().id] == ["b", "c"]
    assert d.take() is WAIT
    d.finished("b")
    assert d.take() is WAIT, "d waits for c too"
    d.finished("c")
    assert d.take().id == "d"
    assert d.take() is None, "all handed out: stop"
    resumed = Dispatcher(g, [t for t in g.tasks if t.id in ("d", "e")], done={"a", "b", "c"})
    assert [resumed.take().id, resumed.take().id, resumed.take()] == ["e", "d", None]


def test_rank_0_answers_requests_while_its_own_task_runs():
    """The serving thread answers a worker at once although rank 0's main thread is busy (blocked here),
    and keeps a request that finds no ready task until one is ready."""
    import threading

    from lthmpi.parallel.dispatch import Dispatcher, Server

    g = diamond()
    d = Dispatcher(g, g.tasks, done=set())
    comm = FakeComm()
    server = Server(comm, d, workers=[1, 2])
    busy = threading.Event()  # rank 0's "training": its main thread does nothing until released
    own = d.take()  # rank 0 trains `a`
    server.start_thread()
    try:
        comm.requests.put((1, None))
        assert comm.answers.get(timeout=30) == (1, g.by_id["e"])
        comm.requests.put((2, None))  # nothing ready: b and c need a, still training on rank 0
        comm.requests.put((1, "e"))
        assert not busy.wait(0.5) and comm.answers.empty()
        d.finished(own.id)  # rank 0's task ends: the waiting workers get b and c
        got = {comm.answers.get(timeout=30), comm.answers.get(timeout=30)}
        assert {src for src, _ in got} == {1, 2} and {t.id for _, t in got} == {"b", "c"}
        d.finished("b")
        comm.requests.put((2, "c"))
        assert comm.answers.get(timeout=30) == (2, g.by_id["d"])
        comm.requests.put((1, "b"))
        comm.requests.put((2, "d"))
        assert {comm.answers.get(timeout=30), comm.answers.get(timeout=30)} == {(1, None), (2, None)}
        server.thread.join(timeout=30)
        assert server.over and not server.thread.is_alive()
        server.check()
    finally:
        busy.set()


def test_early_tasks_need_only_a_checkpoint_and_come_by_checkpoint_then_priority():
    """Graph.early(): the tasks idle ranks may train while the parent trains (issue 33)."""
    g = Graph([Task("grid", "k", cost=9), Task("a10", "k", cost=1, checkpoint=10), Task("b0", "k", cost=1, checkpoint=0),
               Task("c10", "k", cost=5, checkpoint=10), Task("d0", "k", deps=("b0",), checkpoint=0)])
    assert [t.id for t in g.early()] == ["b0", "c10", "a10"]  # d0 has a dependency: not early
    assert Graph([Task("grid", "k")]).early() == []
