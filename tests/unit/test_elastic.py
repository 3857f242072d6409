"""The round boundary of elastic DiLoCo (trainer.elastic) against a real TCPStore on localhost:
replicas are threads with their own store clients and real Gloo groups, so the protocol's timing
(windows, heartbeats, the commit) runs as in separate processes, in seconds."""

from __future__ import annotations

import functools
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch
from torch import nn
from torch.distributed import PrefixStore, TCPStore

import trainer.elastic as elastic_module
from trainer.diloco import IDENTITY_BYTES, DiLoCo, identity
from trainer.elastic import ElasticDiLoCo, ElasticError, Quorum, Registration, decide, process_group

HOST = "127.0.0.1"


@pytest.fixture()
def server(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    return TCPStore(HOST, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))


def client(server) -> TCPStore:
    return TCPStore(HOST, server.port, is_master=False, timeout=timedelta(seconds=30))


def elastic(server, replica: int, replicas: int = 3, **settings) -> ElasticDiLoCo:
    options = dict(quorum_timeout_s=10.0, heartbeat_s=0.1, heartbeat_timeout_s=1.0, timeout_s=20.0)
    options |= dict(connect_timeout_s=5.0, poll_s=0.02)
    options |= settings
    return ElasticDiLoCo(client(server), replica, replicas=replicas, connect=lambda: client(server), **options)


def run_all(calls):
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result(timeout=60) for f in [pool.submit(call) for call in calls]]


def seal(member: ElasticDiLoCo, rev: int = 0, state: str = "h", role: str = "train") -> Quorum:
    return member._seal(Registration(member.id, rev, state, role))


# ---------------------------------------------------------------------------------- decide


def test_decide_takes_the_newest_revision_and_makes_stale_and_forked_trainers_joiners():
    regs = [
        Registration(2, 5, "aa", "train"),
        Registration(0, 5, "aa", "train"),
        Registration(1, 4, "old", "train"),  # missed a round: stale
        Registration(3, 5, "bb", "train"),  # same step, other weights: forked
        Registration(4, -1, "", "join"),
    ]
    quorum = decide(7, regs)
    assert quorum.participants == [0, 2] and quorum.donor == 0 and quorum.exchange
    assert quorum.joiners == [1, 3, 4] and quorum.excluded == [1, 3]
    assert (quorum.rev, quorum.ref_hash) == (5, "aa")
    for order in itertools.permutations(regs):
        assert decide(7, list(order)) == quorum


def test_decide_counts_a_replica_once_by_its_last_registration():
    quorum = decide(
        0, [Registration(1, 3, "h", "train"), Registration(0, 3, "h", "train"), Registration(1, -1, "", "join")]
    )
    assert quorum.participants == [0] and quorum.joiners == [1]


def test_decide_without_trainers_makes_the_newest_state_the_donor_and_takes_no_step():
    quorum = decide(
        0, [Registration(0, 3, "a", "join"), Registration(1, 6, "b", "join"), Registration(2, 6, "c", "join")]
    )
    assert quorum.participants == [] and quorum.donor == 1 and quorum.joiners == [0, 2] and not quorum.exchange


def test_decide_below_min_replicas_admits_but_takes_no_outer_step():
    regs = [Registration(0, 2, "h", "train"), Registration(2, -1, "", "join")]
    assert decide(0, regs, min_replicas=2).exchange is False
    assert decide(0, regs, min_replicas=1).exchange is True


# ---------------------------------------------------------------------------- the window


def test_everyone_expected_closes_the_window_at_once_with_one_decision(server):
    members = [elastic(server, r) for r in range(3)]
    started = time.monotonic()
    quorums = run_all([functools.partial(seal, m) for m in members])
    assert time.monotonic() - started < 3.0  # not quorum_timeout_s (10 s)
    assert quorums[0] == quorums[1] == quorums[2] and quorums[0].participants == [0, 1, 2]


