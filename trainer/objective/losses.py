"""The three-channel loss: `total = grpo + alpha * sdpo + beta * dpo`.

Pure tensor math plus the few model forwards the channels need. No config objects, no file I/O,
no logging: tensors and modules in, tensors out.

- Dr.GRPO / GRPO / BNPO / DAPO clipped policy gradient (`grpo_loss`, `group_advantages`);
- SDPO hint self-distillation: the policy with a hint in its context (or an EMA of it,
  `trainer.objective.teacher.EMATeacher`) re-scores the student's own completion tokens; token-level
  generalized JSD, optionally on the student's top-K tokens plus one tail bucket (`sdpo_loss`);
- DPO on preference pairs whose reference log-probs were computed once and cached
  (`dpo_loss`; the pair store is `trainer.objective.replay.PreferenceReplay`).

Layout: prompts are LEFT-padded, completions RIGHT-padded, full DPO sequences RIGHT-padded; masks
are 0/1. Per-token tensors are (B, T). Nothing here loops over tokens in Python.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PolicyBatch",
    "PreferenceBatch",
    "ComposerBatch",
    "ComposerLossOutput",
    "group_advantages",
    "route_sdpo_on_failures",
    "grpo_loss",
    "rollout_correction",
    "sdpo_loss",
    "sdpo_token_loss",
    "dpo_loss",
    "token_logps",
    "sequence_logps",
    "completion_logits",
    "compose_loss",
    "composer_total_loss",
]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
ROLLOUT_CORRECTIONS = ("none", "tis", "mis")
ADVANTAGE_SCALES = ("none", "group", "batch")


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


@dataclass
class PolicyBatch:
    """Rollouts for the GRPO channel; the SDPO channel reuses the same student forward."""

    prompt_ids: Tensor  # (B, P) long, LEFT-padded
    prompt_mask: Tensor  # (B, P) 0/1
    completion_ids: Tensor  # (B, C) long, RIGHT-padded
    completion_mask: Tensor  # (B, C) 0/1
    advantages: Tensor  # (B,) float
    old_logps: Tensor | None = None  # (B, C) sampling-policy log-probs; None = on-policy
    ref_logps: Tensor | None = None  # (B, C) reference log-probs for the k3 KL (kl_beta > 0)
    teacher_prompt_ids: Tensor | None = None  # (B, P') LEFT-padded hinted prompt (SDPO teacher)
    teacher_prompt_mask: Tensor | None = None
    sdpo_weight: Tensor | None = None  # (B,) 0/1 rows that get distillation; None = every row
    sampler_logps: Tensor | None = None  # (B, C) float32 log-probs the sampler drew the tokens with; diagnostic
    # Multi-turn episodes (trainer.rollout.episodes): the completion holds tool observations the model did not
    # sample. loss_mask (B, C) 0/1 marks the tokens every channel trains on (None: completion_mask);
    # completion_mask stays the attention mask. teacher_offsets (B,) long: the SDPO teacher scores
    # completion[o:] behind its prompt (the hint inserted at the turn where column o starts); None: 0.
    loss_mask: Tensor | None = None
    teacher_offsets: Tensor | None = None
    # A teacher outside the process (an endpoint's prompt log-probs, trainer.teachers.endpoint): per
    # token it scored, the ids of its top-k tokens and the sampled one (B, C', K) long and their
    # log-probs (B, C', K) float32, -inf on unused slots, aligned with completion[o:] (teacher_offsets);
    # the SDPO channel then compares the student with them (`sdpo_token_loss`) instead of a teacher forward.
    teacher_token_ids: Tensor | None = None
    teacher_token_logps: Tensor | None = None


@dataclass
class PreferenceBatch:
    """DPO pairs as full sequences (prompt + response), RIGHT-padded; loss masks mark responses."""

    chosen_ids: Tensor  # (B, Tc)
    chosen_attention_mask: Tensor
    chosen_loss_mask: Tensor
    rejected_ids: Tensor  # (B, Tr)
    rejected_attention_mask: Tensor
    rejected_loss_mask: Tensor
    ref_chosen_logps: Tensor  # (B,)
    ref_rejected_logps: Tensor  # (B,)


@dataclass
class ComposerBatch:
    policy: PolicyBatch
    preference: PreferenceBatch | None = None  # None: no pairs this step, the DPO channel is skipped


@dataclass
class ComposerLossOutput:
    """`total` carries the graph; the channels are unweighted; a skipped channel is a zero tensor."""

    total: Tensor
    grpo: Tensor
    sdpo: Tensor
    dpo: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Input checks (errors name the argument so a caller can find the bad tensor)
# --------------------------------------------------------------------------------------------


def _check_shape(name: str, tensor: Tensor, shape: Sequence[int]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def _at_least_float32(tensor: Tensor) -> Tensor:
    """Softmax math in half precision loses the small probabilities distillation cares about."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over mask=1 entries; 0 when the mask is empty (instead of NaN)."""
    mask = mask.bool()
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


