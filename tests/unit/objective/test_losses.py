"""Pure-math tests of `trainer.losses`: every expected value is written out by hand below."""

import math

import pytest
import torch

from trainer.objective.losses import (
    compose_loss,
    dpo_loss,
    group_advantages,
    grpo_loss,
    rollout_correction,
    route_sdpo_on_failures,
    sdpo_loss,
    sdpo_token_loss,
    sequence_logps,
    token_logps,
)

LN2 = math.log(2)


def close(actual, expected, tol=1e-6):
    assert actual.item() == pytest.approx(expected, abs=tol)


def close_all(actual, expected, tol=1e-6):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=tol, rtol=0)


# ---------------------------------------------------------------------------- group_advantages


REWARDS = torch.tensor([1.0, 0.0, 3.0, 3.0, 0.0, 2.0])  # three groups of two


def test_group_advantages_none_is_mean_centred_per_group():
    assert group_advantages(REWARDS, 2).tolist() == [0.5, -0.5, 0.0, 0.0, -1.0, 1.0]


def test_group_advantages_group_scale_divides_by_bessel_std_plus_eps():
    eps = 1e-4
    adv = group_advantages(REWARDS, 2, scale="group", eps=eps)
    std_01 = math.sqrt((0.5**2 + 0.5**2) / 1)  # group (1, 0)
    std_02 = math.sqrt((1.0**2 + 1.0**2) / 1)  # group (0, 2)
    expected = [0.5 / (std_01 + eps), -0.5 / (std_01 + eps), 0.0, 0.0, -1 / (std_02 + eps), 1 / (std_02 + eps)]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)


def test_group_advantages_batch_scale_divides_by_whole_batch_std():
    eps = 1e-4
    adv = group_advantages(REWARDS, 2, scale="batch", eps=eps)
    # mean 1.5; squared deviations .25 2.25 2.25 2.25 2.25 .25 -> 9.5, Bessel /5
    std = math.sqrt(9.5 / 5)
    expected = [v / (std + eps) for v in (0.5, -0.5, 0.0, 0.0, -1.0, 1.0)]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(group_size=4), "not a multiple of group_size=4"),
        (dict(group_size=1, scale="group"), "group_size >= 2"),
        (dict(group_size=2, scale="std"), "scale='std'"),
    ],
)
def test_group_advantages_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(REWARDS, **kwargs)


# ---------------------------------------------------------------------------- grpo_loss

# Ratios chosen by hand (old_logp = 0, so logp = log ratio); row 1's last token is padding.
RATIOS = [[1.0, 1.5, 0.5], [0.9, 1.3, 2.0]]
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ADV = torch.tensor([1.0, -1.0])
# eps 0.2. Row 0 (A=+1): -min(r, clip r) = -1, -1.2, -0.5 -> sum -2.7 over 3 tokens.
# Row 1 (A=-1): max(r, clip r) = 0.9, 1.3 -> sum 2.2 over 2 tokens.
ROW_SUMS, ROW_LENGTHS = (-2.7, 2.2), (3, 2)


def grpo_inputs():
    logp = torch.tensor(RATIOS).log()
    old = torch.zeros(2, 3)
    old[1, 2] = float("-inf")  # padding may hold anything; it must not leak into the loss
    return logp, old


@pytest.mark.parametrize(
    "loss_type, kwargs, expected",
    [
        ("grpo", {}, (-2.7 / 3 + 2.2 / 2) / 2),
        ("bnpo", {}, (-2.7 + 2.2) / 5),
        ("dr_grpo", {}, (-2.7 + 2.2) / (2 * 3)),
        ("dr_grpo", {"max_completion_length": 10}, (-2.7 + 2.2) / (2 * 10)),
        ("dapo", {}, (-2.7 + 2.2) / 5),
        ("dapo", {"num_items_in_batch": 20}, (-2.7 + 2.2) / 20),
    ],
)
def test_grpo_loss_every_aggregation(loss_type, kwargs, expected):
    logp, old = grpo_inputs()
    close(grpo_loss(logp, old, ADV, MASK, loss_type=loss_type, **kwargs), expected)


def test_grpo_loss_asymmetric_clip_uses_epsilon_high():
    logp, old = grpo_inputs()
    # eps_high 0.6: row 0's ratio 1.5 is no longer clipped (-1.5 instead of -1.2): sum -3.0.
    loss = grpo_loss(logp, old, ADV, MASK, loss_type="bnpo", epsilon_high=0.6)
    close(loss, (-3.0 + 2.2) / 5)


