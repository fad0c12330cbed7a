"""The decode worker: the one thread that owns the model while the server runs.

HTTP handlers never touch the model. They submit a Ticket (a request's generations) and receive Updates
through a callback; the worker admits queued tickets into free cache rows, steps the whole batch
(infer.decoder.BatchDecoder) and hands each ticket its new tokens after every step. The queue is bounded (a
full queue is refused at once, so an overloaded server says so instead of timing out), every ticket has a
deadline, and a ticket whose client has gone is dropped at the next step.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tinygpt.infer.decoder import BatchDecoder, Generation
from tinygpt.model import GPT


@dataclass
class Update:
    """What one step did for one generation of a ticket: its new tokens, and why it ended (or an error)."""

    index: int
    tokens: list[int]
    finish_reason: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Ticket:
    """One request's generations (its n choices, admitted together) and where their updates go."""

    generations: list[Generation]
    send: Callable[[Update], None]  # called from the worker thread; must not block
    deadline: float = float("inf")  # time.monotonic() after which the request ends with an error
    sent: list[int] = field(default_factory=list)  # tokens already sent, per generation
    ended: list[bool] = field(default_factory=list)  # whether its last update went out, per generation

    def cancel(self) -> None:
        """Stop all of this ticket's generations (safe from any thread)."""
        for g in self.generations:
            g.cancelled = True


class QueueFull(Exception):
    pass


class Engine:
    """Runs the decode loop in a daemon thread; see the module docstring."""

    def __init__(self, model: GPT, max_batch: int, queue_size: int):
        self.decoder = BatchDecoder(model, max_batch)
        self.max_batch, self.queue_size = max_batch, queue_size
        self.queue: collections.deque[Ticket] = collections.deque()
        self.running: list[Ticket] = []
        self.wake = threading.Condition()
        self.stopping = False
        self.generated = 0  # tokens made since start, for /health
        self.thread = threading.Thread(target=self._loop, name="tinygpt-decode", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout=10)

    def submit(self, ticket: Ticket) -> None:
        """Queue a ticket; raises QueueFull when it would have to wait and queue_size tickets already do."""
        ticket.sent, ticket.ended = [0] * len(ticket.generations), [False] * len(ticket.generations)
        with self.wake:
            # read racily: an estimate
            rows_left = self.decoder.free - sum(len(t.generations) for t in self.queue)
            if rows_left < len(ticket.generations) and len(self.queue) >= self.queue_size:
                raise QueueFull(f"the server is busy: {len(self.queue)} requests are already waiting; retry "
                                "later")
            self.queue.append(ticket)
            self.wake.notify()

    def load(self) -> dict[str, int]:
        return {"running": sum(len(t.generations) for t in self.running), "queued": len(self.queue),
                "max_batch": self.max_batch, "generated_tokens": self.generated}

    def _loop(self) -> None:
        failed = False  # whether the last step failed: a second failure in a row ends every request
        while True:
            with self.wake:
                while not self.stopping and not self.queue and not self.running:
                    self.wake.wait()
                if self.stopping:
                    return
                admitted = self._take_admissible()
            try:
                self.running.extend(admitted)
                new = [g for ticket in admitted for g in ticket.generations]
                if new:  # every prompt that arrived meanwhile is prefilled in one forward pass
                    self.decoder.add(new)
                self._expire()
                self.decoder.step()
            except Exception as e:  # a failed step fails the requests in flight at most, never the server
                error = f"decoding failed: {type(e).__name__}: {e}"
                self._fail_all(error) if failed else self._recover(error)
                failed = True
                continue
            failed = False
            self._publish()

    def _take_admissible(self) -> list[Ticket]:
        """Queued tickets that fit into the free rows, first come first served (a ticket never overtakes
        an earlier one that does not fit yet, so large requests are not starved). Holds self.wake."""
        now, free, admitted = time.monotonic(), self.decoder.free, []
        while self.queue:
            ticket = self.queue[0]
            if ticket.deadline < now or any(g.cancelled for g in ticket.generations):
                self.queue.popleft()
                self._end(ticket, "the request timed out while waiting in the queue" if ticket.deadline < now
                          else None)
            elif len(ticket.generations) <= free:
                free -= len(self.queue.popleft().generations)
                admitted.append(ticket)
            else:
                break
        return admitted

    def _expire(self) -> None:
        now = time.monotonic()
        for ticket in [t for t in self.running if t.deadline < now]:
            ticket.cancel()
            self.running.remove(ticket)
            self._end(ticket, "the request timed out")

    def _publish(self) -> None:
        """Send each running ticket what its generations made at this step; forget the ones that are done."""
        for ticket in list(self.running):
            for i, g in enumerate(ticket.generations):
                if ticket.ended[i]:
                    continue
                new = g.tokens[ticket.sent[i]:]
                ticket.sent[i] = len(g.tokens)
                self.generated += len(new)
                # ended by a stop, a limit, an error or a cancel
                reason = g.finish_reason or ("stop" if g.row < 0 else None)
                ticket.ended[i] = reason is not None
                if new or reason:
                    self._send(ticket, Update(i, new, reason, g.error))
            if all(ticket.ended):
                self.running.remove(ticket)

    def _end(self, ticket: Ticket, error: str | None) -> None:
        for i, g in enumerate(ticket.generations):
            if g.row >= 0:
                self.decoder.remove(g)
            if not ticket.ended[i]:
                ticket.ended[i] = True
                self._send(ticket, Update(i, [], "stop", error))

    def _recover(self, error: str) -> None:
        """After a failed step the decoder's state is unknown. A request's own settings cannot fail a step
        (the decoder samples group by group and ends only the group that fails), so what failed was the model
        on some row's tokens, or the machine: each generation in flight is prefilled again on its own (from
        its prompt and the tokens made so far) into a fresh decoder, and only those that fail alone end with
        the error. If the next step fails too, _fail_all ends them all."""
        self.decoder = BatchDecoder(self.decoder.model, self.max_batch)
        for ticket in self.running:
            for i, g in enumerate(ticket.generations):
                g.row = -1
                if ticket.ended[i] or g.cancelled or g.finish_reason is not None:
                    continue
                try:
                    self.decoder.add([g])
                except Exception as e:
                    g.finish_reason, g.error = "error", f"{error}; alone: {type(e).__name__}: {e}"
        self._publish()

    def _fail_all(self, error: str) -> None:
        """Every request in flight gets the error, and the decoder starts afresh."""
        self.decoder = BatchDecoder(self.decoder.model, self.max_batch)
        for ticket in self.running:
            for g in ticket.generations:
                g.row = -1
            self._end(ticket, error)
        self.running.clear()

    @staticmethod
    def _send(ticket: Ticket, update: Update) -> None:
        try:
            ticket.send(update)
        except RuntimeError:  # the handler's event loop has closed (the server is shutting down)
            ticket.cancel()