def test_a_dead_heartbeat_is_not_waited_for_beyond_the_heartbeat_timeout(server):
    PrefixStore("elastic", client(server)).set("hb/2", "7")  # replica 2 beat once, then died
    members = [elastic(server, r) for r in range(2)]
    started = time.monotonic()
    quorums = run_all([functools.partial(seal, m) for m in members])
    took = time.monotonic() - started
    assert 0.9 < took < 4.0, took  # heartbeat_timeout_s (1 s) after the first look, not 10 s
    assert quorums[0] == quorums[1] and quorums[0].participants == [0, 1]


def test_a_replica_that_never_started_is_waited_for_the_whole_window(server):
    members = [elastic(server, r, quorum_timeout_s=1.5) for r in range(2)]
    started = time.monotonic()
    quorums = run_all([functools.partial(seal, m) for m in members])
    assert time.monotonic() - started >= 1.5
    assert quorums[0].participants == [0, 1]


def test_a_registration_after_the_seal_is_left_out_and_concurrent_sealers_agree(server):
    members = [elastic(server, r, replicas=6, quorum_timeout_s=0.5) for r in range(6)]
    for m in members:
        m.expected = set(range(6))
    quorums = run_all([functools.partial(seal, m) for m in members[:5]])
    assert len({q.to_json() for q in quorums}) == 1  # five sealers, one decision
    late = seal(members[5])
    assert late == quorums[0] and 5 not in late.members


# ------------------------------------------------------------------------------ the commit


def test_commit_is_all_or_none(server):
    quorum = Quorum(3, 0, "h", [0, 1, 2], [], [], 0, True)
    members = [elastic(server, r) for r in range(3)]
    assert run_all([functools.partial(m._commit, quorum, True) for m in members]) == ["commit"] * 3
    failing = Quorum(4, 0, "h", [0, 1, 2], [], [], 0, True)
    outcomes = run_all([functools.partial(m._commit, failing, r != 1) for r, m in enumerate(members)])
    assert outcomes == ["abort"] * 3


def test_a_member_dead_after_its_exchange_does_not_block_the_commit(server):
    PrefixStore("elastic", client(server)).set("hb/2", "1")
    quorum = Quorum(5, 0, "h", [0, 1, 2], [], [], 0, True)
    members = [elastic(server, r, heartbeat_timeout_s=0.5) for r in range(2)]
    assert run_all([functools.partial(m._commit, quorum, True) for m in members]) == ["commit"] * 2


# ---------------------------------------------------- the exchange over a per-quorum group


def tiny(seed: int) -> tuple[nn.Module, DiLoCo]:
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    outer = functools.partial(torch.optim.SGD, lr=1.0, momentum=0.0)
    return model, DiLoCo(model, inner, sync_every=1, outer_optimizer=outer)


def test_a_sender_whose_identity_differs_is_left_out_by_every_owner_and_the_mean_divides_by_the_rest(server):
    """The exchange carries (outer step, state hash): rank 2 claims another hash, so its (huge)
    pseudo-gradient is in no owner's sum, every rank lists it, and the mean is the other two's."""
    pseudos = [torch.full((15,), 1.0), torch.full((15,), 3.0), torch.full((15,), 1000.0)]
    reference = identity(4, "ab" * 32)
    claims = [reference, reference, identity(4, "cd" * 32)]

    def rank(r: int):
        _, diloco = tiny(0)
        group = process_group(client(server), "pg/test", r, 3, connect_timeout_s=10, timeout_s=10)
        return diloco.exchange(group, pseudos[r], True, identity=claims[r], reference=reference)

    exchanges = run_all([functools.partial(rank, r) for r in range(3)])
    for exchange in exchanges:
        assert exchange.error is None and exchange.excluded == [2] and exchange.participants == 2
        assert torch.equal(exchange.mean, torch.full((15,), 2.0))
    assert len(reference) == IDENTITY_BYTES