def test_grpo_loss_gradient_is_zero_where_clipped():
    logp, old = grpo_inputs()
    logp.requires_grad_(True)
    grpo_loss(logp, old, ADV, MASK, loss_type="bnpo").backward()
    # d/dlogp of -A * r is -A * r / 5 where unclipped; 0 where the clipped branch wins.
    expected = [[-1.0 / 5, 0.0, -0.5 / 5], [0.9 / 5, 1.3 / 5, 0.0]]
    close_all(logp.grad, expected)


def test_grpo_loss_on_policy_when_old_logp_is_none():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    loss = grpo_loss(logp, None, torch.tensor([2.0, -1.0]), torch.ones(2, 2), loss_type="bnpo")
    close(loss, (-2.0 * 2 + 1.0 * 2) / 4)  # ratio is 1 in value
    loss.backward()
    close_all(logp.grad, [[-0.5, -0.5], [0.25, 0.25]])  # -A / 4


def test_dr_grpo_token_gradient_does_not_depend_on_sequence_length():
    # Same advantage, one short and one long sequence: every real token gets -A / (B * T).
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    adv = torch.tensor([1.0, 1.0])
    logp = torch.full((2, 4), -1.0, requires_grad=True)
    grpo_loss(logp, None, adv, mask, loss_type="dr_grpo").backward()
    close_all(logp.grad, [[-1 / 8, 0, 0, 0], [-1 / 8] * 4])
    # ...whereas "grpo" averages per sequence: the short sequence's token weighs 4x more.
    logp.grad = None
    grpo_loss(logp, None, adv, mask, loss_type="grpo").backward()
    close_all(logp.grad, [[-1 / 2, 0, 0, 0], [-1 / 8] * 4])


def test_grpo_loss_k3_kl_penalty():
    # On-policy, A = 1 everywhere: pg = -1 per token. d = ref - logp:
    # k3(ln 2) = 2 - ln2 - 1, k3(0) = 0, k3(-ln 2) = 1/2 + ln2 - 1.
    logp = torch.zeros(2, 2)
    ref = torch.tensor([[LN2, 0.0], [0.0, -LN2]])
    loss = grpo_loss(logp, None, torch.ones(2), torch.ones(2, 2), loss_type="bnpo", ref_logp=ref, kl_beta=0.1)
    close(loss, -1 + 0.1 * ((1 - LN2) + (LN2 - 0.5)) / 4)


@pytest.mark.parametrize("bias_correction, factor", [(True, 2.0), (False, 1.0)])
def test_grpo_loss_kl_bias_correction_multiplies_by_ratio(bias_correction, factor):
    # ratio = exp(0 - (-ln2)) = 2, A = 0 (no policy-gradient term), k3(ln2 - 0) = 1 - ln2.
    loss = grpo_loss(
        torch.zeros(1, 1),
        torch.tensor([[-LN2]]),
        torch.zeros(1),
        torch.ones(1, 1),
        loss_type="bnpo",
        ref_logp=torch.tensor([[LN2]]),
        kl_beta=0.1,
        kl_bias_correction=bias_correction,
    )
    close(loss, 0.1 * (1 - LN2) * factor)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss_type="ppo"), "loss_type='ppo'"),
        (dict(kl_beta=0.1), "needs ref_logp"),
        (dict(loss_type="dr_grpo", max_completion_length=2), "max_completion_length=2"),
    ],
)
def test_grpo_loss_rejects_bad_arguments(kwargs, message):
    logp, old = grpo_inputs()
    with pytest.raises(ValueError, match=message):
        grpo_loss(logp, old, ADV, MASK, **kwargs)


def test_grpo_loss_names_the_misshapen_tensor():
    logp, old = grpo_inputs()
    with pytest.raises(ValueError, match="advantages has shape"):
        grpo_loss(logp, old, torch.ones(3), MASK)


# ---------------------------------------------------------------------------- sdpo_loss

# Token 0: S = (.5, .5), T = (.8, .2); token 1: S = (.9, .1), T = (.3, .7); token 2 is masked out.
S0, T0, S1, T1 = (0.5, 0.5), (0.8, 0.2), (0.9, 0.1), (0.3, 0.7)


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def jsd(s, t, alpha):
    m = [(1 - alpha) * si + alpha * ti for si, ti in zip(s, t, strict=True)]
    return alpha * kl(t, m) + (1 - alpha) * kl(s, m)


