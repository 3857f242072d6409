"""The sampler: one completion per prompt from token ids, with the log-prob each token was drawn with.

Every rollout, episode and evaluation samples here, so the distribution the loss scores (pure
sampling at `temperature`, nothing inherited from a model's generation_config.json) is set in one
place. Prompts go in as token ids (never re-tokenized text), LEFT-padded as `generate` wants them;
completions come out RIGHT-padded after the first EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from trainer.objective.batching import pad_sequences


def generation_config(
    tokenizer: PreTrainedTokenizerBase, *, max_new_tokens: int, temperature: float, greedy: bool = False
) -> GenerationConfig:
    """The sampler's whole configuration, written out: nothing is inherited from the model's files.

    Pure sampling at `temperature` (no top-k, top-p or repetition penalty), the distribution the
    loss scores; `greedy` is argmax decoding (held-out pass@1). Scores are returned so the sampler's
    own log-probs can be compared with the trainer's (`sampler_logp_diff`).
    """
    # Greedy decoding reads none of the sampling knobs: leaving them unset keeps generate quiet.
    sampling = {} if greedy else dict(temperature=temperature, top_k=0, top_p=1.0, min_p=None, typical_p=1.0)
    return GenerationConfig(
        do_sample=not greedy,
        **sampling,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        output_scores=True,
        return_dict_in_generate=True,
    )


@dataclass
class Samples:
    """One completion per prompt, as `sample` returns them (B rows; all int64 but the log-probs)."""

    prompt_ids: torch.Tensor  # (B, P) LEFT-padded
    prompt_mask: torch.Tensor  # (B, P) 0/1
    completion_ids: torch.Tensor  # (B, C) RIGHT-padded after the first EOS
    completion_mask: torch.Tensor  # (B, C) 1 up to and including the first EOS
    sampler_logps: torch.Tensor  # (B, C) float32: log-prob the sampler drew each token with (nats)


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    greedy: bool = False,
) -> Samples:
    """One completion per prompt, on the model's device, with the sampler's own log-probs.

    The completion mask covers the tokens up to and including the first EOS; what `generate`
    emits after it is padding. `sampler_logps` is log_softmax of the scores `generate` sampled
    from (the logits after its processors, i.e. divided by `temperature`).
    """
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = (t.to(device) for t in pad_sequences(prompts, tokenizer.pad_token_id, left=True))
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        generation_config=generation_config(
            tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy
        ),
        # Never transformers' automatic lock-step for FSDP-managed models: it all-reduces over the
        # default (world) group at every token, which couples the replicas and hangs when ranks
        # call generate a different number of times. A sharded model samples gathered instead
        # (trainer.run.sharding.unsharded), with no collective at all.
        synced_gpus=False,
    )
    model.train(was_training)
    completion_ids = out.sequences[:, prompt_ids.shape[1] :]
    scores = torch.stack(out.scores, dim=1).float()  # (B, C, V)
    sampler_logps = torch.log_softmax(scores, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    is_eos = completion_ids == tokenizer.eos_token_id
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    completion_mask = (~after_eos).long()
    completion_ids = completion_ids.masked_fill(after_eos, tokenizer.pad_token_id)
    sampler_logps = sampler_logps.masked_fill(after_eos, 0.0)
    return Samples(prompt_ids, prompt_mask, completion_ids, completion_mask, sampler_logps)


def decode_completions(tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(ids, mask, strict=True)]