def test_a_joiner_is_healed_with_the_donors_global_copy_and_momentum_proved_by_hash(server):
    _, donor = tiny(0)
    donor.outer_optimizer = torch.optim.SGD(donor.global_parameters(), lr=0.7, momentum=0.9, nesterov=True)
    for g in donor.global_parameters():
        g.grad = torch.ones_like(g)
    donor.outer_optimizer.step()  # a momentum buffer to carry
    donor.outer_step = 3
    joiner_model, joiner = tiny(1)
    joiner.outer_optimizer = torch.optim.SGD(joiner.global_parameters(), lr=0.7, momentum=0.9, nesterov=True)
    assert joiner.global_state_hash() != donor.global_state_hash()
    quorum = Quorum(9, 3, donor.global_state_hash(), [0], [1], [], 0, False)
    a, b = elastic(server, 0), elastic(server, 1)
    healed, received = run_all([lambda: a._admit(quorum, donor), lambda: b._receive(quorum, joiner)])
    assert healed[0] == [1] and received
    assert joiner.global_state_hash() == donor.global_state_hash() and joiner.outer_step == 3
    assert all(torch.equal(p, g) for p, g in zip(joiner_model.parameters(), donor.global_parameters(), strict=True))
    assert b.healed_to(3) == [1]


def test_a_state_whose_bytes_do_not_match_the_published_hash_is_refused(server, monkeypatch):
    """A link that delivers other bytes than the donor sent (one bit flipped on arrival): the
    joiner's SHA-256 differs from the one the donor published in the store, so nothing is loaded."""
    _, donor = tiny(0)
    _, joiner = tiny(1)
    before = joiner.global_state_hash()
    real = elastic_module.transfer

    def corrupting(group, sends, receives, **kwargs):
        real(group, sends, receives, **kwargs)
        for tensor in receives.values():  # only the joiner receives
            tensor[0] ^= 1

    monkeypatch.setattr(elastic_module, "transfer", corrupting)
    quorum = Quorum(11, 0, donor.global_state_hash(), [0], [1], [], 0, False)
    a, b = elastic(server, 0, connect_timeout_s=2.0), elastic(server, 1)
    healed, received = run_all([lambda: a._admit(quorum, donor), lambda: b._receive(quorum, joiner)])
    assert received is False and healed[0] == []
    assert joiner.global_state_hash() == before  # nothing was loaded


def test_below_min_replicas_the_boundary_waits_then_fails_naming_the_key(server):
    model, diloco = tiny(0)
    member = elastic(server, 0, replicas=2, min_replicas=2, quorum_timeout_s=0.3, timeout_s=1.5)
    member.attach(diloco)
    member.enter(diloco, has_state=True)
    model.weight.data += 1.0
    started = time.monotonic()
    with pytest.raises(ElasticError, match="diloco.min_replicas: 1 of the 2 replicas needed"):
        diloco.step()
    assert 1.5 <= time.monotonic() - started < 10
    member.close()


def test_when_every_replica_restarted_without_state_the_lowest_seeds_and_the_others_are_healed_by_it(server):
    """All three processes died after outer step 1 was committed, before any checkpoint was sealed:
    each comes back with no state of its own (rev -1) and asks to join. Nobody trains, so the
    decision makes replica 0 the donor; it must seed (not take itself for a latecomer) and the two
    others must be healed with its weights, all at the first attempt."""
    members = [elastic(server, r, quorum_timeout_s=0.5) for r in range(3)]
    members[0].store.set("rev", "1")  # the store remembers the committed outer step
    dilocos = [tiny(r)[1] for r in range(3)]
    for member, diloco in zip(members, dilocos, strict=True):
        member.attach(diloco)
    boundaries = run_all(
        [functools.partial(m.enter, d, has_state=False) for m, d in zip(members, dilocos, strict=True)]
    )
    assert [b.role for b in boundaries] == ["seeded", "healed", "healed"]
    assert [b.donor for b in boundaries] == [0, 0, 0] and [b.attempts for b in boundaries] == [1, 1, 1]
    assert boundaries[0].admitted == [1, 2]
    assert len({d.global_state_hash() for d in dilocos}) == 1
    for member in members:
        member.close()
