"""The scheduler's waiting queue, served round-robin across tenants.

Each tenant (a request's ``cache_salt``: the service salts every request with its tenant) has its own FCFS queue;
the queue's head is the head of the tenant whose turn it is, and after one of its requests is admitted the next
tenant's turn comes. So a tenant that floods the queue with hundreds of requests delays another tenant's next
request by at most one admission of its own, not by its whole backlog, while within a tenant the order stays
first come, first served. With a single tenant this is a plain FIFO.

A preempted sequence goes back to the front of its tenant's queue and that tenant's turn comes first, as in a
FIFO's front: recomputing started work before anyone's new work keeps the no-starvation argument of the scheduler.
One that stepped back to give another tenant its share of the batch waits for its tenant's turn instead.
Pure Python, no torch.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator

from eoq.engine.sequence import Sequence


class FairQueue:
    """Waiting sequences; ``peek`` / ``popleft`` give the next one to admit."""

    def __init__(self) -> None:
        # Tenants with waiting sequences, in the order of their turns (the first's turn is now).
        self._queues: OrderedDict[str, deque[Sequence]] = OrderedDict()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[Sequence]:
        """Every waiting sequence, in the order they would be admitted if nothing else arrived."""
        queues = [list(q) for q in self._queues.values()]
        for i in range(max((len(q) for q in queues), default=0)):
            for q in queues:
                if i < len(q):
                    yield q[i]

    def append(self, seq: Sequence) -> None:
        """A new request: last in its tenant's queue (a tenant new to the queue waits for the others' turns)."""
        self._queues.setdefault(seq.cache_salt, deque()).append(seq)
        self._len += 1

    def appendleft(self, seq: Sequence, take_turn: bool = True) -> None:
        """A preempted sequence: first in its tenant's queue, and (``take_turn``) that tenant's turn is next —
        not when it stepped back to give another tenant its share."""
        self._queues.setdefault(seq.cache_salt, deque()).appendleft(seq)
        if take_turn:
            self._queues.move_to_end(seq.cache_salt, last=False)
        self._len += 1

    def tenants(self) -> list[str]:
        """The tenants with waiting sequences, in the order of their turns."""
        return list(self._queues)

    def give_turn(self, tenant: str) -> None:
        """``tenant`` (waiting) goes next."""
        self._queues.move_to_end(tenant, last=False)

    def peek(self) -> Sequence:
        """The next sequence to admit. Raises ``IndexError`` when empty."""
        if not self._queues:
            raise IndexError("the queue is empty")
        return next(iter(self._queues.values()))[0]

    def popleft(self) -> Sequence:
        """Take the next sequence; the next tenant's turn comes."""
        tenant, q = next(iter(self._queues.items()))
        seq = q.popleft()
        self._len -= 1
        if q:
            self._queues.move_to_end(tenant)
        else:
            del self._queues[tenant]
        return seq

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` out (aborted while waiting). Raises ``ValueError`` if it is not here."""
        q = self._queues.get(seq.cache_salt)
        if q is None:
            raise ValueError("the sequence is not waiting")
        q.remove(seq)
        self._len -= 1
        if not q:
            del self._queues[seq.cache_salt]
