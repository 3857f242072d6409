"""The rollout layer: tasks in, samples or episodes out, as the tensors the objective scores.

`sampling` (the one sampler, token ids in, ids and log-probs out), `templates` (chat templates as
ids), `single_turn` (G completions per prompt, rewards, the hinted teacher's context), `episodes`
(multi-turn agent episodes), `episode_batch` (episodes as a policy batch and DPO pairs), `warmup`
(supervised warm-up and its probe), `evaluation` (held-out pass@1 / pass@k and the teacher gate).
It imports the environments (`trainer.envs`) and the objective (`trainer.objective`), nothing above.
"""