# --------------------------------------------------------------------------------------------
# GRPO channel
# --------------------------------------------------------------------------------------------


def group_advantages(rewards: Tensor, group_size: int, *, scale: str = "none", eps: float = 1e-4) -> Tensor:
    """Group-relative advantages for rewards laid out as consecutive groups of `group_size`.

    `scale="none"` is Dr.GRPO (no std division: it biases towards easy/hard prompts);
    `"group"` divides by each group's Bessel-corrected std + eps (original GRPO); `"batch"` by the
    whole batch's std + eps.
    """
    _check_choice("scale", scale, ADVANTAGE_SCALES)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}")
    grouped = rewards.float().view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        if group_size < 2:
            raise ValueError("scale='group' needs group_size >= 2 (Bessel-corrected std)")
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        if rewards.numel() < 2:
            raise ValueError("scale='batch' needs at least 2 rewards (Bessel-corrected std)")
        advantages = advantages / (rewards.float().std() + eps)
    return advantages.reshape(-1)


def route_sdpo_on_failures(
    advantages: Tensor, passed: Tensor, sdpo_weight: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """SDPO on failures (`loss.sdpo_on: failed`): (advantages, sdpo_weight) that send each sample to one channel.

    A sample that failed is distilled (weight 1, times any weight it had: a row with no teacher stays
    0) and leaves the policy gradient (advantage 0); a sample that passed keeps its group advantage
    and gets no distillation. Plain SDPO distils passed samples too, pulling correct answers toward
    a teacher that may know no better; routing keeps the verifier's signal where it is right.

    Args:
        advantages: (B,) float, e.g. `group_advantages` (computed over the whole group, failures
            included, so a passed sample's advantage is unchanged).
        passed: (B,) bool (or 0/1): the sample's reward > 0.
        sdpo_weight: (B,) 0/1 or None (every row).

    Raises:
        ValueError: shapes differ.
    """
    _check_shape("passed", passed, tuple(advantages.shape))
    if sdpo_weight is not None:
        _check_shape("sdpo_weight", sdpo_weight, tuple(advantages.shape))
    passed = passed.bool().to(advantages.device)
    failed = (~passed).to(advantages.dtype)
    weight = failed if sdpo_weight is None else failed * sdpo_weight.to(failed)
    return torch.where(passed, advantages, torch.zeros_like(advantages)), weight


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "dr_grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    ref_logp: Tensor | None = None,
    kl_beta: float = 0.0,
    kl_bias_correction: bool = True,
    max_completion_length: int | None = None,
    num_items_in_batch: int | Tensor | None = None,
    token_weights: Tensor | None = None,
) -> Tensor:
    """Clipped policy-gradient loss on per-token log-probs (B, T); `old_logp=None` means on-policy.

    `token_weights` (B, T), when given, multiply each token's term (no gradient through them): the
    truncated importance weights of `rollout_correction`.

    The aggregations differ only in the denominator: `"grpo"` averages each sequence then the
    sequences (long answers get less weight per token); `"bnpo"` averages all tokens; `"dr_grpo"`
    divides by the constant B * max_completion_length, so a token's gradient does not depend on
    its sequence's length; `"dapo"` divides by the global token count `num_items_in_batch`
    (clamped to >= 1, like the other counts, so a batch without real tokens gives 0, not NaN).

    Raises ValueError on bad shapes or options, and when `old_logp` or `ref_logp` is NaN or
    infinite at a real token (mask 1), naming the argument and the first such (row, column):
    such a value would turn the loss into NaN or inf without a word. Padding may hold anything.
    """
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    if logp.dim() != 2:
        raise ValueError(f"logp must be (B, T), got shape {tuple(logp.shape)}")
    batch, width = logp.shape
    _check_shape("mask", mask, (batch, width))
    _check_shape("advantages", advantages, (batch,))
    for name, given in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if given is not None:
            _check_shape(name, given, (batch, width))
            _check_finite_where(name, given, mask.bool())
    if epsilon_low < 0 or (epsilon_high is not None and epsilon_high < 0):
        raise ValueError(f"epsilons must be >= 0, got epsilon_low={epsilon_low}, epsilon_high={epsilon_high}")
    if kl_beta > 0 and ref_logp is None:
        raise ValueError(f"kl_beta={kl_beta} > 0 needs ref_logp")

    mask = mask.bool()
    # Padding positions may hold anything (-inf, garbage); zero them so exp() stays finite.
    logp = torch.where(mask, logp, 0.0)
    old_logp = logp.detach() if old_logp is None else torch.where(mask, old_logp, 0.0)
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high

    ratio = torch.exp(logp - old_logp)
    adv = advantages.to(logp.dtype).unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if kl_beta > 0:
        log_ref_ratio = torch.where(mask, ref_logp, 0.0) - logp
        k3 = torch.exp(log_ref_ratio) - log_ref_ratio - 1
        per_token = per_token + kl_beta * (k3 * ratio if kl_bias_correction else k3)

    if token_weights is not None:
        _check_shape("token_weights", token_weights, (batch, width))
        per_token = per_token * token_weights.detach().to(per_token.dtype)
    per_token = torch.where(mask, per_token, 0.0)
    if loss_type == "grpo":
        return (per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return per_token.sum() / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        length = width if max_completion_length is None else max_completion_length
        if length < width:
            raise ValueError(f"max_completion_length={length} is shorter than the completions ({width} tokens)")
        return per_token.sum() / (batch * length)
    if num_items_in_batch is None:
        denominator = mask.sum().clamp(min=1)
    elif isinstance(num_items_in_batch, Tensor):
        denominator = num_items_in_batch.clamp(min=1)
    else:
        denominator = max(num_items_in_batch, 1)
    return per_token.sum() / denominator


def _check_finite_where(name: str, tensor: Tensor, mask: Tensor) -> None:
    """Raise ValueError naming `name` and the first (row, column) where `tensor` is not finite under `mask`."""
    bad = mask & ~torch.isfinite(tensor)
    if bad.any():
        row, column = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} is {tensor[row, column].item()} at a real token (row {row}, column {column}); "
            f"{int(bad.sum())} unmasked position(s) are not finite"
        )


