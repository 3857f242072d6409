"""Elastic DiLoCo: a replica that dies leaves its peers training, a replica that (re)joins is
admitted at a round boundary with the live global state, and no pseudo-gradient is lost, doubled
or counted as zero.

Why this shape (docs/elastic.md has the measurements and the alternatives): DiLoCo exists for
loosely connected machines, which come and go. One torchrun world spanning every replica cannot
survive that (torchrun restarts every worker on any membership change), so every replica is its
own process world (its own `torchrun --standalone`, or plain python) and the replicas share only
a TCPStore: the coordinator's, which across machines is reached through orchestrator/gate.py.
torchft offers the same protocol but adds three unauthenticated services per run and would
replace, not carry, the project's compressed owner-sharded exchange (trainer.diloco).

One round boundary, for each replica (``ElasticDiLoCo.__call__``, which `DiLoCo.step()` calls
every H inner steps):

1. register for quorum attempt ``q`` with the outer step its global copy is at (``rev``), the
   SHA-256 of that global state (`DiLoCo.global_state_hash`) and a role: ``train`` (it holds a
   pseudo-gradient for ``rev``) or ``join`` (it needs the state);
2. seal: when every member of its last quorum that still heartbeats has registered, or
   ``quorum_timeout_s`` after its own registration, a trainer computes `decide` (a pure function
   of the registrations) and writes it with ``compare_set``: the first writer wins, everyone
   reads the same decision. Participants are the trainers at the newest ``rev`` with the
   reference hash; every other registrant (stale revision, forked hash, late, new) is a joiner;
3. exchange: the participants build a fresh Gloo group from ``PrefixStore(f"pg/{q}")`` and run
   `DiLoCo.exchange` over it; each message carries the sender's identity (``rev`` + hash) and a
   sender whose identity is not the quorum's is left out by every owner; the mean divides by the
   replicas it averaged. The exchange runs on a thread while this one watches the peers'
   heartbeats and the outcome key, so a hung or dead peer ends it within a heartbeat timeout;
4. commit: everyone applies the round or no one does (``q/{q}/outcome``, first proposal wins). On
   ``abort`` the survivors keep their pseudo-gradients and retry at ``q + 1``; a group that saw an
   aborted round is never used again (Gloo cannot abort an operation: a late peer could still
   complete it), only parked until the process exits;
5. admit: the donor (the lowest participant) sends each joiner the global copy and the outer
   optimizer state over a two-member group; the joiner checks the bytes' SHA-256 against the one
   the donor published in the store, loads them, and trains H inner steps before it first counts.

Below ``min_replicas`` participants there is no exchange: the participants keep their
pseudo-gradients and wait (joiners are still admitted) until enough are back, for at most
``timeout_s``, then `ElasticError`.

Store keys, under ``PrefixStore("elastic", store)``: ``hb/{id}`` (heartbeat counter),
``q/{q}/n`` and ``q/{q}/slot/{k}`` (registrations), ``q/{q}/decision``, ``q/{q}/flag/{id}`` and
``q/{q}/outcome`` (commit), ``q/{q}/state`` and ``q/{q}/healed/{id}`` (admission), ``latest``
(newest sealed attempt), ``rev`` (newest committed outer step), ``committed/{rev}`` (who took part),
``healed/{rev}/*`` (who was healed to that state), ``shared/*`` and ``agreed/*`` (the caller's
books), ``finished``. Group keys live under ``pg/{q}``.

A library like trainer.diloco: torch and the standard library only, no config objects, no files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore, Store

from trainer.diloco import DiLoCo, DiLoCoCommunicationError, Exchange, identity, transfer

__all__ = [
    "Boundary",
    "ElasticDiLoCo",
    "ElasticError",
    "Quorum",
    "Registration",
    "RunFinished",
    "decide",
    "process_group",
]

logger = logging.getLogger(__name__)

PREFIX = "elastic"
ROLES = ("train", "join")


class ElasticError(RuntimeError):
    """The run cannot go on: too few replicas for too long, or a boundary that never resolved.
    The message names the setting (``diloco.min_replicas``, ``diloco.timeout_s``) and the replicas."""


class RunFinished(Exception):  # noqa: N818 (a signal, not a failure)
    """The run's last outer step was taken while this replica waited to be admitted."""


