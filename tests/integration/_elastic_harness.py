"""One elastic DiLoCo replica on the shared test workload (tests.integration._diloco_harness: the
tiny MLP, deterministic batches), as its own OS process, and the pure-tensor reference of a run.

    python -m tests.integration._elastic_harness --port P --id I --replicas N --rounds R --out DIR
        [--die-at-step S] [--join-after-step K] [--sleep SECONDS]

The process is a client of the TCPStore the test hosts on 127.0.0.1:P (the lighthouse). After every
round boundary it saves what it holds (`boundary-<id>-<rev>.pt`: role, global copy, outer momentum,
model); `--die-at-step` SIGKILLs it at that global inner step (a replica that dies mid-round);
`--join-after-step` makes it a newcomer, started with other weights, that waits until outer step K
is committed and then asks to be admitted (a restarted container). `reference` replays a run's
membership on plain tensors in one process: the same arithmetic with no process group at all.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn
from torch.distributed import PrefixStore, TCPStore

from tests.integration._diloco_harness import make_batch, make_inner, make_model
from trainer.diloco import DiLoCo
from trainer.elastic import ElasticDiLoCo

SYNC_EVERY = 4
OUTER = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)


def inner_step(model: nn.Module, inner: torch.optim.Optimizer, replica: int, step: int) -> None:
    inputs, targets = make_batch(replica, step)
    inner.zero_grad()
    nn.functional.mse_loss(model(inputs), targets).backward()
    inner.step()


def momentum(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [optimizer.state.get(p, {}).get("momentum_buffer", torch.zeros_like(p)).detach().clone() for p in params]


def replica_main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s replica {args.id}: %(message)s")

    def connect() -> TCPStore:
        return TCPStore("127.0.0.1", args.port, is_master=False, timeout=timedelta(seconds=60))

    model = make_model(seed=0 if args.join_after_step is None else 1000 + args.id)
    inner = make_inner(model)
    diloco = DiLoCo(model, inner, sync_every=SYNC_EVERY, outer_optimizer=OUTER, compression=args.compression)
    # Everyone starts once every process of the scenario is up (process start-up on a loaded
    # machine takes seconds, a round a fraction of one), so the membership is the scenario's.
    test = PrefixStore("test", connect())
    test.add("ready", 1)
    while int(test.add("ready", 0)) < args.processes:
        time.sleep(0.01)
    if args.join_after_step is not None:  # a newcomer says nothing (no heartbeat either) before it asks
        waiting = PrefixStore("elastic", connect())
        while not waiting.check([f"committed/{args.join_after_step}"]):
            time.sleep(0.01)
    elastic = ElasticDiLoCo(
        connect(),
        args.id,
        replicas=args.replicas,
        quorum_timeout_s=args.quorum_timeout,
        heartbeat_s=0.2,
        heartbeat_timeout_s=args.heartbeat_timeout,
        timeout_s=60.0,
        connect_timeout_s=10.0,
        connect=connect,
    )
    elastic.attach(diloco)
    out = Path(args.out)

    def save(role: str) -> None:
        globals_ = [g.detach().clone() for g in diloco.global_parameters()]
        record = {
            "role": role,
            "rev": diloco.outer_step,
            "global": globals_,
            "momentum": momentum(diloco.outer_optimizer, diloco.global_parameters()),
            "model": [p.detach().clone() for p in model.parameters()],
            "boundary": vars(elastic.last) if elastic.last is not None else None,
        }
        torch.save(record, out / f"boundary-{args.id}-{diloco.outer_step}.pt")

    boundary = elastic.enter(diloco, has_state=args.join_after_step is None)
    if boundary is not None:
        save(boundary.role)
    while diloco.outer_step < args.rounds:
        rev = diloco.outer_step
        for step in range(rev * SYNC_EVERY, (rev + 1) * SYNC_EVERY):
            if step == args.die_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            inner_step(model, inner, args.id, step)
            time.sleep(args.sleep)
            if diloco.step():
                save(elastic.last.role)
    (out / f"done-{args.id}").write_text(str(diloco.outer_step))
    elastic.close()
    os._exit(0)  # parked groups of abandoned exchanges must not block the exit


def reference(rounds: int, schedule: dict[int, list[int]], healed: dict[int, int]) -> list[dict]:
    """Elastic DiLoCo on plain tensors, one process, no group: `schedule[s]` are the replicas
    averaged into outer step s (id order), `healed[r]` the outer step whose global state replica r
    received (its model becomes the global copy, its inner AdamW starts afresh). Returns, per
    outer step s = 1..rounds, the global copy and the outer momentum after it."""
    torch.set_num_threads(1)
    models = {r: make_model(seed=0) for r in schedule[1]}
    inners = {r: make_inner(m) for r, m in models.items()}
    globals_ = [nn.Parameter(p.detach().clone()) for p in models[schedule[1][0]].parameters()]
    outer = OUTER(globals_)
    states = []
    for step in range(1, rounds + 1):
        for replica, rev in healed.items():  # admitted with outer step rev's state: trains round rev + 1
            if rev == step - 1:
                models[replica] = make_model(seed=1000 + replica)
                with torch.no_grad():
                    for local, g in zip(models[replica].parameters(), globals_, strict=True):
                        local.copy_(g)
                inners[replica] = make_inner(models[replica])
        pseudo = {}
        for replica in schedule[step]:
            for inner_index in range((step - 1) * SYNC_EVERY, step * SYNC_EVERY):
                inner_step(models[replica], inners[replica], replica, inner_index)
            with torch.no_grad():
                local = models[replica].parameters()
                pseudo[replica] = torch.cat([(g - p).reshape(-1) for g, p in zip(globals_, local, strict=True)])
        total = torch.zeros_like(next(iter(pseudo.values())))
        for replica in schedule[step]:  # the owner's reduction: fp32, in rank (= id) order
            total += pseudo[replica]
        mean = total / len(schedule[step])
        offset = 0
        for g in globals_:
            g.grad = mean[offset : offset + g.numel()].view_as(g)
            offset += g.numel()
        outer.step()
        for g in globals_:
            g.grad = None
        with torch.no_grad():
            for replica in schedule[step]:
                for local, g in zip(models[replica].parameters(), globals_, strict=True):
                    local.copy_(g)
        states.append({"global": [g.detach().clone() for g in globals_], "momentum": momentum(outer, globals_)})
    return states


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--id", type=int, required=True)
    parser.add_argument("--replicas", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--die-at-step", type=int)
    parser.add_argument("--join-after-step", type=int)
    parser.add_argument("--sleep", type=float, default=0.15)
    parser.add_argument("--processes", type=int, default=1, help="processes of the scenario (all start together)")
    parser.add_argument("--quorum-timeout", type=float, default=20.0)
    parser.add_argument("--heartbeat-timeout", type=float, default=1.5)
    parser.add_argument("--compression", default="none")
    replica_main(parser.parse_args())


if __name__ == "__main__":
    main()