def divergence(s, t, alpha):
    return kl(t, s) if alpha == 0 else kl(s, t) if alpha == 1 else jsd(s, t, alpha)


def two_token_logits():
    student = torch.tensor([[S0, S1, (0.01, 0.99)]]).log()
    teacher = torch.tensor([[T0, T1, (0.99, 0.01)]]).log() + 3.0  # logits need not be normalized
    return student, teacher, torch.tensor([[1, 1, 0]])


@pytest.mark.parametrize(
    "alpha, expected",
    [
        (0.0, (kl(T0, S0) + kl(T1, S1)) / 2),
        (1.0, (kl(S0, T0) + kl(S1, T1)) / 2),
        (0.5, (jsd(S0, T0, 0.5) + jsd(S1, T1, 0.5)) / 2),
        (0.25, (jsd(S0, T0, 0.25) + jsd(S1, T1, 0.25)) / 2),
    ],
)
def test_sdpo_loss_every_alpha_branch(alpha, expected):
    student, teacher, mask = two_token_logits()
    close(sdpo_loss(student, teacher, mask, alpha=alpha), expected)


# V = 4: S = (.4, .3, .2, .1), T = (.1, .2, .3, .4). The student's top 2 are ids 0 and 1.
S4, T4 = (0.4, 0.3, 0.2, 0.1), (0.1, 0.2, 0.3, 0.4)


@pytest.mark.parametrize(
    "add_tail, s, t",
    [
        (True, (0.4, 0.3, 0.3), (0.1, 0.2, 0.7)),  # the rest of the mass in one bucket
        (False, (4 / 7, 3 / 7), (1 / 3, 2 / 3)),  # renormalized over the two
    ],
)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_sdpo_loss_top_k(add_tail, s, t, alpha):
    student = torch.tensor([[S4]]).log()
    teacher = torch.tensor([[T4]]).log()
    loss = sdpo_loss(student, teacher, torch.ones(1, 1), alpha=alpha, top_k=2, add_tail=add_tail)
    close(loss, divergence(s, t, alpha))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_sdpo_top_k_equal_to_vocab_is_the_full_vocabulary_value(alpha):
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 5, 11, generator=gen) * 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    full = sdpo_loss(student, teacher, mask, alpha=alpha)
    (full_grad,) = torch.autograd.grad(full, student)
    for add_tail in (True, False):
        topk = sdpo_loss(student, teacher, mask, alpha=alpha, top_k=11, add_tail=add_tail)
        (topk_grad,) = torch.autograd.grad(topk, student)
        assert topk.item() == pytest.approx(full.item(), abs=1e-6)
        torch.testing.assert_close(topk_grad, full_grad, atol=1e-6, rtol=1e-5)
    assert torch.isfinite(full_grad).all()


def test_sdpo_forward_kl_gradient_is_student_minus_teacher_probs():
    # d/dz KL(T || softmax z) = softmax(z) - T, averaged over the 2 real tokens; masked token: 0.
    student, teacher, mask = two_token_logits()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    sdpo_loss(student, teacher, mask, alpha=0.0).backward()
    expected = [
        [
            [(s - t) / 2 for s, t in zip(S0, T0, strict=True)],
            [(s - t) / 2 for s, t in zip(S1, T1, strict=True)],
            [0.0, 0.0],
        ]
    ]
    close_all(student.grad, expected)
    assert teacher.grad is None  # the teacher is a constant


def test_sdpo_loss_rejects_bad_arguments():
    student, teacher, mask = two_token_logits()
    with pytest.raises(ValueError, match="alpha=1.5"):
        sdpo_loss(student, teacher, mask, alpha=1.5)
    with pytest.raises(ValueError, match="top_k=3"):
        sdpo_loss(student, teacher, mask, top_k=3)
    with pytest.raises(ValueError, match="teacher_logits has shape"):
        sdpo_loss(student, teacher[:, :2], mask)


