"""trainer.plan: the model's shape from a config file in the repository (no download), the bytes
per rank it adds up, and its activation model against a MemTracker measurement."""

from __future__ import annotations

import json

import pytest
import torch

from tests.support.paths import REPO
from trainer.config import load_config
from trainer.plan import GIB, activation_bytes, main, model_shape, plan

MODELS = REPO / "configs" / "models"
LLAMA = REPO / "configs" / "llama3-8b.yaml"


@pytest.mark.parametrize(
    ("model", "published"),
    [
        ("llama3-8b", 8_030_261_248),
        ("qwen2.5-0.5b", 494_032_768),
        ("qwen2.5-1.5b", 1_543_714_304),
        ("qwen2.5-7b", 7_615_616_512),
        ("qwen2.5-32b", 32_763_876_352),
    ],
)
def test_the_shapes_in_the_repository_have_the_published_parameter_counts(model, published):
    shape = model_shape(load_config(LLAMA, [f"model.name={MODELS / model}"]))
    assert shape.parameters == published
    assert len(shape.groups) == shape.layers + 1  # the root, then one FSDP group per decoder layer


def test_llama3_8b_fits_80_gib_per_gpu_with_activation_checkpointing_and_not_without():
    config = load_config(LLAMA)
    assert (config.replica_size, config.parallel.sharding, config.model.dtype) == (8, "fsdp", "bfloat16")
    shape = model_shape(config)
    on = plan(config, shape=shape)
    off = plan(load_config(LLAMA, ["parallel.activation_checkpointing=false"]), shape=shape)
    assert on["fits"] and not off["fits"]
    assert off["training"]["activations"] > 2 * on["training"]["activations"]
    # fp32 master shards, gradients and AdamW: 16 bytes a parameter over 8 ranks (+ FSDP's padding)
    states = sum(on["device"][k] for k in ("parameters", "gradients", "adamw"))
    assert states == pytest.approx(16 * 8_030_261_248 / 8, rel=1e-3)
    # DiLoCo's global copy, momentum and int8 error feedback stay in host memory: 16 bytes a parameter / 8
    assert set(on["host"]) == {"diloco_global", "diloco_momentum", "diloco_error_feedback", "diloco_exchange"}
    assert on["host"]["diloco_global"] + on["host"]["diloco_momentum"] == pytest.approx(8 * 8_030_261_248 / 8, 1e-3)


def test_sharding_divides_the_model_states_by_the_ranks_and_unsharded_ranks_hold_the_whole_model():
    config = load_config(REPO / "configs" / "test.yaml", ["model.hidden_size=64", "model.num_layers=2"])
    shape = model_shape(config)
    sharded = load_config(REPO / "configs" / "test.yaml", ["model.hidden_size=64", "model.num_layers=2"])
    sharded.parallel.sharding = "fsdp"
    for ranks in (2, 4):
        whole, split = plan(config, ranks=ranks, shape=shape), plan(sharded, ranks=ranks, shape=shape)
        one = plan(sharded, ranks=1, shape=shape)
        assert whole["device"]["adamw"] == 8 * shape.parameters  # every rank holds it all
        assert split["device"]["adamw"] == pytest.approx(one["device"]["adamw"] / ranks, rel=0.02)  # padding
        # either way DiLoCo's global copy is this rank's share only
        assert whole["host"]["diloco_global"] == pytest.approx(4 * shape.parameters / ranks, rel=0.02)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_activation_model_is_within_ten_percent_of_what_mem_tracker_measures(checkpointing):
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
    from transformers import Qwen2ForCausalLM

    from trainer.model import tiny_config
    from trainer.run.sharding import checkpoint_activations

    config = load_config(REPO / "configs" / "test.yaml", ["model.hidden_size=128", "model.num_layers=3"])
    shape = model_shape(config)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_config(None, hidden_size=128, num_layers=3, num_heads=2, vocab_size=400)).train()
    if checkpointing:
        checkpoint_activations(model)
    peak = [0]

    class Tracker(MemTracker):
        def _update_peak_stats(self, state) -> None:
            super()._update_peak_stats(state)
            for snap in self._curr_mem_snap.values():
                peak[0] = max(peak[0], snap.get(_MemRefType.ACT, 0) + snap.get(_MemRefType.TEMP, 0))

    ids = torch.randint(0, 400, (2, 256), generator=torch.Generator().manual_seed(0))
    tracker = Tracker()
    tracker.track_external(model)
    with tracker:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    planned = activation_bytes(shape, tokens=512, logit_tokens=512, compute_bytes=4, checkpointing=checkpointing)
    assert planned == pytest.approx(peak[0], rel=0.10)


def test_the_command_prints_the_plan_as_json_from_the_repository_alone(capsys):
    assert main([str(LLAMA), "--json", "--device-gib", "40"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["parameters"] == 8_030_261_248 and printed["ranks"] == 8
    assert printed["device_gib"] == 40 and printed["fits"] == (printed["device_peak"] <= 40 * GIB)


def test_the_table_covers_every_model_at_every_rank_count_with_checkpointing_off_and_on(capsys):
    models = [str(MODELS / "qwen2.5-0.5b"), str(MODELS / "llama3-8b")]
    assert main([str(LLAMA), "--table", *models, "--table-ranks", "1", "8"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| qwen") or "| llama" in line]
    assert len(rows) == 2 * 2 * 2
    assert rows[-1].startswith("| llama3-8b | 8.03 B | 8 | on |") and rows[-1].endswith("| yes |")
    assert rows[4].startswith("| llama3-8b | 8.03 B | 1 | off |") and rows[4].endswith("| no |")
