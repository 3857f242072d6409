"""On-policy distillation from a larger model behind an endpoint: the endpoint scores the student's
own tokens (`loss.teacher: endpoint:<name>`).

An OpenAI-compatible vLLM server returns, for every token of a prompt it is given as ids, the
token's log-prob and the top-k of its distribution there (`prompt_logprobs`, a vLLM field). The
student's sampled completion, behind the SDPO teacher's prompt, is sent as such a prompt; per
completion token the teacher's top-k and the sampled token become `PolicyBatch.teacher_token_ids`
and `teacher_token_logps`, and the SDPO loss compares the student with them on those tokens plus
one tail bucket (`trainer.objective.losses.sdpo_token_loss`, the form `sdpo_loss` takes with
`top_k`). This is on-policy distillation as in Agarwal et al. 2024 (GKD, arXiv 2306.13649) and
Thinking Machines' "On-Policy Distillation" (2025), with the sparse top-k teacher of hosted
inference. Hosted APIs return log-probs of their own output only, never of a prompt: such an
endpoint is refused at start (`probe`), as is one whose tokenizer differs from the policy's
(ids are only comparable under one vocabulary).

Prompt log-probs are the model's raw distribution (temperature 1); the config requires
`rollout.temperature: 1` with an endpoint teacher.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trainer.objective.batching import pad_sequences
from trainer.objective.losses import PolicyBatch
from trainer.rollout.evaluation import TokenScorer
from trainer.rollout.sampling import Engine, Samples
from trainer.teachers.client import Batch, TeacherClient, TeacherError, TeacherUnavailable

DEFAULT_TOP_K = 20  # vLLM's default --max-logprobs
ROWS_PER_REQUEST = 8  # student rows scored per request (one prompt each)


@dataclass
class ScoreCounts:
    """Rows the endpoint scored for the SDPO channel, and rows it could not (late or failed: no
    distillation for them that step)."""

    scored: int = 0
    missing: int = 0

    def as_metrics(self) -> dict[str, int]:
        return {"endpoint_scored": self.scored, "endpoint_missing": self.missing}


class EndpointTeacher(TokenScorer):
    """A teacher endpoint that scores token ids: prompt log-probs, top `top_k` per token.

    Raises (`probe`): TeacherUnavailable when the endpoint returns no prompt log-probs, refuses
    `top_k` of them, or tokenizes text differently from the policy's tokenizer.
    """

    def __init__(self, client: TeacherClient, *, top_k: int = DEFAULT_TOP_K) -> None:
        self.client, self.top_k = client, top_k
        self.batch = Batch(client)
        self.counts = ScoreCounts()

    def probe(self, tokenizer: Any, key: str) -> None:
        """At start: the endpoint must return `top_k` prompt log-probs and tokenize a chat prompt as
        the policy does. `key` is the config key that asked for this (loss.teacher)."""
        name = self.client.config.name
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is 12+7? Hint: add the ones first."}],
            tokenize=False,
            add_generation_prompt=True,
        )
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        body = {"prompt": text, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": self.top_k}
        body["return_token_ids"] = True
        try:
            answer = self.client.completions(body, purpose="probe")
        except TeacherError as error:
            hint = " (start vLLM with --max-logprobs >= loss.sdpo_top_k)" if error.kind == "bad_request" else ""
            raise TeacherUnavailable(
                f"{key}: endpoint:{name} ({self.client.where('base_url')} {self.client.config.base_url}) "
                f"refused a request for {self.top_k} prompt log-probs: {error}{hint}"
            ) from None
        choice = answer["choices"][0]
        lps = choice.get("prompt_logprobs")
        if not lps:
            raise TeacherUnavailable(
                f"{key}: endpoint:{name} ({self.client.config.base_url}) returns no prompt log-probs, so it "
                "cannot score the student's tokens (hosted APIs score only their own output); serve the model "
                "with vLLM, or use it for hints and pairs (task.hint_level teacher:, task.teacher_pairs)"
            )
        served = choice.get("prompt_token_ids")
        if (served is not None and list(served) != ids) or (served is None and len(lps) != len(ids)):
            raise TeacherUnavailable(
                f"{key}: endpoint:{name} tokenizes differently from the policy (a chat prompt of {len(ids)} "
                f"policy tokens came back as {len(served) if served is not None else len(lps)}): distilling on "
                "token ids needs the policy's tokenizer; serve a model that shares it"
            )

    # ------------------------------------------------------------------------------- SDPO channel

    def score_batch(self, policy: PolicyBatch) -> None:
        """Fill `policy.teacher_token_ids` / `teacher_token_logps` ((B, C, top_k + 1); -inf on unused
        slots) for the rows with distillation (`sdpo_weight` 1, or all): each row's teacher prompt
        (`teacher_prompt_ids`) and completion[offset:] (`teacher_offsets`) scored by the endpoint.
        Rows it could not score in time get `sdpo_weight` 0; counted in `counts`."""
        if policy.teacher_prompt_ids is None:
            raise ValueError("score_batch needs PolicyBatch.teacher_prompt_ids (the rollout's SDPO context)")
        batch, width = policy.completion_ids.shape
        weight = policy.sdpo_weight if policy.sdpo_weight is not None else torch.ones(batch)
        offsets = policy.teacher_offsets.tolist() if policy.teacher_offsets is not None else [0] * batch
        lengths = policy.completion_mask.sum(dim=1).tolist()
        rows = [r for r in range(batch) if weight[r] > 0]
        prompts, completions = [], []
        for r in rows:
            prompts.append(policy.teacher_prompt_ids[r][policy.teacher_prompt_mask[r].bool()].tolist())
            completions.append(policy.completion_ids[r][offsets[r] : int(lengths[r])].tolist())
        scored = self._score(prompts, completions, self.top_k, purpose="score")
        slots = self.top_k + 1
        ids = torch.zeros(batch, width, slots, dtype=torch.long)
        logps = torch.full((batch, width, slots), -math.inf, dtype=torch.float32)
        new_weight = torch.zeros(batch)
        for r, found in zip(rows, scored, strict=True):
            if found is None:
                self.counts.missing += 1
                continue
            self.counts.scored += 1
            new_weight[r] = 1.0
            for t, listed in enumerate(found):
                for k, (token, logp) in enumerate(list(listed.items())[:slots]):
                    ids[r, t, k], logps[r, t, k] = token, logp
        device = policy.completion_ids.device
        policy.teacher_token_ids, policy.teacher_token_logps = ids.to(device), logps.to(device)
        policy.sdpo_weight = new_weight.to(device)

    def completion_logps(self, prompts: Sequence[list[int]], completions: Sequence[list[int]]):
        """`TokenScorer`: each completion token's log-prob behind its prompt (the teacher gate)."""
        scored = self._score(list(prompts), list(completions), 0, purpose="gate")
        return [
            None if found is None else [found_t[token] for found_t, token in zip(found, completion, strict=True)]
            for found, completion in zip(scored, completions, strict=True)
        ]

    def _score(
        self, prompts: list[list[int]], completions: list[list[int]], top_k: int, *, purpose: str
    ) -> list[list[dict[int, float]] | None]:
        """Per (prompt, completion): per completion token, {token id: log-prob} with the token itself
        first and the endpoint's top `top_k` after it; None where the request did not come back."""
        chunks = [
            list(range(i, min(i + ROWS_PER_REQUEST, len(prompts)))) for i in range(0, len(prompts), ROWS_PER_REQUEST)
        ]
        outcomes = self.batch.run(
            lambda chunk, deadline: self._ask(chunk, prompts, completions, top_k, purpose, deadline), chunks
        )
        result: list[list[dict[int, float]] | None] = [None] * len(prompts)
        for chunk, outcome in zip(chunks, outcomes, strict=True):
            if outcome.status == "ok":
                for i, found in zip(chunk, outcome.value, strict=True):
                    result[i] = found
        return result

    def _ask(self, chunk, prompts, completions, top_k, purpose, deadline) -> list[list[dict[int, float]]]:
        body = {
            "prompt": [prompts[i] + completions[i] for i in chunk],
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": top_k,
        }
        answer = self.client.completions(body, purpose=purpose, deadline=deadline)
        choices = sorted(answer["choices"], key=lambda c: c["index"])
        found = []
        for i, choice in zip(chunk, choices, strict=True):
            listed = choice.get("prompt_logprobs") or []
            start = len(prompts[i])
            per_token = []
            for t, token in enumerate(completions[i]):
                entry = {int(k): v["logprob"] for k, v in (listed[start + t] or {}).items()}
                if token not in entry:
                    raise TeacherError("bad_response", f"{self.client.config.name}: no log-prob for a prompt token")
                per_token.append({token: entry.pop(token), **entry})
            found.append(per_token)
        return found

    def take_counts(self) -> ScoreCounts:
        counts, self.counts = self.counts, ScoreCounts()
        return counts

    def close(self) -> None:
        self.batch.close()