def _ratio_stats(
    logp: Tensor, old_logp: Tensor | None, advantages: Tensor, mask: Tensor, epsilon_low: float, epsilon_high: float
) -> tuple[float, float]:
    """(mean importance ratio, fraction of tokens whose objective is clipped) over masked tokens."""
    if old_logp is None:
        return 1.0, 0.0
    mask = mask.bool()
    ratio = torch.exp(torch.where(mask, logp.detach() - old_logp, 0.0))
    adv = advantages.unsqueeze(1)
    clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    return _masked_mean(ratio, mask).item(), _masked_mean(clipped.float(), mask).item()


# --------------------------------------------------------------------------------------------
# SDPO channel
# --------------------------------------------------------------------------------------------


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(P || Q) over the last dim, from log-probs."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _generalized_jsd(student: Tensor, teacher: Tensor, alpha: float) -> Tensor:
    """Per-position divergence between log-prob tensors; alpha 0 / 1 are the two KLs."""
    if alpha == 0:
        return _kl(teacher, student)
    if alpha == 1:
        return _kl(student, teacher)
    mixture = torch.logaddexp(student + math.log1p(-alpha), teacher + math.log(alpha))
    return alpha * _kl(teacher, mixture) + (1 - alpha) * _kl(student, mixture)


def _log_tail(log_probs: Tensor) -> Tensor:
    """log(1 - sum(p)) of the probability mass outside `log_probs` (last dim), as a (..., 1) bucket.

    Clamped at the float epsilon: below it, 1 - sum(p) is rounding noise (with K = V it would be
    +-1e-7 or 0, and log(0) turns the gradient into NaN). Both sides clamp alike, so a noise-level
    tail contributes nothing instead of eps * log(noise / 0).
    """
    mass = -torch.expm1(torch.logsumexp(log_probs, dim=-1, keepdim=True))
    return mass.clamp(min=torch.finfo(log_probs.dtype).eps).log()