# ---------------------------------------------------------------------------- sdpo_token_loss


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_sdpo_token_loss_compares_on_the_teachers_listed_tokens_plus_one_tail_bucket(alpha):
    # V = 4, S = (.4, .3, .2, .1), T = (.1, .2, .3, .4); the teacher lists its top 2: ids 3 and 2.
    # On {3, 2, rest}: S = (.1, .2, .7), T = (.4, .3, .3).
    student = torch.tensor([[S4]]).log()
    ids = torch.tensor([[[3, 2]]])
    logps = torch.tensor([[[0.4, 0.3]]]).log()
    loss = sdpo_token_loss(student, ids, logps, torch.ones(1, 1), alpha=alpha)
    close(loss, divergence((0.1, 0.2, 0.7), (0.4, 0.3, 0.3), alpha))


def test_an_unused_slot_changes_nothing_and_keeps_the_gradient_finite():
    student = torch.tensor([[S4]]).log().requires_grad_(True)
    ids, logps, mask = torch.tensor([[[3, 2]]]), torch.tensor([[[0.4, 0.3]]]).log(), torch.ones(1, 1)
    two = sdpo_token_loss(student, ids, logps, mask)
    (two_grad,) = torch.autograd.grad(two, student)
    padded_ids = torch.tensor([[[3, 2, 0]]])
    padded = torch.cat([logps, torch.full((1, 1, 1), -math.inf)], dim=-1)
    three = sdpo_token_loss(student, padded_ids, padded, mask)
    (three_grad,) = torch.autograd.grad(three, student)
    assert three.item() == pytest.approx(two.item(), abs=1e-7)
    torch.testing.assert_close(three_grad, two_grad)
    assert torch.isfinite(three_grad).all()