class EndpointEngine(Engine):
    """The endpoint as a sampler (`trainer.rollout.sampling.Engine`): the teacher-reward probe of an
    endpoint teacher samples from it behind the hinted prompts. One request per prompt (a batch of
    prompts shares a seed in vLLM, which would make their samples alike); the seed of each comes
    from torch's generator, so the run's seeds decide them and a repeated step is a cache hit."""

    name = "endpoint"

    def __init__(self, client: TeacherClient, *, pad_token_id: int) -> None:
        self.client, self.pad_token_id = client, pad_token_id
        self.batch = Batch(client)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def generate(self, prompts, *, max_new_tokens, temperature, stop_token_ids, greedy=False) -> Samples:
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        items = list(zip(prompts, seeds, strict=True))
        settings = dict(
            max_tokens=max_new_tokens,
            temperature=0.0 if greedy else temperature,
            top_p=1.0,
            stop_token_ids=list(stop_token_ids),
            logprobs=0,
            return_token_ids=True,
        )

        def ask(item, deadline):
            prompt, seed = item
            body = {"prompt": prompt, "seed": seed, **settings}
            return self.client.completions(body, purpose="sample", deadline=deadline)["choices"][0]

        outcomes = self.batch.run(ask, items)
        completions, logps = [], []
        for outcome in outcomes:
            choice = outcome.value if outcome.status == "ok" else None
            ids = list(choice.get("token_ids") or []) if choice else []
            listed = ((choice or {}).get("logprobs") or {}).get("token_logprobs") or [0.0] * len(ids)
            completions.append(ids or [stop_token_ids[0]])  # no answer: an empty turn, scored as failed
            logps.append([float(v or 0.0) for v in listed] if ids else [0.0])
        prompt_ids, prompt_mask = pad_sequences(prompts, self.pad_token_id, left=True)
        completion_ids, completion_mask = pad_sequences(completions, self.pad_token_id)
        sampler_logps = torch.zeros(completion_ids.shape, dtype=torch.float32)
        for row, values in enumerate(logps):
            sampler_logps[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
        return Samples(prompt_ids, prompt_mask, completion_ids, completion_mask, sampler_logps)

    def close(self) -> None:
        self.batch.close()