def sdpo_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    alpha: float = 0.5,
    top_k: int | None = None,
    add_tail: bool = True,
) -> Tensor:
    """Token-level distillation of the hinted teacher into the student, masked mean over tokens.

    alpha = 0: KL(T||S); alpha = 1: KL(S||T); otherwise the generalized JSD
    alpha * KL(T||M) + (1 - alpha) * KL(S||M) with M = (1 - alpha) S + alpha T.
    No gradient reaches the teacher. With `top_k`, both sides are compared only on the student's
    K most likely tokens (plus one tail bucket with the rest of the mass, or renormalized over
    the K without it): no full-vocabulary log-softmax is kept for backward, which is what makes
    V = 150k affordable.
    """
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be (B, T, V), got shape {tuple(student_logits.shape)}")
    _check_shape("teacher_logits", teacher_logits, student_logits.shape)
    _check_shape("mask", mask, student_logits.shape[:2])
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha} must lie in [0, 1]")
    vocab = student_logits.shape[-1]
    teacher_logits = teacher_logits.detach()

    if top_k is None:
        student = torch.log_softmax(_at_least_float32(student_logits), dim=-1)
        teacher = torch.log_softmax(_at_least_float32(teacher_logits), dim=-1)
    else:
        if not 1 <= top_k <= vocab:
            raise ValueError(f"top_k={top_k} must lie in [1, vocab size {vocab}]")
        index = student_logits.detach().topk(top_k, dim=-1).indices
        student = token_logps(student_logits, index)
        teacher = token_logps(teacher_logits, index)
        if add_tail:
            student = torch.cat([student, _log_tail(student)], dim=-1)
            teacher = torch.cat([teacher, _log_tail(teacher)], dim=-1)
        else:
            student = torch.log_softmax(student, dim=-1)
            teacher = torch.log_softmax(teacher, dim=-1)
    return _masked_mean(_generalized_jsd(student, teacher, alpha), mask)


def sdpo_token_loss(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logps: Tensor,
    mask: Tensor,
    *,
    alpha: float = 0.5,
) -> Tensor:
    """`sdpo_loss`'s top-k + tail form for a teacher known only on some tokens per position (an
    endpoint's top-k prompt log-probs and the sampled token's, `trainer.teachers.endpoint`).

    Both sides are compared on the teacher's listed tokens plus one tail bucket holding the rest of
    each side's mass, with the same generalized JSD as `sdpo_loss` (alpha = 0: KL(T||S), 1:
    KL(S||T)); masked mean over positions. No gradient reaches the teacher.

    Args:
        student_logits: (B, T, V) float.
        teacher_ids: (B, T, K) long, the teacher's tokens at each position (unused slots: any id).
        teacher_logps: (B, T, K) float, their log-probs under the teacher (nats); -inf marks an
            unused slot (a position listing fewer than K distinct tokens). Ids must not repeat
            among a position's used slots.
        mask: (B, T) 0/1, the positions the loss counts.

    Raises:
        ValueError: shapes that differ, alpha outside [0, 1], ids outside the vocabulary.
    """
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be (B, T, V), got shape {tuple(student_logits.shape)}")
    if teacher_ids.dim() != 3 or tuple(teacher_ids.shape[:2]) != tuple(student_logits.shape[:2]):
        raise ValueError(
            f"teacher_ids has shape {tuple(teacher_ids.shape)}, expected {tuple(student_logits.shape[:2])} + (K,)"
        )
    _check_shape("teacher_logps", teacher_logps, tuple(teacher_ids.shape))
    _check_shape("mask", mask, student_logits.shape[:2])
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha} must lie in [0, 1]")
    vocab = student_logits.shape[-1]
    if teacher_ids.numel() and (int(teacher_ids.min()) < 0 or int(teacher_ids.max()) >= vocab):
        raise ValueError(f"teacher_ids must lie in [0, {vocab}) (the student's vocabulary)")
    used = torch.isfinite(teacher_logps)
    # Unused slots carry no mass on either side: a log-prob so low its probability is 0 in float32,
    # finite so that 0 * (log p - log q) stays 0 instead of NaN.
    nothing = torch.tensor(-1e4, dtype=torch.float32, device=student_logits.device)
    student = torch.where(used, token_logps(student_logits, teacher_ids), nothing)
    teacher = torch.where(used, _at_least_float32(teacher_logps.detach()), nothing)
    student = torch.cat([student, _log_tail(student)], dim=-1)
    teacher = torch.cat([teacher, _log_tail(teacher)], dim=-1)
    return _masked_mean(_generalized_jsd(student, teacher, alpha), mask)


