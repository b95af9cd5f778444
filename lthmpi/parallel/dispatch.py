"""The dynamic schedule: rank 0 hands ready tasks out on request, critical path first, to whichever worker asks.

Rank 0 answers requests from a thread of its own (where the MPI library allows threads), so a worker that
finishes a task gets its next one at once instead of waiting for rank 0's training block; rank 0 trains too.
"""
from __future__ import annotations

import threading
import time

from .phases import run_one

TAG_REQUEST, TAG_TASK = 11, 12
POLL_S = 0.01  # sleep between polls of a message or a thread

WAIT = "wait"  # no task is ready yet, but some are still to come


class Dispatcher:
    """Rank 0's book of the dynamic schedule: which tasks are done, running, still to hand out. Thread-safe."""

    def __init__(self, graph, todo, done):
        self.graph, self.lock = graph, threading.Lock()
        self.done, self.running, self.left = set(done), set(), {t.id for t in todo}

    def take(self):
        """The ready task of highest priority (and mark it running), WAIT, or None when all are handed out."""
        with self.lock:
            if not self.left:
                return None
            ready = self.graph.ready(self.done, self.running)
            ready = [t for t in ready if t.id in self.left]
            if not ready:
                return WAIT
            t = ready[0]
            self.left.discard(t.id)
            self.running.add(t.id)
            return t

    def finished(self, task_id: str | None):
        if task_id is not None:
            with self.lock:
                self.running.discard(task_id)
                self.done.add(task_id)


class Server:
    """Rank 0 answers the other workers' requests: each request says which task the worker finished; the
    answer is its next task, or None (stop). A request that finds no ready task waits until one is."""

    def __init__(self, comm, dispatcher: Dispatcher, workers: list[int]):
        self.comm, self.dispatcher = comm, dispatcher
        self.waiting: list[int] = []
        self.active = set(workers)
        self.thread = None
        self.error: BaseException | None = None

    def serve(self):
        """Answer what has arrived; never blocks."""
        while True:
            got = self.comm.poll(TAG_REQUEST)
            if got is None:
                break
            src, finished = got
            self.dispatcher.finished(finished)
            self.waiting.append(src)
        still = []
        for src in self.waiting:
            task = self.dispatcher.take()
            if task is WAIT:
                still.append(src)
                continue
            self.comm.send(task, dest=src, tag=TAG_TASK)
            if task is None:
                self.active.discard(src)
        self.waiting = still

    @property
    def over(self) -> bool:
        return not self.active

    def start_thread(self):
        def loop():
            try:
                while not self.over:
                    self.serve()
                    time.sleep(POLL_S)
            except BaseException as e:  # noqa: BLE001 - the main thread re-raises it
                self.error = e

        self.thread = threading.Thread(target=loop, name="lthmpi-dispatch", daemon=True)
        self.thread.start()

    def check(self):
        if self.error is not None:
            raise self.error


def run_dynamic(exp, comm, layout, graph, todo, done, poll) -> list:
    """Ready tasks, critical path first, to whichever worker asks; a subgroup asks via its leader."""
    records = []
    group, rank = layout.group, comm.rank
    if rank == 0:
        dispatcher = Dispatcher(graph, todo, done)
        server = Server(comm, dispatcher, [r for r in layout.leaders if r != 0])
        threaded = comm.size > 1 and comm.threads_ok()
        if threaded:
            server.start_thread()

        def between():  # after each training block of rank 0's own tasks
            if threaded:
                server.check()
            else:
                server.serve()
            if poll:
                poll()

        while True:
            task = dispatcher.take()
            while task is WAIT:
                between()
                time.sleep(POLL_S)
                task = dispatcher.take()
            if group.size > 1:
                task = group.bcast(task, root=0)
            if task is None:
                break
            records.append(run_one(exp, task, layout.is_leader, between))
            dispatcher.finished(task.id)
        while not server.over:
            between()
            time.sleep(POLL_S)
        if threaded:
            server.thread.join()
            server.check()
        return records
    finished = None
    while True:
        task = None
        if layout.is_leader:
            comm.send(finished, dest=0, tag=TAG_REQUEST)
            task = comm.recv(0, TAG_TASK)
        if group.size > 1:
            task = group.bcast(task, root=0)
        if task is None:
            return records
        records.append(run_one(exp, task, layout.is_leader, None))
        finished = task.id
