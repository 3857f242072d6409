"""The rollout layer: tasks in, samples or episodes out, as the tensors the objective scores.

`sampling` (the one sampler, token ids in, ids and log-probs out), `templates` (chat templates as
ids), `single_turn` (G completions per prompt, rewards, the hinted teacher's context), `episodes`
(multi-turn agent episodes), `episode_batch` (episodes as a policy batch and DPO pairs), `warmup`
(supervised warm-up and its probe), `evaluation` (held-out pass@1 / pass@k and the teacher gate).
It imports the environments (`trainer.envs`) and the objective (`trainer.objective`), nothing above.
"""

# The entry points most callers want, under the package's own name (`from trainer.rollout import
# sample, rollout, chat_prompt_ids` as before the package split).
from trainer.rollout.sampling import Samples, decode_completions, generation_config, sample  # noqa: E402
from trainer.rollout.single_turn import Rollout, RolloutStats, rollout, sibling_pairs  # noqa: E402
from trainer.rollout.templates import chat_prompt_ids, hinted_prompt_ids, stop_token_ids  # noqa: E402

__all__ = [
    "Rollout",
    "RolloutStats",
    "Samples",
    "chat_prompt_ids",
    "decode_completions",
    "generation_config",
    "hinted_prompt_ids",
    "rollout",
    "sample",
    "sibling_pairs",
    "stop_token_ids",
]
