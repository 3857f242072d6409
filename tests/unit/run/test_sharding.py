"""trainer.run.sharding in one process (a replica of one rank, a process group of one): what the
sharded model hands out (full weights, a push with a deadline, hashes) and the unsharded context.
Two-rank behaviour (gathers in step, different forwards per rank) is in tests/integration/test_fsdp.py."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from trainer.diloco import parameters_hash
from trainer.model import tiny_model_and_tokenizer
from trainer.rollout.sampling import sample
from trainer.run.sharding import (
    WeightPushTimeout,
    full_parameters_hash,
    full_weights,
    is_sharded,
    local_shards,
    push_weights,
    shard,
    unsharded,
)


@pytest.fixture
def mesh():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield DeviceMesh.from_group(dist.group.WORLD, "cpu")
    dist.destroy_process_group()


@pytest.fixture
def models(mesh, tmp_path):
    """(plain, sharded): the same tiny tied Qwen2, once as it is and once sharded."""
    plain, tokenizer = tiny_model_and_tokenizer(seed=0, cache_dir=tmp_path)
    sharded = shard(copy.deepcopy(plain), mesh)
    return plain, sharded, tokenizer


def test_full_weights_are_the_models_parameters_group_by_group_tied_ones_once(models):
    plain, sharded, _ = models
    gathered = list(full_weights(sharded))
    expected = dict(plain.named_parameters())
    names = [name for name, _ in gathered]
    assert sorted(names) == sorted(expected) and len(names) == len(set(names))
    assert "lm_head.weight" not in names  # tied to the embedding: sent once
    # the root's own (embedding, final norm) first, then one decoder layer after the other
    assert names[:2] == ["model.embed_tokens.weight", "model.norm.weight"]
    layers = [int(name.split(".")[2]) for name in names[2:]]
    assert layers == sorted(layers)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in gathered)
    assert all(isinstance(p, DTensor) for p in sharded.parameters())  # every group resharded afterwards
    assert [name for name, _ in full_weights(plain)] == list(expected)


def test_the_full_hash_of_a_sharded_model_is_the_unsharded_models_hash(models):
    plain, sharded, _ = models
    assert full_parameters_hash(sharded) == parameters_hash(plain) == full_parameters_hash(plain)


def test_local_shards_alias_the_sharded_parameters(models):
    _, sharded, _ = models
    shards = local_shards(sharded)
    with torch.no_grad():
        shards[0].add_(1.0)
    first = next(p for p in sharded.parameters() if p.requires_grad)
    assert torch.equal(first.full_tensor(), shards[0])  # a write to the view is a write to the model


def test_a_push_that_outlives_its_deadline_raises_naming_the_tensor(models):
    _, sharded, _ = models
    release = threading.Event()
    received = []

    def slow(name, tensor):
        received.append(name)
        if len(received) == 2:
            release.wait(30)  # an engine that stopped reading

    with pytest.raises(WeightPushTimeout, match="pushing model.norm.weight to the inference engine did not finish"):
        push_weights(sharded, slow, timeout_s=0.5)
    release.set()
    assert is_sharded(sharded) and all(isinstance(p, DTensor) for p in sharded.parameters())


def test_a_push_hands_every_tensor_once_and_a_failing_engine_raises_its_error(models):
    plain, sharded, _ = models
    received = {}
    assert push_weights(sharded, received.__setitem__, timeout_s=60) == len(list(plain.parameters()))
    assert received.keys() == dict(plain.named_parameters()).keys()
    assert push_weights(sharded, received.__setitem__, timeout_s=60, receiver=False) == 0

    def broken(name, tensor):
        raise ConnectionError("engine gone")

    with pytest.raises(ConnectionError, match="engine gone"):
        push_weights(sharded, broken, timeout_s=60)


def test_generation_inside_the_unsharded_context_matches_the_plain_model_and_leaves_it_sharded(models):
    plain, sharded, tokenizer = models
    prompts = [tokenizer.encode("What is 12 + 7?"), tokenizer.encode("2 + 2")]
    torch.manual_seed(3)
    expected = sample(plain, tokenizer, prompts, max_new_tokens=5, temperature=1.0)
    with unsharded(sharded, None):
        assert not any(isinstance(p, DTensor) for p in sharded.parameters())  # gathered once, plain tensors
        torch.manual_seed(3)
        got = sample(sharded, tokenizer, prompts, max_new_tokens=5, temperature=1.0)
    assert torch.equal(got.completion_ids, expected.completion_ids)
    assert torch.equal(got.sampler_logps, expected.sampler_logps)
    assert all(isinstance(p, DTensor) for p in sharded.parameters())  # and resharded on the way out
    with unsharded(plain):  # unsharded models: nothing to do
        pass
