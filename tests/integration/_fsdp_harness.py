"""Two ranks of one replica (torchrun, Gloo), one tiny model sharded over them: what the ranks of
a sharded replica must do in step, and what they may do on their own. Writes rank<k>.json into
the folder given; tests/integration/test_fsdp.py reads them.

    torchrun --standalone --nproc-per-node=2 tests/integration/_fsdp_harness.py OUT_DIR
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import threading
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from trainer.model import tiny_model_and_tokenizer
from trainer.rollout.sampling import sample
from trainer.run.sharding import WeightPushTimeout, full_weights, push_weights, shard, unsharded


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    plain, tokenizer = tiny_model_and_tokenizer(seed=0, cache_dir=out / f"tok{rank}")
    sharded = shard(copy.deepcopy(plain), DeviceMesh.from_group(dist.group.WORLD, "cpu"))
    record: dict = {"rank": rank}

    # Full weights, one group at a time: the same tensors in the same order on both ranks.
    digest = hashlib.sha256()
    names = []
    for name, tensor in full_weights(sharded):
        names.append(name)
        digest.update(name.encode() + tensor.contiguous().view(torch.uint8).numpy().tobytes())
    plain_digest = hashlib.sha256()
    for name in names:
        tensor = dict(plain.named_parameters())[name].detach()
        plain_digest.update(name.encode() + tensor.contiguous().view(torch.uint8).numpy().tobytes())
    record.update(weights_digest=digest.hexdigest(), plain_digest=plain_digest.hexdigest(), weights=len(names))

    # Sampling: different prompts and a different number of tokens and calls on each rank.
    prompts = [[tokenizer.encode("What is 12 + 7?")], [tokenizer.encode("2 + 2 ="), tokenizer.encode("Add 10 and 25.")]]
    lengths = [3, 11]
    got, expected = [], []
    with unsharded(sharded):
        for call in range(rank + 1):  # rank 1 generates twice
            torch.manual_seed(10 * rank + call)
            got.append(sample(sharded, tokenizer, prompts[rank], max_new_tokens=lengths[rank], temperature=1.0))
    for call in range(rank + 1):
        torch.manual_seed(10 * rank + call)
        expected.append(sample(plain, tokenizer, prompts[rank], max_new_tokens=lengths[rank], temperature=1.0))
    record["samples_equal"] = all(
        torch.equal(a.completion_ids, b.completion_ids) for a, b in zip(got, expected, strict=True)
    )
    record["sample_width"] = got[0].completion_ids.shape[1]
    # ... and training afterwards still pairs every gather: one step on each rank's own row.
    ids = torch.tensor([tokenizer.encode("What is 3 + 4? 7")])
    sharded(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad.full_tensor() for p in sharded.parameters()]
    record["grad_norm"] = float(torch.stack([g.norm() for g in grads]).norm())

    # A push to an engine that stops reading at the last tensor: the pushing rank raises at its
    # deadline; the other rank has taken part in every gather and returns.
    stuck = threading.Event()

    def engine(name: str, tensor: torch.Tensor) -> None:
        if name == names[-1]:
            stuck.wait(60)

    try:
        record["pushed"] = push_weights(sharded, engine, timeout_s=2.0, receiver=rank == 0)
    except WeightPushTimeout as error:
        record["push_error"] = str(error)
    stuck.set()
    dist.barrier()
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