@dataclass(frozen=True)
class Registration:
    """One replica's entry for a quorum attempt."""

    id: int
    rev: int  # outer steps its global copy has taken (-1: it holds no state)
    hash: str  # DiLoCo.global_state_hash() of that global state ("" with rev -1)
    role: str  # "train": holds a pseudo-gradient for rev; "join": needs the global state


@dataclass
class Quorum:
    """A sealed decision: who averages, who is healed, from whom."""

    q: int
    rev: int  # the reference outer step (the participants' global copies are at it)
    ref_hash: str
    participants: list[int]  # replica ids whose pseudo-gradients are averaged; group rank = position
    joiners: list[int]  # receive the global state from the donor after the outcome
    excluded: list[int]  # trainers left out: stale revision or forked hash (they are joiners too)
    donor: int  # the lowest participant; with no trainer at all, the joiner holding the newest state
    exchange: bool  # enough participants (min_replicas) to take an outer step

    @property
    def members(self) -> list[int]:
        """Everyone the decision gives a part: the participants and joiners, and the donor when
        nobody trains (it is neither: its state becomes the reference)."""
        return self.participants + self.joiners if self.participants else [self.donor, *self.joiners]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(raw: bytes | str) -> Quorum:
        return Quorum(**json.loads(raw))


def decide(q: int, registrations: list[Registration], min_replicas: int = 1) -> Quorum:
    """The decision for attempt `q`, a pure function of its registrations (order and duplicates do
    not matter: a replica's last registration counts).

    With trainers: the reference is the newest ``rev`` among them, its hash the lowest such id's;
    participants are the trainers holding exactly that (rev, hash); everyone else is a joiner;
    the donor is the lowest participant; there is an exchange when participants >= min_replicas.
    Without any trainer (every registrant needs state, e.g. after all replicas restarted): the
    joiner holding the newest state (lowest id on ties) is the donor and there is no exchange.
    """
    latest: dict[int, Registration] = {}
    for registration in registrations:
        latest[registration.id] = registration
    regs = sorted(latest.values(), key=lambda r: r.id)
    if not regs:
        raise ValueError(f"decide(q={q}): no registrations")
    trainers = [r for r in regs if r.role == "train"]
    pool = trainers or regs
    rev = max(r.rev for r in pool)
    ref = min((r for r in pool if r.rev == rev), key=lambda r: r.id)
    if trainers:
        participants = [r.id for r in trainers if (r.rev, r.hash) == (rev, ref.hash)]
        excluded = [r.id for r in trainers if r.id not in participants]
        joiners = [r.id for r in regs if r.id not in participants]
        return Quorum(
            q, rev, ref.hash, participants, joiners, excluded, participants[0], len(participants) >= min_replicas
        )
    joiners = [r.id for r in regs if r.id != ref.id]
    return Quorum(q, rev, ref.hash, [], joiners, [], ref.id, False)


def process_group(
    store: Store, prefix: str, rank: int, size: int, *, connect_timeout_s: float, timeout_s: float
) -> dist.ProcessGroup:
    """A Gloo process group of `size` processes that all call this with the same `prefix`,
    without init_process_group: torch's own `ProcessGroupGloo(store, rank, size, timeout)` (the
    overload `new_group` uses; it honours GLOO_SOCKET_IFNAME) wrapped in a `ProcessGroup`, so that
    torch.distributed's point-to-point calls take it (``group=``, ``group_dst=``).

    Blocks until every member has connected; raises RuntimeError after `connect_timeout_s` if one
    never does. Its operations then time out after `timeout_s`.
    """
    backend = dist.ProcessGroupGloo(PrefixStore(prefix, store), rank, size, timedelta(seconds=connect_timeout_s))
    backend.set_timeout(timedelta(seconds=timeout_s))
    group = dist.ProcessGroup(PrefixStore(f"{prefix}/group", store), rank, size)
    group._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, backend)
    group._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    return group


@dataclass
class Boundary:
    """What one round boundary did for this replica (the books read it).

    ``role``: ``participant`` (its pseudo-gradient was averaged into outer step ``rev``),
    ``healed`` (it received the global state at outer step ``rev`` from ``donor``) or ``seeded``
    (nobody held a pseudo-gradient and its state became the reference).
    """

    role: str
    rev: int  # the outer step this replica's global copy is at afterwards
    q: int
    attempts: int  # quorum attempts this boundary took (aborted exchanges, waits below min_replicas)
    participants: list[int] = field(default_factory=list)  # of the committing quorum
    excluded: list[int] = field(default_factory=list)  # registered to train, not averaged (stale, forked, late)
    admitted: list[int] = field(default_factory=list)  # joiners this replica (the donor) healed
    donor: int = -1
    wait_s: float = 0.0  # registration to the sealed decision, summed over attempts
    exchange_s: float = 0.0  # group, exchange and commit, summed over attempts
    transfer_s: float = 0.0  # sending or receiving the global state