# --------------------------------------------------------------------------------------------
# DPO channel
# --------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sigmoid DPO (conservative with `label_smoothing`) -> (losses (B,), chosen, rejected rewards).

    Rewards are beta * (policy - reference) log-prob, detached (for logging only).
    """
    batch = policy_chosen_logps.shape
    for name, tensor in (
        ("policy_rejected_logps", policy_rejected_logps),
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_rejected_logps", ref_rejected_logps),
    ):
        _check_shape(name, tensor, batch)
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing} must lie in [0, 0.5)")
    chosen_log_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_log_ratio = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_log_ratio - rejected_log_ratio)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_log_ratio.detach(), beta * rejected_log_ratio.detach()


# --------------------------------------------------------------------------------------------
# Log-probs from a causal LM
# --------------------------------------------------------------------------------------------


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[..., label] for aligned logits (..., V) and labels (...) or (..., K).

    Gather minus logsumexp: never materializes (nor saves for backward) a full log-softmax.
    Computed in at least float32 whatever the model dtype.
    """
    logits = _at_least_float32(logits)
    squeeze = labels.dim() == logits.dim() - 1
    index = labels.unsqueeze(-1) if squeeze else labels
    picked = logits.gather(-1, index) - torch.logsumexp(logits, dim=-1, keepdim=True)
    return picked.squeeze(-1) if squeeze else picked


