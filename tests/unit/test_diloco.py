"""trainer.diloco in one process (no torch.distributed): schedule, outer step, codecs, error
feedback, NaN guard, state. Multi-process behaviour lives in tests/integration."""

from __future__ import annotations

import functools
import io

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.integration._diloco_harness import (
    NO_MOMENTUM_SGD,
    make_inner,
    make_model,
    train,
)
from trainer.diloco import (
    COMPRESSIONS,
    QUANT_BLOCK,
    DiLoCo,
    decode,
    encode,
    parameters_hash,
    payload_bytes,
    shard_bounds,
    split_parameters,
)


def _diloco(**kwargs) -> tuple[nn.Module, torch.optim.Optimizer, DiLoCo]:
    model = make_model(seed=0)
    inner = make_inner(model)
    kwargs.setdefault("sync_every", 4)
    return model, inner, DiLoCo(model, inner, **kwargs)


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sync_every": 0}, "sync_every=0"),
        ({"sync_every": 6, "fragments": 4}, "divisible"),
        ({"sync_every": 4, "fragments": 2, "fragment_delay": 2}, "fragment_delay=2"),
        ({"fragment_delay": -1}, "fragment_delay=-1"),
        ({"fragment_alpha": 1.5}, "fragment_alpha=1.5"),
        ({"fragment_alpha": -0.1}, "fragment_alpha=-0.1"),
        ({"compression": "fp8"}, "compression='fp8'"),
        ({"error_feedback": True}, "error_feedback=True"),
        ({"sync_every": 7, "fragments": 7}, "fragments=7"),  # the model has 6 tensors
        ({"group": object()}, "not initialised"),
    ],
)
def test_invalid_settings_raise_value_error_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _diloco(**kwargs)