class ElasticDiLoCo:
    """The round boundary of elastic DiLoCo (module docstring) for one replica.

    Args:
        store: the run's shared store (a TCPStore client; every key goes under ``elastic/``).
        replica_id: this replica's stable id (its data stream and checkpoint files).
        replicas: the replicas the run starts with (the first quorum waits for them).
        quorum_timeout_s: how long a registered replica waits for the others at a boundary.
        min_replicas: fewest participants that take an outer step.
        heartbeat_s, heartbeat_timeout_s: this replica bumps ``hb/{id}`` every heartbeat_s; a peer
            whose counter did not move for heartbeat_timeout_s (timed by our own monotonic
            clock, so machines need no synchronised clocks) is dead: not waited for, and an
            exchange with it is abandoned.
        timeout_s: one exchange's deadline, and the most a boundary may take in all (then
            ElasticError).
        connect_timeout_s: the most building a group may take (a member that died after the seal).
        connect: returns a new client of the same store (the heartbeat's own connection, so a slow
            request never delays a beat); None: the heartbeat shares `store`.
        poll_s: how often waits look at the store.

    Use: ``elastic.attach(diloco)``; then ``diloco.step()`` runs the boundary every H steps and
    ``elastic.last`` says what it did. `enter` before the first step heals a replica that is behind.
    """

    def __init__(
        self,
        store: Store,
        replica_id: int,
        *,
        replicas: int,
        quorum_timeout_s: float,
        min_replicas: int = 1,
        heartbeat_s: float = 1.0,
        heartbeat_timeout_s: float = 10.0,
        timeout_s: float = 1800.0,
        connect_timeout_s: float = 30.0,
        connect: Callable[[], Store] | None = None,
        poll_s: float = 0.05,
    ) -> None:
        if not 0 <= replica_id:
            raise ValueError(f"ElasticDiLoCo(replica_id={replica_id}): must be >= 0")
        if not 1 <= min_replicas:
            raise ValueError(f"ElasticDiLoCo(min_replicas={min_replicas}): must be >= 1")
        self.root = store
        self.store = PrefixStore(PREFIX, store)
        self.id = replica_id
        self.replicas = replicas
        self.quorum_timeout_s = quorum_timeout_s
        self.min_replicas = min_replicas
        self.heartbeat_s = heartbeat_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.poll_s = poll_s
        self.q = 0  # the next attempt this replica registers for
        self.expected = set(range(replicas))  # members of its last quorum: the next window waits for them
        self.last: Boundary | None = None
        self.graveyard: list[Any] = []  # groups and threads of abandoned exchanges: never destroyed inline
        self._beats: dict[int, tuple[bytes, float]] = {}
        self._slots: dict[int, dict[int, Registration]] = {}
        self._stop = threading.Event()
        beat_store = PrefixStore(PREFIX, connect()) if connect is not None else self.store
        # Started by `enter`: a replica still building its model or warming up does not look alive
        # (its peers would wait for it at a boundary it cannot reach in time).
        self._heartbeat = threading.Thread(target=self._beat, args=(beat_store,), name="elastic-heartbeat", daemon=True)

    # ------------------------------------------------------------------------------ public

    def attach(self, diloco: DiLoCo) -> None:
        """Take `diloco`'s round boundary over (it then exchanges only through this object)."""
        if diloco.fragments != 1 or diloco.fragment_delay != 0 or diloco.group is not None:
            raise ValueError(
                "ElasticDiLoCo.attach: elastic DiLoCo needs fragments=1, fragment_delay=0 and group=None "
                "(it builds a group per quorum)"
            )
        diloco.synchronizer = self

    def live_revision(self) -> int | None:
        """The newest outer step committed in this store (None: none yet, a fresh store)."""
        return int(self.store.get("rev")) if self.store.check(["rev"]) else None

    def enter(self, diloco: DiLoCo, *, has_state: bool) -> Boundary | None:
        """Before the first inner step: a replica without state of its own (`has_state` False),
        or behind the run (an outer step newer than its own was committed), registers as a joiner
        and returns once healed (or seeded); None when it may train from its own state.

        Raises RunFinished when the run ended meanwhile; ElasticError after timeout_s."""
        if not self._heartbeat.is_alive() and not self._stop.is_set():
            self._heartbeat.start()
        if self.store.check(["latest"]):
            self.q = max(self.q, int(self.store.get("latest")) + 1)
        live = self.live_revision()
        if has_state and (live is None or live <= diloco.outer_step):
            return None
        started = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            boundary = self._attempt_as_joiner(diloco, has_state, attempts)
            if boundary is not None:
                self.last = boundary
                return boundary
            self._check_deadline(started, "entering the run")

    def __call__(self, diloco: DiLoCo) -> float:
        """The round boundary (`DiLoCo.synchronizer`): returns the seconds it took (all of it is
        waiting on others). Afterwards ``last`` says whether this replica's pseudo-gradient was
        averaged (``participant``) or it was healed to the run's state (``healed``).

        Raises RunFinished (the run ended while it was being healed) or ElasticError."""
        started_clock = time.perf_counter()
        started = time.monotonic()
        if not self._heartbeat.is_alive() and not self._stop.is_set():
            self._heartbeat.start()
        pseudo, finite = diloco.pseudo_gradient()
        state_hash = diloco.global_state_hash()  # unchanged until this boundary returns
        role, attempts = "train", 0
        wait_s = exchange_s = 0.0
        while True:
            attempts += 1
            if role == "join":
                boundary = self._attempt_as_joiner(diloco, True, attempts)
                if boundary is not None:
                    self.last = boundary
                    return time.perf_counter() - started_clock
                self._check_deadline(started, f"healing at outer step {diloco.outer_step}")
                continue
            clock = time.monotonic()
            quorum = self._seal(Registration(self.id, diloco.outer_step, state_hash, "train"))
            wait_s += time.monotonic() - clock
            if self.id not in quorum.members:  # registered after the seal
                if quorum.exchange and self._outcome(quorum) == "commit":
                    role = "join"  # the others took outer step rev + 1 without us: our pseudo-gradient is stale
                self._next(quorum)
                continue
            if self.id in quorum.joiners:  # stale revision or forked hash: our pseudo-gradient cannot count
                role = "join"
                self.q = quorum.q  # the same attempt: be healed by its donor
                continue
            if not quorum.exchange:  # below min_replicas: keep the pseudo-gradient, admit joiners, wait
                self._admit(quorum, diloco)
                self._next(quorum)
                self._check_deadline(
                    started,
                    f"diloco.min_replicas: {len(quorum.participants)} of the {self.min_replicas} replicas needed "
                    f"({quorum.participants}) at outer step {quorum.rev + 1}",
                )
                continue
            clock = time.monotonic()
            exchange, reason = self._exchange(diloco, quorum, pseudo, finite, state_hash)
            outcome = self._commit(quorum, exchange is not None)
            exchange_s += time.monotonic() - clock
            mine_counts = exchange is not None and quorum.participants.index(self.id) not in exchange.excluded
            if outcome == "commit" and mine_counts:
                logger.info(
                    "elastic q%d: outer step %d from %s (joiners %s, excluded %s)",
                    quorum.q,
                    quorum.rev + 1,
                    quorum.participants,
                    quorum.joiners,
                    quorum.excluded,
                )
                diloco.apply_exchange(exchange)
                excluded = quorum.excluded + [quorum.participants[rank] for rank in exchange.excluded]
                averaged = [p for p in quorum.participants if p not in excluded]
                self._record_commit(quorum, averaged, diloco.outer_step)
                self._next(quorum)
                admitted, transfer_s = self._admit(quorum, diloco)
                self.last = Boundary(
                    "participant",
                    diloco.outer_step,
                    quorum.q,
                    attempts,
                    participants=averaged,
                    excluded=sorted(excluded),
                    admitted=admitted,
                    donor=quorum.donor,
                    wait_s=wait_s,
                    exchange_s=exchange_s,
                    transfer_s=transfer_s,
                )
                return time.perf_counter() - started_clock
            if outcome == "commit":  # the others applied it and we lack the result: heal
                logger.warning("elastic q%d: committed without this replica (%s): healing", quorum.q, reason)
                if self.id == quorum.donor:  # its joiners must find another donor at the next attempt
                    self.store.set(f"q/{quorum.q}/state", json.dumps({"none": True}))
                role = "join"
            else:
                logger.warning("elastic q%d: aborted (%s): retrying with the same pseudo-gradient", quorum.q, reason)
            self._next(quorum)
            self._check_deadline(started, f"outer step {diloco.outer_step + 1}")

    def share(self, name: str, value: Any) -> None:
        """Publish this replica's `value` (JSON-able) under `name` for the others' `collect`."""
        self.store.set(f"shared/{name}/{self.id}", json.dumps(value))

    def collect(self, name: str, ids: list[int], timeout_s: float | None = None) -> dict[int, Any]:
        """Every `ids` member's shared `name`, waiting for each until it arrives, its heartbeat
        stops, or `timeout_s` (default: the exchange timeout) passes; the missing are absent."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        out: dict[int, Any] = {}
        waiting = list(ids)
        while waiting:
            for member in list(waiting):
                key = f"shared/{name}/{member}"
                if self.store.check([key]):
                    out[member] = json.loads(self.store.get(key))
                    waiting.remove(member)
                elif member != self.id and self._dead(member):
                    waiting.remove(member)
            if waiting:
                if time.monotonic() > deadline:
                    break
                time.sleep(self.poll_s)
        return out

    def agree(self, name: str, proposal: str) -> str:
        """The first proposal any replica made for `name` (compare_set): what all of them use."""
        return self.store.compare_set(f"agreed/{name}", "", proposal).decode()

    def once(self, name: str) -> bool:
        """True for the first caller over the whole run (a store counter), False ever after."""
        return self.store.add(f"once/{name}", 1) == 1

    def healed_to(self, rev: int) -> list[int]:
        """The replicas healed with the global state at outer step `rev` (their first outer step
        as participants is rev + 1)."""
        count = self.store.add(f"healed/{rev}/n", 0)
        return sorted({int(self.store.get(f"healed/{rev}/{k}")) for k in range(1, count + 1)})

    def committed(self, rev: int) -> list[int] | None:
        """Who took part in outer step `rev` (None: not committed in this store)."""
        key = f"committed/{rev}"
        return json.loads(self.store.get(key))["participants"] if self.store.check([key]) else None

    def finish(self, summary: Any) -> None:
        """Announce the end of the run (the books holder, with summary.json's content)."""
        self.store.set("finished", json.dumps(summary))

    def finished(self) -> Any | None:
        """The announced summary, or None while the run goes on."""
        return json.loads(self.store.get("finished")) if self.store.check(["finished"]) else None

    def wait_finished(self, holder: int) -> Any | None:
        """The summary `holder` announces, waiting while its heartbeat goes on (at most timeout_s);
        None when it stopped beating, or the time ran out, without announcing one."""
        deadline = time.monotonic() + self.timeout_s
        while (summary := self.finished()) is None:
            if (holder != self.id and self._dead(holder)) or time.monotonic() > deadline:
                return self.finished()
            time.sleep(self.poll_s)
        return summary

    def close(self) -> None:
        """Stop the heartbeat (the peers see this replica dead after heartbeat_timeout_s)."""
        self._stop.set()

    # ---------------------------------------------------------------------------- internals

    def _beat(self, store: Store) -> None:
        # A counter, not a timestamp: observers time its changes with their own clocks.
        while not self._stop.is_set():
            try:
                store.add(f"hb/{self.id}", 1)
            except (RuntimeError, TimeoutError) as error:  # the store is unreachable for now: try again
                logger.warning("elastic heartbeat of replica %d: %s", self.id, error)
            self._stop.wait(self.heartbeat_s)

    def _dead(self, member: int) -> bool:
        """Its heartbeat counter exists and has not moved for heartbeat_timeout_s of our clock (a
        replica that never beat is still starting: not dead)."""
        key = f"hb/{member}"
        if not self.store.check([key]):
            return False
        value, now = self.store.get(key), time.monotonic()
        seen = self._beats.get(member)
        if seen is None or seen[0] != value:
            self._beats[member] = (value, now)
            return False
        return now - seen[1] > self.heartbeat_timeout_s

    def _alive(self, member: int) -> bool:
        """It beats (has a counter that moved recently, or that we have not watched long enough)."""
        return self.store.check([f"hb/{member}"]) and not self._dead(member)

    def _register(self, q: int, registration: Registration) -> None:
        slot = self.store.add(f"q/{q}/n", 1)
        self.store.set(f"q/{q}/slot/{slot}", json.dumps(asdict(registration)))

    def _registrants(self, q: int) -> list[Registration]:
        seen = self._slots.setdefault(q, {})
        for slot in range(1, self.store.add(f"q/{q}/n", 0) + 1):
            if slot in seen:
                continue
            key = f"q/{q}/slot/{slot}"
            try:  # the slot number is taken before the slot is written
                self.store.wait([key], timedelta(seconds=2))
            except (RuntimeError, TimeoutError):  # its writer died in between: it does not exist
                continue
            seen[slot] = Registration(**json.loads(self.store.get(key)))
        return list(seen.values())

    def _seal(self, registration: Registration) -> Quorum:
        """Register for attempt self.q and return its decision (which may not include us)."""
        q = self.q
        registered = time.monotonic()
        self._register(q, registration)
        key = f"q/{q}/decision"
        while True:
            if self.store.check([key]):
                return Quorum.from_json(self.store.get(key))
            if self.store.check(["finished"]):
                raise RunFinished
            regs = self._registrants(q)
            if self._may_seal(registration, regs, time.monotonic() - registered):
                decision = decide(q, regs, self.min_replicas)
                won = Quorum.from_json(self.store.compare_set(key, "", decision.to_json()))
                self.store.set("latest", str(q))
                return won
            time.sleep(self.poll_s)

    def _may_seal(self, registration: Registration, regs: list[Registration], waited: float) -> bool:
        ids = {r.id for r in regs}
        trainers = [r for r in regs if r.role == "train"]
        if registration.role == "train":
            if waited >= self.quorum_timeout_s:
                return True
            missing = [m for m in sorted(self.expected - ids) if not self._dead(m)]
            return not missing and len(trainers) >= self.min_replicas
        # A joiner seals only when nobody holds a pseudo-gradient and nobody else is alive out
        # there (every replica restarted at once): then the newest state becomes the reference.
        if trainers or waited < self.quorum_timeout_s:
            return False
        return not any(self._alive(m) for m in range(self.replicas) if m not in ids)

    def _next(self, quorum: Quorum) -> None:
        self.q = quorum.q + 1
        if self.id in quorum.members:
            self.expected = set(quorum.members)
        self._slots.pop(quorum.q, None)

    def _outcome(self, quorum: Quorum) -> str:
        """Wait for the outcome of an exchanging quorum (bounded: if every participant stops
        heartbeating first, abort is proposed)."""
        key = f"q/{quorum.q}/outcome"
        deadline = time.monotonic() + self.connect_timeout_s + self.timeout_s
        while not self.store.check([key]):
            if all(self._dead(p) for p in quorum.participants) or time.monotonic() > deadline:
                return self.store.compare_set(key, "", "abort").decode()
            time.sleep(self.poll_s)
        return self.store.get(key).decode()

    def _exchange(
        self, diloco: DiLoCo, quorum: Quorum, pseudo: torch.Tensor, finite: bool, state_hash: str
    ) -> tuple[Exchange | None, str]:
        """The exchange over a fresh group of the participants, on a thread watched from here:
        (the finished exchange, "") or (None, why it was given up)."""
        rank, size = quorum.participants.index(self.id), len(quorum.participants)
        mine = identity(diloco.outer_step, state_hash)
        reference = identity(quorum.rev, quorum.ref_hash)
        if size == 1:
            exchange = diloco.exchange(None, pseudo.clone(), finite, identity=mine, reference=reference)
            return (exchange, "") if exchange.error is None else (None, str(exchange.error))
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                group = process_group(
                    self.root,
                    f"pg/{quorum.q}",
                    rank,
                    size,
                    connect_timeout_s=self.connect_timeout_s,
                    timeout_s=self.timeout_s,
                )
                box["group"] = group
                box["exchange"] = diloco.exchange(group, pseudo.clone(), finite, identity=mine, reference=reference)
            except BaseException as error:  # noqa: BLE001 (handed to the watching thread)
                box["error"] = error

        thread = threading.Thread(target=run, name=f"elastic-exchange-q{quorum.q}", daemon=True)
        thread.start()
        deadline = time.monotonic() + self.connect_timeout_s + self.timeout_s
        outcome, reason = f"q/{quorum.q}/outcome", ""
        while thread.is_alive():
            thread.join(max(self.poll_s, 0.05))
            if not thread.is_alive():
                break
            if self.store.check([outcome]):
                reason = f"a peer proposed {self.store.get(outcome).decode()}"
            elif dead := [p for p in quorum.participants if p != self.id and self._dead(p)]:
                reason = f"replicas {dead} stopped heartbeating"
            elif time.monotonic() > deadline:
                reason = f"no answer within {self.connect_timeout_s + self.timeout_s:g} s"
            if reason:
                self.graveyard.append((thread, box))  # its operations may still complete: never reuse them
                return None, reason
        exchange = box.get("exchange")
        error = box.get("error") or (exchange.error if exchange is not None else None)
        if error is not None:
            self.graveyard.append(box)
            what = error.reasons if isinstance(error, DiLoCoCommunicationError) else error
            return None, f"{type(error).__name__}: {what}"
        return exchange, ""

    def _commit(self, quorum: Quorum, ok: bool) -> str:
        """Everyone applies the round or no one does: a failed member proposes abort at once; a
        member whose exchange succeeded proposes commit once every flag is in, or when the missing
        members stopped heartbeating or heartbeat_timeout_s passed (its success proves every
        contribution arrived, so the result is complete; a member that lacks it heals)."""
        q, participants = quorum.q, quorum.participants
        self.store.set(f"q/{q}/flag/{self.id}", "1" if ok else "0")
        key = f"q/{q}/outcome"
        if not ok:
            return self.store.compare_set(key, "", "abort").decode()
        deadline = time.monotonic() + self.heartbeat_timeout_s
        while not self.store.check([key]):
            flags = {
                p: self.store.get(f"q/{q}/flag/{p}") for p in participants if self.store.check([f"q/{q}/flag/{p}"])
            }
            missing = [p for p in participants if p not in flags]
            if b"0" in flags.values():
                return self.store.compare_set(key, "", "abort").decode()
            if not missing or time.monotonic() > deadline or all(self._dead(p) for p in missing):
                return self.store.compare_set(key, "", "commit").decode()
            time.sleep(self.poll_s)
        return self.store.get(key).decode()

    def _record_commit(self, quorum: Quorum, averaged: list[int], rev: int) -> None:
        self.store.compare_set(f"committed/{rev}", "", json.dumps({"q": quorum.q, "participants": averaged}))
        self.store.set("rev", str(rev))

    def _admit(self, quorum: Quorum, diloco: DiLoCo) -> tuple[list[int], float]:
        """The donor sends the global state to each joiner in turn: (those healed, seconds)."""
        if self.id != quorum.donor or not quorum.joiners:
            return [], 0.0
        started = time.monotonic()
        raw = diloco.global_state()
        info = {
            "rev": diloco.outer_step,
            "bytes": raw.numel(),
            "sha256": hashlib.sha256(raw.numpy().tobytes()).hexdigest(),
            "state_hash": diloco.global_state_hash(),
        }
        self.store.set(f"q/{quorum.q}/state", json.dumps(info))
        healed = []
        for joiner in quorum.joiners:
            try:
                group = process_group(
                    self.root,
                    f"pg/{quorum.q}/state/{joiner}",
                    0,
                    2,
                    connect_timeout_s=self.connect_timeout_s,
                    timeout_s=self.timeout_s,
                )
                transfer(
                    group,
                    {1: raw},
                    {},
                    tag=0,
                    deadline=time.perf_counter() + self.timeout_s,
                    timeout_s=self.timeout_s,
                    what=(diloco.outer_step, -1),
                )
            except (RuntimeError, DiLoCoCommunicationError) as error:
                logger.warning("elastic q%d: state to replica %d failed: %s", quorum.q, joiner, error)
                continue
            key = f"q/{quorum.q}/healed/{joiner}"
            deadline = time.monotonic() + self.connect_timeout_s
            while not self.store.check([key]) and time.monotonic() < deadline and not self._dead(joiner):
                time.sleep(self.poll_s)
            if self.store.check([key]) and self.store.get(key).decode() == info["state_hash"]:
                healed.append(joiner)
        return healed, time.monotonic() - started

    def _attempt_as_joiner(self, diloco: DiLoCo, has_state: bool, attempts: int) -> Boundary | None:
        """One attempt to be healed: register as a joiner (or reuse the attempt this replica was
        just made a joiner of), wait for the outcome, receive the state. None: try again."""
        clock = time.monotonic()
        rev = diloco.outer_step if has_state else -1
        state_hash = diloco.global_state_hash() if has_state else ""
        key = f"q/{self.q}/decision"
        if self.store.check([key]) and self.id in Quorum.from_json(self.store.get(key)).joiners:
            quorum = Quorum.from_json(self.store.get(key))
        else:
            quorum = self._seal(Registration(self.id, rev, state_hash, "join"))
        wait_s = time.monotonic() - clock
        if self.id not in quorum.members:  # sealed before we asked: catch up to the newest attempt
            self._next(quorum)
            if self.store.check(["latest"]):
                self.q = max(self.q, int(self.store.get("latest")) + 1)
            logger.info("elastic q%d: sealed before this replica asked to join; asking at q%d", quorum.q, self.q)
            return None
        if quorum.donor == self.id and not quorum.participants:  # nobody trains: our state is the reference
            self._next(quorum)
            admitted, transfer_s = self._admit(quorum, diloco)
            return Boundary("seeded", diloco.outer_step, quorum.q, attempts, admitted=admitted, donor=self.id)
        if quorum.exchange and self._outcome(quorum) != "commit":
            self._next(quorum)
            return None
        clock = time.monotonic()
        healed = self._receive(quorum, diloco)
        self._next(quorum)
        if not healed:
            return None
        return Boundary(
            "healed",
            diloco.outer_step,
            quorum.q,
            attempts,
            participants=list(quorum.participants),
            excluded=list(quorum.excluded),
            donor=quorum.donor,
            wait_s=wait_s,
            transfer_s=time.monotonic() - clock,
        )

    def _receive(self, quorum: Quorum, diloco: DiLoCo) -> bool:
        """The joiner's side of `_admit`: the bytes, their SHA-256 against the donor's, loaded."""
        logger.info("elastic q%d: admitted as a joiner; the state comes from replica %d", quorum.q, quorum.donor)
        key = f"q/{quorum.q}/state"
        deadline = time.monotonic() + self.connect_timeout_s + self.timeout_s
        while not self.store.check([key]):
            if self._dead(quorum.donor) or time.monotonic() > deadline:
                return False
            time.sleep(self.poll_s)
        info = json.loads(self.store.get(key))
        if info.get("none"):  # the donor lost the round itself
            return False
        raw = torch.empty(info["bytes"], dtype=torch.uint8)
        try:
            group = process_group(
                self.root,
                f"pg/{quorum.q}/state/{self.id}",
                1,
                2,
                connect_timeout_s=self.connect_timeout_s,
                timeout_s=self.timeout_s,
            )
            transfer(
                group,
                {},
                {0: raw},
                tag=0,
                deadline=time.perf_counter() + self.timeout_s,
                timeout_s=self.timeout_s,
                what=(info["rev"], -1),
            )
        except (RuntimeError, DiLoCoCommunicationError) as error:
            logger.warning("elastic q%d: state from replica %d failed: %s", quorum.q, quorum.donor, error)
            return False
        digest = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
        if digest != info["sha256"]:
            logger.warning(
                "elastic q%d: the state from replica %d has SHA-256 %s, the donor published %s: refused",
                quorum.q,
                quorum.donor,
                digest[:16],
                info["sha256"][:16],
            )
            return False
        diloco.load_global_state(raw, info["rev"])
        loaded = diloco.global_state_hash()
        logger.info(
            "elastic q%d: healed by replica %d to outer step %d (%d bytes, SHA-256 %s)",
            quorum.q,
            quorum.donor,
            info["rev"],
            info["bytes"],
            digest[:16],
        )
        self.store.set(f"q/{quorum.q}/healed/{self.id}", loaded)
        if loaded != info["state_hash"]:
            return False
        slot = self.store.add(f"healed/{info['rev']}/n", 1)
        self.store.set(f"healed/{info['rev']}/{slot}", str(self.id))
        return True

    def _check_deadline(self, started: float, what: str) -> None:
        if time.monotonic() - started > self.timeout_s:
            alive = [m for m in range(self.replicas) if m == self.id or self._alive(m)]
            raise ElasticError(
                f"{what}: not resolved within diloco.timeout_s = {self.timeout_s:g} s "
                f"(replicas heartbeating: {alive} of {self.replicas})"
            )
