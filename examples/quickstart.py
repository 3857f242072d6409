"""Quickstart: `total = grpo + alpha * sdpo + beta * dpo` on a tiny offline Qwen2, five AdamW steps.

    .venv/bin/python examples/quickstart.py

One batch, all three channels on:
- GRPO: two candidate answers per question (in training they come from `generate`), a checker's
  0/1 reward, group-relative advantages, and the sampler's log-probs as `old_logps`;
- SDPO: the same model with a hint in its prompt re-scores the failed answers' tokens;
- DPO: (right, wrong) pairs whose reference log-probs a `PreferenceReplay` scores once.
"""

import copy

import torch

from trainer.losses import (
    ComposerBatch,
    PolicyBatch,
    completion_logits,
    composer_total_loss,
    group_advantages,
    token_logps,
)
from trainer.model import tiny_model_and_tokenizer
from trainer.objective.replay import PreferenceReplay

# (question, hint, right answer, wrong answer)
TASKS = [
    ("What is 12 + 7?", "Hint: add the ones first, then the tens.", "19", "18"),
    ("What is 23 + 5?", "Hint: 3 + 5 = 8.", "28", "27"),
    ("What is 40 + 2?", "Hint: the tens stay 4.", "42", "24"),
]
STEPS, ALPHA, BETA = 5, 0.5, 0.5


def main() -> None:
    torch.manual_seed(0)
    model, tokenizer = tiny_model_and_tokenizer()

    def chats(texts: list[str]) -> dict[str, torch.Tensor]:  # left-padded, as `generate` wants
        conversations = [[{"role": "user", "content": text}] for text in texts]
        return tokenizer.apply_chat_template(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            padding=True,
            return_dict=True,
            return_tensors="pt",
        )

    # Rollouts: per question a group of two samples, the right answer and a wrong one.
    rows = [(task, f"Answer: {answer}") for task in TASKS for answer in task[2:]]
    questions = [question for (question, *_), _ in rows]
    hints = [f"{question} {hint}" for (question, hint, *_), _ in rows]
    samples = [sample for _, sample in rows]
    rewards = torch.tensor([float(sample.split()[-1] == right) for (_, _, right, _), sample in rows])
    prompts, hinted = chats(questions), chats(hints)
    completions = tokenizer(
        [s + tokenizer.eos_token for s in samples], padding=True, padding_side="right", return_tensors="pt"
    )
    with torch.no_grad():  # what the sampler assigned its tokens; ratios start at 1
        old_logps = token_logps(
            completion_logits(
                model,
                prompts["input_ids"],
                prompts["attention_mask"],
                completions["input_ids"],
                completions["attention_mask"],
            ),
            completions["input_ids"],
        )
    policy = PolicyBatch(
        prompt_ids=prompts["input_ids"],
        prompt_mask=prompts["attention_mask"],
        completion_ids=completions["input_ids"],
        completion_mask=completions["attention_mask"],
        advantages=group_advantages(rewards, group_size=2),
        old_logps=old_logps,
        teacher_prompt_ids=hinted["input_ids"],
        teacher_prompt_mask=hinted["attention_mask"],
        sdpo_weight=(rewards == 0).long(),  # distil the hint into the answers that failed
    )

    # DPO pairs: reference log-probs from a frozen copy, computed once and cached by pair id.
    replay = PreferenceReplay(copy.deepcopy(model), pad_token_id=tokenizer.pad_token_id)
    for i, (question, _, right, wrong) in enumerate(TASKS):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        chosen, rejected = (tokenizer.encode(f"Answer: {a}") + [tokenizer.eos_token_id] for a in (right, wrong))
        replay.add(
            f"task-{i}",
            prompt + chosen,
            [0] * len(prompt) + [1] * len(chosen),
            prompt + rejected,
            [0] * len(prompt) + [1] * len(rejected),
        )
    batch = ComposerBatch(policy=policy, preference=replay.sample(len(replay), torch.Generator().manual_seed(0)))

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    print(
        f"tiny Qwen2: {sum(p.numel() for p in model.parameters()):,} parameters, vocab {len(tokenizer)}; "
        f"alpha={ALPHA} beta={BETA}"
    )
    for step in range(1, STEPS + 1):
        out = composer_total_loss(model, batch, alpha=ALPHA, beta=BETA)
        optimizer.zero_grad()
        out.total.backward()
        optimizer.step()
        m = out.metrics
        print(
            f"step {step}  total={m['loss']:.4f}  grpo={m['grpo']:+.4f}  sdpo={m['sdpo']:.4f}  dpo={m['dpo']:.4f}"
            f"  ratio={m['ratio_mean']:.3f}  clip={m['clip_fraction']:.2f}  dpo_acc={m['dpo_reward_accuracy']:.2f}"
        )
    print(f"reference forwards for DPO: {replay.reference_forward_passes} (once, not per step)")


if __name__ == "__main__":
    main()