@pytest.mark.parametrize("k", [3, 11])
def test_a_teacher_listing_the_students_top_k_is_sdpo_loss_with_top_k_and_all_of_them_the_full_value(k):
    """The endpoint form is sdpo_loss's top-k + tail form when both pick the same tokens; with every
    token listed it is the full-vocabulary divergence (value and gradient)."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 5, 11, generator=gen) * 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    index = student.detach().topk(k, dim=-1).indices
    listed = torch.log_softmax(teacher, dim=-1).gather(-1, index)
    endpoint = sdpo_token_loss(student, index, listed, mask, alpha=0.3)
    (endpoint_grad,) = torch.autograd.grad(endpoint, student)
    same = (
        sdpo_loss(student, teacher, mask, alpha=0.3, top_k=k)
        if k < 11
        else sdpo_loss(student, teacher, mask, alpha=0.3)
    )
    (same_grad,) = torch.autograd.grad(same, student)
    assert endpoint.item() == pytest.approx(same.item(), abs=1e-6)
    torch.testing.assert_close(endpoint_grad, same_grad, atol=1e-6, rtol=1e-5)


def test_sdpo_token_loss_rejects_bad_arguments():
    student = torch.tensor([[S4]]).log()
    ids, logps, mask = torch.tensor([[[3, 2]]]), torch.tensor([[[0.4, 0.3]]]).log(), torch.ones(1, 1)
    with pytest.raises(ValueError, match="alpha=2"):
        sdpo_token_loss(student, ids, logps, mask, alpha=2)
    with pytest.raises(ValueError, match=r"teacher_ids must lie in \[0, 4\)"):
        sdpo_token_loss(student, ids + 5, logps, mask)
    with pytest.raises(ValueError, match="teacher_logps has shape"):
        sdpo_token_loss(student, ids, logps[..., :1], mask)
    with pytest.raises(ValueError, match="teacher_ids has shape"):
        sdpo_token_loss(student, ids[0], logps, mask)


# ---------------------------------------------------------------------------- dpo_loss


def test_dpo_loss_policy_equal_to_reference_is_log_2():
    logps = torch.tensor([-3.0, -10.0, -0.5])
    losses, chosen, rejected = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.3)
    assert losses.tolist() == pytest.approx([LN2] * 3)
    assert chosen.tolist() == [0.0] * 3 and rejected.tolist() == [0.0] * 3


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_dpo_loss_hand_value(smoothing):
    # Delta = (-1 - -1.5) - (-2 - -1.5) = 1; beta * Delta = 0.1.
    policy_chosen = torch.tensor([-1.0], requires_grad=True)
    losses, chosen, rejected = dpo_loss(
        policy_chosen,
        torch.tensor([-2.0]),
        torch.tensor([-1.5]),
        torch.tensor([-1.5]),
        beta=0.1,
        label_smoothing=smoothing,
    )
    softplus = lambda x: math.log1p(math.exp(x))  # -log sigmoid(x) = softplus(-x)  # noqa: E731
    close(losses, (1 - smoothing) * softplus(-0.1) + smoothing * softplus(0.1))
    close(chosen, 0.05)
    close(rejected, -0.05)
    assert not chosen.requires_grad and not rejected.requires_grad


def test_dpo_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="ref_rejected_logps has shape"):
        dpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(3))


# ---------------------------------------------------------------------------- log-probs


def test_token_logps_is_log_softmax_at_the_label():
    logits = torch.tensor([[[0.0, LN2, math.log(3)], [0.0, 0.0, 0.0]]])  # weights 1:2:3, uniform
    close_all(token_logps(logits, torch.tensor([[2, 0]])), [[math.log(3 / 6), math.log(1 / 3)]])


def test_sequence_logps_shifts_and_masks():
    # Position t scores token t+1. Weights per position: (1,2,3), (4,1,1), (1,1,1) (last is unused).
    logits = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 1.0, 1.0], [1.0, 1.0, 1.0]]]).log()
    labels = torch.tensor([[0, 1, 0]])
    assert sequence_logps(logits, labels, torch.tensor([[0, 1, 1]])).tolist() == pytest.approx(
        [math.log(2 / 6) + math.log(4 / 6)]
    )
    assert sequence_logps(logits, labels, torch.tensor([[0, 0, 1]])).tolist() == pytest.approx([math.log(4 / 6)])


# ---------------------------------------------------------------------------- composition


def test_compose_loss_weights_the_channels():
    close(compose_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0), alpha=0.5, beta=0.1), 2.3)
    with pytest.raises(ValueError, match="alpha=-1"):
        compose_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0), alpha=-1, beta=0.1)


# ---------------------------------------------------------------------------- grpo_loss input checks


@pytest.mark.parametrize("count", [0, torch.tensor(0)])
def test_grpo_loss_dapo_with_zero_items_in_batch_is_zero_like_the_other_aggregations(count):
    # A batch whose every completion is padding: each aggregation has nothing to average, so 0.
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    mask = torch.zeros(2, 3)
    losses = {
        loss_type: grpo_loss(logp, None, torch.ones(2), mask, loss_type=loss_type)
        for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo")
    }
    losses["dapo_zero_count"] = grpo_loss(logp, None, torch.ones(2), mask, loss_type="dapo", num_items_in_batch=count)
    assert {name: loss.item() for name, loss in losses.items()} == dict.fromkeys(losses, 0.0)
    losses["dapo_zero_count"].backward()
    close_all(logp.grad, [[0.0] * 3] * 2)


def test_grpo_loss_dapo_zero_count_with_real_tokens_divides_by_one():
    # The count is clamped to 1, as the others clamp theirs: the sum of the per-token terms.
    logp, old = grpo_inputs()
    close(grpo_loss(logp, old, ADV, MASK, loss_type="dapo", num_items_in_batch=0), -2.7 + 2.2)


@pytest.mark.parametrize("name", ["old_logp", "ref_logp"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_grpo_loss_refuses_a_non_finite_input_at_a_real_token_naming_argument_and_position(name, bad):
    logp, old = grpo_inputs()
    ref = torch.zeros_like(logp)
    given = {"old_logp": old, "ref_logp": ref}[name]
    given[1, 1] = bad  # MASK[1, 1] is a real token
    with pytest.raises(ValueError, match=rf"{name} is {bad} at a real token \(row 1, column 1\)"):
        grpo_loss(logp, old, ADV, MASK, loss_type="bnpo", ref_logp=ref, kl_beta=0.1)


@pytest.mark.parametrize("name", ["old_logp", "ref_logp"])
def test_grpo_loss_ignores_non_finite_values_at_padding(name):
    logp, old = grpo_inputs()
    old[1, 2], ref = 0.0, torch.zeros_like(logp)  # MASK[1, 2] is padding
    expected = grpo_loss(logp, old, ADV, MASK, loss_type="bnpo", ref_logp=ref, kl_beta=0.1)
    {"old_logp": old, "ref_logp": ref}[name][1, 2] = float("nan")
    loss = grpo_loss(logp, old, ADV, MASK, loss_type="bnpo", ref_logp=ref, kl_beta=0.1)
    assert torch.isfinite(loss) and loss.item() == expected.item()


# ---------------------------------------------------------------------------- sdpo_on: failed


def test_sdpo_on_failures_distils_failed_samples_and_keeps_the_group_advantage_of_passed_ones():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])  # two groups of four
    advantages = group_advantages(rewards, 4)  # [0.75, -0.25, -0.25, -0.25, 0.25, 0.25, -0.75, 0.25]
    routed, weight = route_sdpo_on_failures(advantages, rewards > 0)
    assert routed.tolist() == [0.75, 0.0, 0.0, 0.0, 0.25, 0.25, 0.0, 0.25]
    assert weight.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    # a failed row that has no teacher (weight 0, e.g. hint_level sibling without a correct sibling) stays 0
    _, weight = route_sdpo_on_failures(advantages, rewards > 0, torch.tensor([1.0, 1.0, 0.0, 1.0, 1, 1, 1, 1]))
    assert weight.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="passed has shape"):
        route_sdpo_on_failures(advantages, torch.ones(3, dtype=torch.bool))


# ----------------------------------------------------------------------------- rollout correction (issue 23)

# Two rows of three tokens; ratios pi_train / pi_sampler of 1, 3, 0.5 | e, 1, (padding).
TRAIN = torch.tensor([[-1.0, -1.0, -2.0], [-0.5, -3.0, -9.0]])
SAMPLER = torch.tensor([[-1.0, -1.0 - math.log(3), -2.0 + math.log(2)], [-1.5, -3.0, 5.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def k3(r: float) -> float:
    return r - 1 - math.log(r)


def test_truncated_importance_weights_are_the_ratios_capped_and_the_mismatch_is_the_k3_kl():
    weights, mask, metrics = rollout_correction(TRAIN, SAMPLER, MASK, mode="tis", cap=2.0)
    close_all(weights, [[1.0, 2.0, 0.5], [2.0, 1.0, 1.0]], tol=1e-6)  # min(r, 2); padding r = 1
    assert torch.equal(mask, MASK)
    ratios = [1.0, 3.0, 0.5, math.e, 1.0]
    assert metrics["mismatch_kl"] == pytest.approx(sum(k3(r) for r in ratios) / 5, abs=1e-6)
    assert metrics["capped_fraction"] == pytest.approx(2 / 5)  # 3 and e are over the cap


def test_masked_importance_sampling_drops_the_tokens_over_the_cap_and_weights_the_rest_one():
    weights, mask, metrics = rollout_correction(TRAIN, SAMPLER, MASK, mode="mis", cap=2.0)
    assert torch.equal(weights, torch.ones(2, 3))
    assert mask.tolist() == [[1, 0, 1], [0, 1, 0]]
    assert metrics["capped_fraction"] == pytest.approx(2 / 5)
    none_weights, none_mask, none_metrics = rollout_correction(TRAIN, SAMPLER, MASK, mode="none", cap=2.0)
    assert torch.equal(none_weights, torch.ones(2, 3)) and torch.equal(none_mask, MASK)
    assert none_metrics == metrics  # measured the same whatever is corrected


def test_a_sampler_that_agrees_with_the_trainer_has_zero_mismatch_and_unit_weights():
    weights, _, metrics = rollout_correction(TRAIN, TRAIN.clone(), MASK, mode="tis", cap=2.0)
    assert torch.equal(weights, torch.ones(2, 3)) and metrics == {"mismatch_kl": 0.0, "capped_fraction": 0.0}


def test_tis_token_weights_scale_each_tokens_policy_gradient_term():
    """Dr.GRPO on-policy: each token's term is -A (ratio 1); weighted, -w * A, summed over B * L."""
    logp = torch.zeros(2, 3, requires_grad=True)
    advantages = torch.tensor([1.0, -2.0])
    weights = torch.tensor([[1.0, 2.0, 0.5], [2.0, 1.0, 1.0]])
    loss = grpo_loss(logp, None, advantages, MASK, loss_type="dr_grpo", max_completion_length=3, token_weights=weights)
    close(loss, (-(1 + 2 + 0.5) * 1.0 + (2 + 1) * 2.0) / 6)
    loss.backward()
    close_all(logp.grad, [[-1 / 6, -2 / 6, -0.5 / 6], [4 / 6, 2 / 6, 0.0]])


def test_rollout_correction_refuses_an_unknown_mode_and_a_non_positive_cap():
    with pytest.raises(ValueError, match="rollout_correction"):
        rollout_correction(TRAIN, SAMPLER, MASK, mode="clip", cap=2.0)
    with pytest.raises(ValueError, match="rollout_correction_cap=0"):
        rollout_correction(TRAIN, SAMPLER, MASK, mode="tis", cap=0)