def sequence_logps(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Summed log-probs of the mask=1 tokens of each sequence (B,), for full-sequence logits.

    Causal shift: logits at position t score token t+1, so the first token is never scored.
    """
    _check_shape("labels", labels, logits.shape[:2])
    _check_shape("mask", mask, logits.shape[:2])
    per_token = token_logps(logits[:, :-1], labels[:, 1:])
    return torch.where(mask[:, 1:].bool(), per_token, 0.0).sum(dim=1)


def completion_logits(
    model: Callable[..., Any], prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor
) -> Tensor:
    """(B, C, V) logits that predict each completion token behind its (left-padded) prompt.

    Position ids come from the attention mask, as in HF `generate`, so log-probs recomputed here
    match the sampler's exactly. Only the C logits needed are projected to the vocabulary
    (`logits_to_keep`, which every Hugging Face causal LM accepts).
    """
    if prompt_ids.dim() != 2 or completion_ids.dim() != 2:
        raise ValueError("prompt_ids and completion_ids must be (B, P) and (B, C)")
    _check_shape("prompt_mask", prompt_mask, prompt_ids.shape)
    _check_shape("completion_mask", completion_mask, completion_ids.shape)
    if prompt_ids.shape[0] != completion_ids.shape[0]:
        raise ValueError(f"prompt batch {prompt_ids.shape[0]} != completion batch {completion_ids.shape[0]}")
    width = completion_ids.shape[1]
    if width == 0 or prompt_ids.shape[1] == 0:
        raise ValueError("prompt and completion need at least one token each")
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask.long(), completion_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=width + 1,
        use_cache=False,
    ).logits
    return logits[:, :-1]


# --------------------------------------------------------------------------------------------
# The composed loss
# --------------------------------------------------------------------------------------------


def rollout_correction(
    train_logp: Tensor, sampler_logp: Tensor, mask: Tensor, *, mode: str = "tis", cap: float = 2.0
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Correct for sampling from a slightly different policy than the one trained (a bf16 or other
    kernel engine, a stale copy): per-token importance ratios r = pi_train / pi_sampler of the
    sampled tokens, truncated or masked at `cap`.

    Following Yao et al. 2025 ("Your efficient RL framework secretly brings you off-policy RL
    training", fengyao.notion.site) and verl's rollout correction: `tis` (truncated importance
    sampling) weights each token's policy-gradient term by min(r, cap); `mis` (masked importance
    sampling) drops the tokens whose r exceeds `cap` from the loss; `none` leaves the loss as is.

    Args:
        train_logp, sampler_logp: (B, T) log-probs (nats) of the sampled tokens under the trained
            policy (detached here) and under the sampler, at the same temperature.
        mask: (B, T) 0/1, the tokens the loss counts.
        mode: "none", "tis" or "mis"; cap: the truncation (> 0).

    Returns:
        (weights, mask, metrics): float32 (B, T) weights for `grpo_loss(token_weights=...)` (1 for
        none and mis), the mask to use (mis: over-cap tokens removed), and metrics over the
        counted tokens: `mismatch_kl`, the k3 estimate of KL(sampler || train), mean of
        r - 1 - log r (Schulman 2020, "Approximating KL divergence"); `capped_fraction`, the share
        of tokens with r > cap (truncated under tis, dropped under mis).

    Raises:
        ValueError: an unknown mode, cap <= 0, or shapes that differ.
    """
    _check_choice("rollout_correction", mode, ROLLOUT_CORRECTIONS)
    if cap <= 0:
        raise ValueError(f"rollout_correction_cap={cap} must be > 0")
    _check_shape("sampler_logp", sampler_logp, tuple(train_logp.shape))
    _check_shape("mask", mask, tuple(train_logp.shape))
    counted = mask.bool()
    log_ratio = torch.where(counted, train_logp.detach().float() - sampler_logp.float(), 0.0)
    ratio = torch.exp(log_ratio)
    over = (ratio > cap) & counted
    metrics = {
        "mismatch_kl": _masked_mean(ratio - 1 - log_ratio, counted).item(),
        "capped_fraction": _masked_mean(over.float(), counted).item(),
    }
    weights = torch.clamp(ratio, max=cap) if mode == "tis" else torch.ones_like(ratio)
    if mode == "mis":
        counted = counted & ~over
    return weights, counted.to(mask.dtype), metrics


def compose_loss(grpo: Tensor, sdpo: Tensor, dpo: Tensor, *, alpha: float, beta: float) -> Tensor:
    """total = grpo + alpha * sdpo + beta * dpo, for channels computed elsewhere."""
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha={alpha} and beta={beta} must be >= 0")
    return grpo + alpha * sdpo + beta * dpo


def _pad_columns(tensor: Tensor, width: int) -> Tensor:
    """Right-pad a (B, T) tensor with zeros to (B, width)."""
    return F.pad(tensor, (0, width - tensor.shape[1]))


def _preference_logps(model: Callable[..., Any], pairs: PreferenceBatch) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) summed response log-probs, both sides in one forward."""
    width = max(pairs.chosen_ids.shape[1], pairs.rejected_ids.shape[1])
    ids, attention, loss_mask = (
        torch.cat([_pad_columns(chosen, width), _pad_columns(rejected, width)])
        for chosen, rejected in (
            (pairs.chosen_ids, pairs.rejected_ids),
            (pairs.chosen_attention_mask, pairs.rejected_attention_mask),
            (pairs.chosen_loss_mask, pairs.rejected_loss_mask),
        )
    )
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    logps = sequence_logps(logits, ids, loss_mask)
    return logps.split(pairs.chosen_ids.shape[0])


def composer_total_loss(
    model: nn.Module,
    batch: ComposerBatch,
    *,
    alpha: float,
    beta: float,
    teacher: Callable[..., Any] | None = None,
    loss_type: str = "dr_grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    kl_beta: float = 0.0,
    max_completion_length: int | None = None,
    sdpo_jsd_alpha: float = 0.5,
    sdpo_top_k: int | None = None,
    dpo_beta: float = 0.1,
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    rollout_correction_mode: str = "none",
    rollout_correction_cap: float = 2.0,
    lockstep: bool = False,
) -> ComposerLossOutput:
    """grpo + alpha * sdpo + beta * dpo on a causal LM, with the fewest forwards possible.

    One student forward feeds both GRPO and SDPO. The SDPO teacher (`model` itself under
    no_grad when `teacher` is None, else e.g. an `EMATeacher`) re-scores the student's completion
    tokens behind the hinted prompt, only for rows with `sdpo_weight` = 1. DPO runs one forward on
    chosen + rejected together. alpha = 0 skips the teacher forward, beta = 0 (or no pairs) the
    DPO forward; a skipped channel is a zero tensor and leaves its metrics out.

    `temperature` is the sampler's: the student's and the teacher's logits are divided by it before
    the policy-gradient and distillation terms, so the loss scores the distribution the tokens
    were drawn from (as TRL's GRPOTrainer does). DPO compares whole-sequence likelihoods against a
    reference scored at 1 and is left at temperature 1. With `PolicyBatch.sampler_logps`, metrics
    gain `sampler_logp_diff`: mean |trainer log-prob - sampler log-prob| over completion tokens
    (nats), which is ~0 when sampling and training agree, and `rollout_correction`'s `mismatch_kl`
    and `capped_fraction`; `rollout_correction_mode` tis or mis then corrects the policy-gradient
    channel for the gap (`rollout_correction_cap`). With `PolicyBatch.loss_mask` (episodes),
    every channel and metric counts only its 1s; the forwards still attend to the whole completion.

    `lockstep` makes the teacher forward run whenever alpha > 0, even when no row is selected for
    distillation (its result is then unused and the channel is zero): a model sharded over several
    ranks (FSDP) gathers its layers inside every forward, so all ranks must run the same forwards.
    """
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha={alpha} and beta={beta} must be >= 0")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    policy = batch.policy
    mask = policy.completion_mask if policy.loss_mask is None else policy.loss_mask
    _check_shape("PolicyBatch.loss_mask", mask, tuple(policy.completion_mask.shape))

    student_logits = completion_logits(
        model, policy.prompt_ids, policy.prompt_mask, policy.completion_ids, policy.completion_mask
    )
    if temperature != 1.0:
        student_logits = student_logits / temperature
    logp = token_logps(student_logits, policy.completion_ids)
    pg_mask, token_weights, correction = mask, None, {}
    if policy.sampler_logps is not None:
        weights, pg_mask, correction = rollout_correction(
            logp, policy.sampler_logps, mask, mode=rollout_correction_mode, cap=rollout_correction_cap
        )
        token_weights = weights if rollout_correction_mode == "tis" else None
    grpo = grpo_loss(
        logp,
        policy.old_logps,
        policy.advantages,
        pg_mask,
        loss_type=loss_type,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        ref_logp=policy.ref_logps,
        kl_beta=kl_beta,
        max_completion_length=max_completion_length,
        token_weights=token_weights,
    )
    ratio_mean, clip_fraction = _ratio_stats(
        logp,
        policy.old_logps,
        policy.advantages,
        mask,
        epsilon_low,
        epsilon_low if epsilon_high is None else epsilon_high,
    )
    zero = grpo.new_zeros(())
    metrics = {"ratio_mean": ratio_mean, "clip_fraction": clip_fraction}
    if policy.sampler_logps is not None:
        _check_shape("PolicyBatch.sampler_logps", policy.sampler_logps, tuple(mask.shape))
        gap = (logp.detach().float() - policy.sampler_logps.float()).abs()
        metrics["sampler_logp_diff"] = _masked_mean(gap, mask).item()
        metrics.update(correction)

    sdpo = zero
    if alpha > 0:
        sdpo = _sdpo_channel(
            model if teacher is None else teacher,
            policy,
            student_logits,
            mask,
            alpha=sdpo_jsd_alpha,
            top_k=sdpo_top_k,
            temperature=temperature,
            lockstep=lockstep,
        )
    del student_logits  # the graph keeps what backward needs; let the rest go before DPO

    dpo = zero
    if beta > 0 and batch.preference is not None:
        pairs = batch.preference
        chosen_logps, rejected_logps = _preference_logps(model, pairs)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen_logps,
            rejected_logps,
            pairs.ref_chosen_logps,
            pairs.ref_rejected_logps,
            beta=dpo_beta,
            label_smoothing=label_smoothing,
        )
        dpo = losses.mean()
        metrics.update(
            dpo_chosen_reward=chosen_rewards.mean().item(),
            dpo_rejected_reward=rejected_rewards.mean().item(),
            dpo_reward_margin=(chosen_rewards - rejected_rewards).mean().item(),
            dpo_reward_accuracy=(chosen_rewards > rejected_rewards).float().mean().item(),
        )

    total = compose_loss(grpo, sdpo, dpo, alpha=alpha, beta=beta)
    metrics.update(loss=total.item(), grpo=grpo.item(), sdpo=sdpo.item(), dpo=dpo.item())
    return ComposerLossOutput(total=total, grpo=grpo, sdpo=sdpo, dpo=dpo, metrics=metrics)


def _sdpo_channel(
    teacher: Callable[..., Any],
    policy: PolicyBatch,
    student_logits: Tensor,
    loss_mask: Tensor,
    *,
    alpha: float,
    top_k: int | None,
    temperature: float = 1.0,
    lockstep: bool = False,
) -> Tensor:
    """Teacher re-scores the student's completion under the hinted prompt; rows with weight 0 skip.

    With `teacher_offsets`, row b's teacher sees completion[o_b:] only (shifted to column 0) and is
    compared with the student's logits at the same tokens. With `teacher_token_ids` the teacher
    scored them outside the process (an endpoint) and `sdpo_token_loss` compares on its tokens.
    With `lockstep`, a batch without any selected row still runs the in-process teacher forward (on
    its first row, result unused); an endpoint teacher runs no forward here, so it needs none.
    """
    endpoint = policy.teacher_token_ids is not None
    if endpoint and policy.teacher_token_logps is None:
        raise ValueError("PolicyBatch.teacher_token_ids needs teacher_token_logps")
    if not endpoint and (policy.teacher_prompt_ids is None or policy.teacher_prompt_mask is None):
        raise ValueError("the SDPO channel (alpha > 0) needs PolicyBatch.teacher_prompt_ids and teacher_prompt_mask")
    batch = policy.completion_ids.shape[0]
    teacher_rows = (policy.teacher_token_ids if endpoint else policy.teacher_prompt_ids).shape[0]
    if teacher_rows != batch:
        name = "teacher_token_ids" if endpoint else "teacher_prompt_ids"
        raise ValueError(f"PolicyBatch.{name} has {teacher_rows} rows, expected {batch}")
    rows = slice(None)
    if policy.sdpo_weight is not None:
        _check_shape("PolicyBatch.sdpo_weight", policy.sdpo_weight, (batch,))
        selected = policy.sdpo_weight.bool().nonzero().flatten()
        if selected.numel() == 0:
            if lockstep and not endpoint:
                with torch.no_grad():
                    completion_logits(
                        teacher,
                        policy.teacher_prompt_ids[:1],
                        policy.teacher_prompt_mask[:1],
                        policy.completion_ids[:1],
                        policy.completion_mask[:1],
                    )
            return student_logits.new_zeros((), dtype=torch.float32)
        if selected.numel() < batch:
            rows = selected
    completion_ids, completion_mask = policy.completion_ids[rows], policy.completion_mask[rows]
    loss_mask, student_logits = loss_mask[rows], student_logits[rows]
    if policy.teacher_offsets is not None:
        _check_shape("PolicyBatch.teacher_offsets", policy.teacher_offsets, (batch,))
        offsets = policy.teacher_offsets[rows].long()
        completion_ids, completion_mask, loss_mask, student_logits = (
            _shift_left(t, offsets) for t in (completion_ids, completion_mask, loss_mask, student_logits)
        )
    if endpoint:
        width = policy.teacher_token_ids.shape[1]
        if width > student_logits.shape[1]:
            raise ValueError(
                f"PolicyBatch.teacher_token_ids has {width} columns, the completion only {student_logits.shape[1]}"
            )
        return sdpo_token_loss(
            student_logits[:, :width],
            policy.teacher_token_ids[rows].to(student_logits.device),
            policy.teacher_token_logps[rows].to(student_logits.device),
            loss_mask[:, :width],
            alpha=alpha,
        )
    with torch.no_grad():
        teacher_logits = completion_logits(
            teacher, policy.teacher_prompt_ids[rows], policy.teacher_prompt_mask[rows], completion_ids, completion_mask
        )
        if temperature != 1.0:
            teacher_logits = teacher_logits / temperature
    return sdpo_loss(student_logits, teacher_logits, loss_mask, alpha=alpha, top_k=top_k)


def _shift_left(tensor: Tensor, offsets: Tensor) -> Tensor:
    """Row b of a (B, C, ...) tensor moved left by offsets[b] columns, zeros after its end."""
    width = tensor.shape[1]
    if ((offsets < 0) | (offsets >= width)).any():
        raise ValueError(f"PolicyBatch.teacher_offsets must be in [0, {width}), got {offsets.tolist()}")
    index = torch.arange(width, device=tensor.device)[None] + offsets[:, None]
    valid = index < width
    index = index.clamp(max=width - 1)
    for _ in range(tensor.dim() - 2):
        index, valid = index[..., None], valid[..., None]
    gathered = tensor.gather(1, index.expand(-1, -1, *tensor.shape[2:]))
    return torch.where(valid, gathered, torch.zeros((), dtype=tensor.dtype, device=tensor.device))