def test_backend_that_cannot_hold_either_device_is_refused(tmp_path):
    """Gloo runs collectives on CPU tensors only: a backup copy and a model that both live
    elsewhere (here the meta device) must fail loudly, never fall back."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        with torch.device("meta"):
            model = make_model(seed=0)
        with pytest.raises(ValueError, match=r"backup_device='meta'.*'gloo'"):
            DiLoCo(model, make_inner(model), sync_every=4, backup_device="meta")
        cpu_model = make_model(seed=0)  # the same group is fine for CPU tensors
        DiLoCo(cpu_model, make_inner(cpu_model), sync_every=4)
    finally:
        dist.destroy_process_group()


def test_outer_optimizer_must_be_a_factory_over_the_given_parameters():
    model = make_model(seed=0)
    with pytest.raises(TypeError, match="factory"):
        DiLoCo(
            model,
            make_inner(model),
            sync_every=4,
            outer_optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        )
    with pytest.raises(ValueError, match="exactly the parameters it is given"):
        DiLoCo(
            model,
            make_inner(model),
            sync_every=4,
            outer_optimizer=lambda params: torch.optim.SGD(params[:1], lr=1.0),
        )


# ------------------------------------------------------------------------- outer step


def test_one_replica_h1_outer_sgd_lr1_is_plain_inner_training():
    """Acceptance 1. Equal up to fp32 rounding of global - (global - local): about one ulp, no
    drift over 30 steps, while a real outer optimizer (lr 0.7) is visibly different."""
    plain = make_model(seed=0)
    plain_inner = make_inner(plain)
    train(plain, plain_inner, None, start=0, stop=30, data_seed=0)

    model, inner, diloco = _diloco(sync_every=1, outer_optimizer=NO_MOMENTUM_SGD)
    train(model, inner, diloco, start=0, stop=30, data_seed=0)
    assert diloco.outer_step == 30
    for expected, got in zip(plain.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

    damped, damped_inner, damped_diloco = _diloco(
        sync_every=1, outer_optimizer=functools.partial(torch.optim.SGD, lr=0.7)
    )
    train(damped, damped_inner, damped_diloco, start=0, stop=30, data_seed=0)
    assert (damped[0].weight - plain[0].weight).abs().max() > 1e-3


def test_pseudo_gradient_norm_is_of_global_minus_local():
    model, inner, diloco = _diloco(sync_every=1, outer_optimizer=NO_MOMENTUM_SGD)
    global_before = [g.detach().clone() for g in diloco.global_parameters()]
    inputs = torch.ones(2, 6)
    inner.zero_grad()
    model(inputs).sum().backward()
    inner.step()
    expected = torch.cat(
        [(g - p.detach()).reshape(-1) for g, p in zip(global_before, model.parameters(), strict=True)]
    ).norm()
    assert diloco.step()
    assert diloco.last_pseudo_grad_norm == pytest.approx(float(expected), rel=1e-6)
    assert diloco.last_pseudo_grad_norm > 0


def _reference_streaming(model, inner, diloco_like, *, sync_every, fragments, delay, alpha, steps):
    """DiLoCo written out longhand for one replica: a snapshot of each fragment's pseudo-gradient
    tau steps before an outer SGD-Nesterov step, then lerp(global, local, alpha)."""
    groups = [list(diloco_like.fragment_parameters(f)) for f in range(fragments)]
    global_copy = [p.detach().clone().requires_grad_() for p in model.parameters()]
    index_of = {id(p): i for i, p in enumerate(model.parameters())}
    outer = torch.optim.SGD(global_copy, lr=0.7, momentum=0.9, nesterov=True)
    interval = sync_every // fragments
    pending = {}
    for step in range(1, steps + 1):
        train(model, inner, None, start=step - 1, stop=step, data_seed=0)
        if (step + delay) % interval == 0:
            fragment = ((step + delay) // interval - 1) % fragments
            pending[fragment] = [global_copy[index_of[id(p)]].detach() - p.detach() for p in groups[fragment]]
        if step % interval == 0:
            fragment = (step // interval - 1) % fragments
            for p, pseudo in zip(groups[fragment], pending.pop(fragment), strict=True):
                global_copy[index_of[id(p)]].grad = pseudo
            outer.step()
            outer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p in groups[fragment]:
                    g = global_copy[index_of[id(p)]]
                    p.copy_(g + alpha * (p - g) if alpha else g)
    return global_copy


@pytest.mark.parametrize(
    ("fragments", "delay", "alpha"),
    [(1, 0, 0.0), (2, 1, 0.5), (4, 1, 0.0)],
    ids=["plain", "2fragments-delay1-alpha", "4fragments-delay1"],
)
def test_streaming_matches_longhand_reference(fragments, delay, alpha):
    """Acceptance 5 (one replica): fragments=1, tau=0 is plain DiLoCo; streaming applies each
    fragment's pseudo-gradient taken tau steps earlier and mixes by alpha."""
    sync_every, steps = 8, 24
    model, inner, diloco = _diloco(
        sync_every=sync_every, fragments=fragments, fragment_delay=delay, fragment_alpha=alpha
    )
    synced = []
    train(
        model,
        inner,
        diloco,
        start=0,
        stop=steps,
        data_seed=0,
        on_sync=lambda step: synced.append((step + 1, diloco.last_fragment)),
    )
    interval = sync_every // fragments
    assert synced == [(s, (s // interval - 1) % fragments) for s in range(interval, steps + 1, interval)]

    ref_model = make_model(seed=0)
    ref_inner = make_inner(ref_model)
    ref_split = DiLoCo(
        ref_model, make_inner(ref_model), sync_every=sync_every, fragments=fragments
    )  # only to read which tensors form each fragment
    ref_global = _reference_streaming(
        ref_model,
        ref_inner,
        ref_split,
        sync_every=sync_every,
        fragments=fragments,
        delay=delay,
        alpha=alpha,
        steps=steps,
    )
    for got, expected in zip(diloco.global_parameters(), ref_global, strict=True):
        torch.testing.assert_close(got, expected.detach(), rtol=0, atol=1e-6)
    for got, expected in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_fragments_are_contiguous_non_empty_and_cover_the_model_in_order():
    model, _, diloco = _diloco(sync_every=12, fragments=3)
    parts = [diloco.fragment_parameters(f) for f in range(3)]
    assert all(parts)
    assert [id(p) for part in parts for p in part] == [id(p) for p in model.parameters()]


def test_a_fragment_sync_touches_only_that_fragments_global_values():
    model, inner, diloco = _diloco(sync_every=4, fragments=2)
    before = [g.detach().clone() for g in diloco.global_parameters()]
    train(model, inner, diloco, start=0, stop=2, data_seed=0)  # fragment 0 syncs at step 2
    first = len(diloco.fragment_parameters(0))
    changed = [not torch.equal(a, b) for a, b in zip(before, diloco.global_parameters(), strict=True)]
    assert changed == [True] * first + [False] * (len(changed) - first)


# ------------------------------------------------------------------- compression codecs


def _sample(numel: int) -> torch.Tensor:
    """Mixed magnitudes, a zero block and a size that does not fill the last block."""
    generator = torch.Generator().manual_seed(numel)
    values = torch.randn(numel, generator=generator)
    values[:QUANT_BLOCK] *= 1e-4
    values[QUANT_BLOCK : 2 * QUANT_BLOCK] = 0.0
    values[-1] = 50.0
    return values


@pytest.mark.parametrize("numel", [1, 129, 5 * QUANT_BLOCK + 37])
@pytest.mark.parametrize("compression", ["int8", "int4"])
def test_integer_round_trip_within_half_a_step_of_the_block_absmax(compression, numel):
    """Acceptance 6: error <= absmax(block) / (2 * levels), element by element."""
    values = _sample(numel)
    payload = encode(values, compression)
    assert payload.dtype == torch.uint8 and payload.numel() == payload_bytes(numel, compression)
    restored = decode(payload, compression, numel)
    levels = {"int8": 127, "int4": 7}[compression]
    blocks = -(-numel // QUANT_BLOCK)
    padded = torch.nn.functional.pad(values, (0, blocks * QUANT_BLOCK - numel))
    absmax = padded.view(blocks, QUANT_BLOCK).abs().amax(dim=1).repeat_interleave(QUANT_BLOCK)
    bound = absmax[:numel] / (2 * levels) * (1 + 1e-5)
    assert torch.all((restored - values).abs() <= bound)
    if numel > 2 * QUANT_BLOCK:
        assert torch.equal(restored[QUANT_BLOCK : 2 * QUANT_BLOCK], torch.zeros(QUANT_BLOCK))
        # The tiny first block keeps its own scale; one scale shared with the outlier (50.0)
        # would round every one of its values to zero.
        assert torch.count_nonzero(restored[:QUANT_BLOCK]) > QUANT_BLOCK // 2


def test_bf16_round_trip_within_half_a_bf16_ulp_and_none_is_exact():
    values = _sample(300)
    bf16 = decode(encode(values, "bf16"), "bf16", 300)
    assert torch.all((bf16 - values).abs() <= values.abs() * 2.0**-8)
    assert torch.equal(decode(encode(values, "none"), "none", 300), values)


def test_payload_sizes_are_the_compressed_sizes():
    numel = 10_000
    fp32 = payload_bytes(numel, "none")
    assert fp32 == 40_000
    assert payload_bytes(numel, "bf16") == fp32 // 2
    assert payload_bytes(numel, "int8") == numel + 4 * 79  # 79 blocks of 128
    assert payload_bytes(numel, "int4") == numel // 2 + 4 * 79
    for compression in COMPRESSIONS:
        assert encode(torch.randn(numel), compression).numel() == payload_bytes(numel, compression)


def test_decode_rejects_a_payload_of_the_wrong_size():
    payload = encode(torch.randn(300), "int8")
    with pytest.raises(ValueError, match=r"decode\('int8', numel=301\)"):
        decode(payload, "int8", 301)


@pytest.mark.parametrize("compression", ["int8", "int4"])
def test_error_feedback_keeps_the_transmitted_sum_on_the_true_sum(compression):
    """Acceptance 6: small steady pseudo-gradient entries that quantize to zero next to one large
    entry (alternating in sign, so the weights stay near 0 and fp32 rounding stays negligible).
    Without error feedback they are never sent; with it, the sum of what was sent stays within
    half a quantization step of the sum of the true pseudo-gradients."""
    rounds = 200
    direction = torch.full((QUANT_BLOCK,), 1e-3)
    half_step = 1.0 / (2 * {"int8": 127, "int4": 7}[compression])
    errors = {}
    for error_feedback in (False, True):
        model = nn.Linear(QUANT_BLOCK, 1, bias=False)
        inner = torch.optim.SGD(model.parameters(), lr=1.0)
        diloco = DiLoCo(
            model,
            inner,
            sync_every=1,
            outer_optimizer=NO_MOMENTUM_SGD,
            compression=compression,
            error_feedback=error_feedback,
        )
        start = diloco.global_parameters()[0].detach().clone()
        true_sum = torch.zeros(1, QUANT_BLOCK)
        for round_index in range(rounds):
            direction[0] = 1.0 if round_index % 2 == 0 else -1.0
            inner.zero_grad()
            (model.weight * direction).sum().backward()
            inner.step()
            true_sum += diloco.global_parameters()[0].detach() - model.weight.detach()
            diloco.step()
        sent_sum = start - diloco.global_parameters()[0].detach()  # outer SGD lr 1: sum of sends
        errors[error_feedback] = float((sent_sum - true_sum).abs().max())
    assert errors[True] <= half_step * 1.01
    assert errors[False] >= 0.9 * rounds * 1e-3  # the small entries never moved


# ---------------------------------------------------------------------------- NaN guard


def test_non_finite_single_replica_skips_the_outer_step_and_resets_to_global():
    model, inner, diloco = _diloco(sync_every=2)
    train(model, inner, diloco, start=0, stop=2, data_seed=0)
    global_before = [g.detach().clone() for g in diloco.global_parameters()]

    def poison(step: int) -> None:
        if step == 3:
            with torch.no_grad():
                model[0].weight[0, 0] = float("inf")

    train(model, inner, diloco, start=2, stop=4, data_seed=0, after_inner=poison)
    assert diloco.outer_step == 2 and diloco.last_participants == 0
    assert diloco.last_pseudo_grad_norm == 0.0
    for before, after, local in zip(global_before, diloco.global_parameters(), model.parameters(), strict=True):
        assert torch.equal(after, before)
        assert torch.equal(local, after)
    assert inner.state.get(model[0].weight, {}) == {}
    train(model, inner, diloco, start=4, stop=6, data_seed=0)
    assert diloco.last_participants == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_reset_share_drops_the_inner_optimizer_state_of_the_parameters_its_views_cut():
    """A replica of S processes syncs views (`split_parameters` shares; FSDP's `to_local()` shards
    are views in the same way): the AdamW state to drop after a non-finite reset is keyed by the
    parameter, not the view, and only the parameters the share touches lose theirs."""
    model = make_model(seed=0)
    inner = make_inner(model)
    parameters = [p for p in model.parameters() if p.requires_grad]
    share = split_parameters(parameters, 2)[1]  # the second half: part of layer 2's weight onwards
    diloco = DiLoCo(model, inner, sync_every=2, parameters=share)
    train(model, inner, diloco, start=0, stop=1, data_seed=0)
    assert all(inner.state.get(p) for p in parameters)  # AdamW has moments for every parameter

    def poison(step: int) -> None:  # after AdamW, before the sync: the last bias, through the view
        with torch.no_grad():
            share[-1][0] = float("nan")

    train(model, inner, diloco, start=1, stop=2, data_seed=0, after_inner=poison)  # the sync resets the share
    touched = {id(p) for p in parameters if any(v.untyped_storage().data_ptr() == p.data_ptr() for v in share)}
    assert 0 < len(touched) < len(parameters)
    for parameter in parameters:
        assert (inner.state.get(parameter, {}) == {}) == (id(parameter) in touched), parameter.shape
    assert all(bool(torch.isfinite(p).all()) for p in parameters)


# ---------------------------------------------------------------------------- state, hash


def test_state_dict_round_trips_through_torch_save_and_resumes_bit_exactly():
    config = {
        "sync_every": 4,
        "fragments": 2,
        "fragment_delay": 1,
        "compression": "int4",
        "error_feedback": True,
    }
    straight, straight_inner, straight_diloco = _diloco(**config)
    train(straight, straight_inner, straight_diloco, start=0, stop=16, data_seed=0)

    model, inner, diloco = _diloco(**config)
    train(model, inner, diloco, start=0, stop=8, data_seed=0)
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "inner": inner.state_dict(), "diloco": diloco.state_dict()},
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed, resumed_inner, resumed_diloco = _diloco(**config)
    resumed.load_state_dict(saved["model"])
    resumed_inner.load_state_dict(saved["inner"])
    resumed_diloco.load_state_dict(saved["diloco"])
    train(resumed, resumed_inner, resumed_diloco, start=8, stop=16, data_seed=0)
    assert parameters_hash(resumed) == parameters_hash(straight)
    assert parameters_hash(resumed_diloco.global_parameters()) == parameters_hash(straight_diloco.global_parameters())
    assert resumed_diloco.outer_step == straight_diloco.outer_step == 8


def test_state_dict_refuses_while_an_exchange_is_in_flight():
    model, inner, diloco = _diloco(sync_every=4, fragment_delay=2)
    train(model, inner, diloco, start=0, stop=2, data_seed=0)  # launched at step 2, due at 4
    with pytest.raises(RuntimeError, match="still being exchanged"):
        diloco.state_dict()


def test_load_state_dict_names_the_mismatched_setting():
    _, _, saved_from = _diloco(compression="int8")
    _, _, target = _diloco(compression="bf16")
    with pytest.raises(ValueError, match=r"settings\['compression'\] is 'int8'"):
        target.load_state_dict(saved_from.state_dict())


def test_parameters_hash_is_stable_and_sensitive_to_one_ulp():
    model = make_model(seed=0)
    twin = make_model(seed=0)
    assert parameters_hash(model) == parameters_hash(twin) == parameters_hash(twin.parameters())
    with torch.no_grad():
        weight = twin[0].weight
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(1.0))
    assert parameters_hash(model) != parameters_hash(twin)


# ------------------------------------------------------------- shards, accounting, timeout


@pytest.mark.parametrize(("numel", "world"), [(10_000, 2), (10_000, 4), (5 * QUANT_BLOCK + 37, 3), (129, 4), (0, 2)])
def test_shards_are_block_aligned_contiguous_and_cover_the_vector(numel, world):
    bounds = shard_bounds(numel, world)
    assert len(bounds) == world
    assert [i for b in bounds for i in b] == list(range(numel))
    assert all(b.start % QUANT_BLOCK == 0 for b in bounds if len(b))
    blocks = [-(-len(b) // QUANT_BLOCK) for b in bounds]
    assert max(blocks) - min(blocks) <= 1  # near-equal: no replica owns much more than another


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_empty_shards_encode_to_nothing_and_back(compression):
    """A fragment with fewer blocks than replicas leaves some owners an empty shard."""
    payload = encode(torch.zeros(0), compression)
    assert payload.numel() == payload_bytes(0, compression) == 0
    assert decode(payload, compression, 0).numel() == 0


def test_a_single_replica_sends_and_receives_nothing_and_times_its_exchanges():
    model, inner, diloco = _diloco(sync_every=2, compression="int8", error_feedback=True)
    train(model, inner, diloco, start=0, stop=8, data_seed=0)
    assert diloco.outer_step == 4
    assert diloco.bytes_sent == diloco.bytes_received == 0  # nothing is sent to oneself
    # tau = 0: the exchange (encode, owner sum, re-encode, decode) runs inside step(), blocked.
    assert diloco.communication_seconds > 0 and diloco.last_exchange_seconds > 0
    assert diloco.compute_seconds > 0  # the inner steps between calls


def test_timeout_must_be_positive_and_is_named():
    for bad in (0, -1.0, "60", True):
        with pytest.raises(ValueError, match=r"timeout_s="):
            _diloco(timeout_s=bad)


def test_split_parameters_cuts_the_flat_parameters_into_equal_shares_of_views():
    from trainer.diloco import split_parameters

    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))  # 15 + 5 + 10 + 2 = 32 elements
    shares = split_parameters(list(model.parameters()), 3)
    assert [sum(t.numel() for t in share) for share in shares] == [10, 11, 11]
    flat = torch.cat([t.reshape(-1) for share in shares for t in share])
    assert torch.equal(flat, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    with torch.no_grad():
        shares[1][0].fill_(7.0)  # a share is a view: writing it writes the model
    assert (model[0].weight.reshape(-1)[10:15] == 7.0).all()
    with pytest.raises(ValueError, match="cannot fill"):
        split_parameters([torch.zeros(2)], 3)
