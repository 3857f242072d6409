"""The sampler: one completion per prompt from token ids, with the log-prob each token was drawn with.

An `Engine` is what samples: `HFEngine` runs the trained module's own `generate` (nothing to
sync: it is the trained module); an inference engine (`trainer.rollout.vllm_engine.VLLMEngine`)
holds its own copy of the weights, which the trainer pushes in after every update (`Engine.push`).
Single-turn rollouts, agent episodes and held-out evaluation all call `sample(sampler, ...)`,
where the sampler is an engine or a bare model (sampled as `HFEngine` would).

Every rollout, episode and evaluation samples here, so the distribution the loss scores (pure
sampling at `temperature`, nothing inherited from a model's generation_config.json) is set in one
place. Prompts go in as token ids (never re-tokenized text), LEFT-padded as `generate` wants them;
completions come out RIGHT-padded after the first stop id: any id that ends the model's turn
(`trainer.rollout.templates.stop_token_ids`: the tokenizer's EOS, the model's declared EOS ids, the
chat template's end-of-turn token), passed in explicitly so any sampler stops on the same list.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from trainer.objective.batching import pad_sequences
from trainer.rollout.templates import resolve_stop_ids


def generation_config(
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_new_tokens: int,
    temperature: float,
    stop_token_ids: Sequence[int],
    greedy: bool = False,
) -> GenerationConfig:
    """The sampler's whole configuration, written out: nothing is inherited from the model's files.

    Pure sampling at `temperature` (no top-k, top-p or repetition penalty), the distribution the
    loss scores; `greedy` is argmax decoding (held-out pass@1). Generation stops on any of
    `stop_token_ids` (`trainer.rollout.templates.stop_token_ids`). Scores are returned so the
    sampler's own log-probs can be compared with the trainer's (`sampler_logp_diff`).
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
        eos_token_id=list(stop_token_ids),
        output_scores=True,
        return_dict_in_generate=True,
    )


@dataclass
class Samples:
    """One completion per prompt, as `sample` returns them (B rows; all int64 but the log-probs)."""

    prompt_ids: torch.Tensor  # (B, P) LEFT-padded
    prompt_mask: torch.Tensor  # (B, P) 0/1
    completion_ids: torch.Tensor  # (B, C) RIGHT-padded after the first stop id
    completion_mask: torch.Tensor  # (B, C) 1 up to and including the first stop id
    sampler_logps: torch.Tensor  # (B, C) float32: log-prob the sampler drew each token with (nats)


class EngineError(RuntimeError):
    """The rollout engine failed (died, or refused a request); the message says which and why."""


class Engine(ABC):
    """What samples: token ids in, sampled ids and the log-prob each was drawn with out.

    name: the `rollout.engine` value that selects it. device: where `generate` puts its tensors
    (the trainer's device). generation_config: the model's, read for its declared stop ids.
    """

    name: str = ""
    generation_config: Any = None

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @abstractmethod
    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        stop_token_ids: Sequence[int],
        greedy: bool = False,
    ) -> Samples:
        """One completion per prompt (`Samples`: prompts LEFT-padded, completions RIGHT-padded
        after the first of `stop_token_ids`, float32 log-probs at `temperature`; `greedy`: argmax).
        Pure sampling: no top-k, top-p or penalty, the distribution the loss scores."""

    def push(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the trainer's weights (name, tensor) pairs, Hugging Face names) into the engine so it
        samples from exactly the weights being trained. Engines that sample from the trained module
        itself have nothing to do."""
        del weights

    def weights_equal(self, model: Any) -> bool:
        """Whether the engine computes with exactly `model`'s weights (by hash, in the engine's dtype);
        an engine that samples the module itself always does."""
        return True

    def close(self) -> None:  # noqa: B027 (optional: engines that hold nothing of their own)
        """Free what the engine holds (an inference engine's KV cache and weights)."""


class HFEngine(Engine):
    """Hugging Face `generate` on the trained module itself: nothing to push, always in sync."""

    name = "hf"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.generation_config = getattr(model, "generation_config", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompts, *, max_new_tokens, temperature, stop_token_ids, greedy=False) -> Samples:
        return hf_sample(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            greedy=greedy,
            stop_token_ids=stop_token_ids,
        )


def as_engine(sampler: Engine | PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Engine:
    """`sampler` itself when it is an engine, else an `HFEngine` over the model."""
    return sampler if isinstance(sampler, Engine) else HFEngine(sampler, tokenizer)


def sample(
    sampler: Engine | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    greedy: bool = False,
    stop_token_ids: Sequence[int] | None = None,
) -> Samples:
    """One completion per prompt from `sampler` (an `Engine`, or a model sampled as `HFEngine`
    does), with the sampler's own log-probs; see `Engine.generate`.

    stop_token_ids: None: `trainer.rollout.templates.stop_token_ids(tokenizer, sampler)`, what a
    run computes once and passes.
    """
    engine = as_engine(sampler, tokenizer)
    stops = resolve_stop_ids(tokenizer, engine, stop_token_ids)
    return engine.generate(
        prompts, max_new_tokens=max_new_tokens, temperature=temperature, stop_token_ids=stops, greedy=greedy
    )


@torch.no_grad()
def hf_sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    greedy: bool = False,
    stop_token_ids: Sequence[int] | None = None,
) -> Samples:
    """One completion per prompt from `model.generate`, on the model's device, with the sampler's own log-probs.

    Sampling stops on any of `stop_token_ids` (None: `stop_token_ids(tokenizer, model)`, what a
    run computes once and passes); the completion mask covers the tokens up to and including the
    first of them, what `generate` emits after it is padding. `sampler_logps` is log_softmax of
    the scores `generate` sampled from (the logits after its processors, i.e. divided by
    `temperature`).
    """
    stops = resolve_stop_ids(tokenizer, model, stop_token_ids)
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = (t.to(device) for t in pad_sequences(prompts, tokenizer.pad_token_id, left=True))
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        generation_config=generation_config(
            tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, stop_token_ids=stops, greedy=greedy
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
    is_stop = torch.isin(completion_ids, torch.tensor(stops, device=completion_ids.device))
    after_stop = (is_stop.cumsum(dim=1) - is_stop.long()) > 0
    completion_mask = (~after_stop).long()
    completion_ids = completion_ids.masked_fill(after_stop, tokenizer.pad_token_id)
    sampler_logps = sampler_logps.masked_fill(after_stop, 0.0)
    return Samples(prompt_ids, prompt_mask, completion_ids, completion_mask, sampler_logps)


def decode_completions(tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(ids, mask, strict=True)]
