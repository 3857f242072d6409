"""`python -m trainer.teachers cost-floor`: N real states x each teacher, before a run pays for them.

    python -m trainer.teachers cost-floor --config configs/smoke.yaml --states 5 --teachers a,b,c --out runs/cost-floor

The states are tasks the config's policy fails: its model (the tiny one after the config's
supervised warm-up, `optim.sft_steps`, as a run starts; a hub model as loaded) samples tasks of
its environment once each, and the failures are kept. Each named teacher (the config's `teachers:`
list) writes a hint for every state; the report gives latency, tokens, cost, errors and retries by
kind, and whether the hint helps the policy (`trainer.teachers.cost_floor`). Exit status 2 with one
line for a config, a teacher name or an endpoint that cannot be used.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

from trainer.config import ConfigError, load_config_or_exit
from trainer.rollout.sampling import HFEngine
from trainer.rollout.templates import stop_token_ids
from trainer.run.build import build_env, policy_model
from trainer.run.collectors import Policy, SingleTurnCollector, make_collector
from trainer.run.topology import step_seed
from trainer.teachers import Teachers, TeacherUnavailable, probe
from trainer.teachers.cost_floor import measure, report_markdown, sample_states, write_report


def cost_floor(args: argparse.Namespace) -> int:
    config = load_config_or_exit(args.config, args.set)
    names = [n.strip() for n in args.teachers.split(",") if n.strip()]
    defined = [t.name for t in config.teachers]
    unknown = [n for n in names if n not in defined]
    if not names or unknown:
        print(
            f"error: --teachers: unknown teacher(s) {unknown or names} (the config defines: {defined})", file=sys.stderr
        )
        return 2
    out = Path(args.out)
    try:
        env = build_env(config)
        collector = make_collector(config, env)
    except ConfigError as error:
        print(f"error: {args.config}: {error}", file=sys.stderr)
        return 2
    if not isinstance(collector, SingleTurnCollector):
        print(
            f"error: {args.config}: cost-floor samples single-turn states; this config runs agent episodes",
            file=sys.stderr,
        )
        return 2
    try:
        teachers = Teachers(
            config.teachers,
            cache_root=out / "teacher-cache",
            log_path=out / "calls.jsonl",
            check=False,
            read_cache=not args.fresh,
        )
        for name in names:
            probe(teachers.clients[name])
    except TeacherUnavailable as error:
        print(f"error: {args.config}: {error}", file=sys.stderr)
        return 2
    model, tokenizer = policy_model(config, env, out)
    stops = stop_token_ids(tokenizer, model)
    engine = HFEngine(model, tokenizer)
    if config.optim.sft_steps:  # the policy a run starts RL from
        losses = collector.warm_up(
            Policy(model, tokenizer, engine, stops),
            rng=random.Random(step_seed(config.seed, -1)),
            group=None,
            progress=True,
        )
        print(f"warm-up: {len(losses)} SFT steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
    model.eval()
    r = config.rollout
    rng = random.Random(args.seed)
    # The states are drawn by sampling: seed torch here, so a rerun (whose tokenizer now comes from
    # the cache, not training, and whose warm-up may have drawn differently) asks for the same states.
    torch.manual_seed(args.seed)
    common = dict(
        score_many=collector.score_many(),
        max_completion_length=r.max_completion_length,
        temperature=r.temperature,
        stop_token_ids=stops,
    )
    states = sample_states(
        engine, tokenizer, lambda: env.sample(rng), args.states, max_prompt_length=r.max_prompt_length, **common
    )
    print(f"{len(states)} states: tasks the policy failed", flush=True)
    report = measure(
        teachers,
        names,
        states,
        sampler=engine,
        tokenizer=tokenizer,
        k=args.samples,
        seed=args.seed,
        max_prompt_length=r.max_prompt_length,
        progress=lambda line: print(line, flush=True),
        **common,
    )
    report["config"] = str(args.config)
    m = config.model
    report["policy"] = (
        m.name if m.name != "tiny" else f"tiny {m.num_layers}x{m.hidden_size} after {config.optim.sft_steps} SFT steps"
    )
    teachers.close()
    paths = write_report(report, out)
    print(report_markdown(report).split("\n\n## ")[0])
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.teachers", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    floor = sub.add_parser(
        "cost-floor", help="N real states x each teacher: latency, cost, errors, whether the hint helps"
    )
    floor.add_argument("--config", required=True, help="a run config whose teachers: list names the teachers")
    floor.add_argument("--states", type=int, default=5, help="failed states to measure (default 5)")
    floor.add_argument("--teachers", required=True, help="comma-separated teacher names from the config")
    floor.add_argument("--out", required=True, help="folder for cost_floor.{md,json,png}")
    floor.add_argument("--samples", type=int, default=8, help="policy samples per state and context (default 8)")
    floor.add_argument("--seed", type=int, default=0)
    floor.add_argument("--fresh", action="store_true", help="ask every teacher again (the cache is written, not read)")
    floor.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = parser.parse_args(argv)
    if args.states < 1 or args.samples < 1:
        parser.error("--states and --samples must be >= 1")
    return cost_floor(args)


if __name__ == "__main__":
    raise SystemExit(main())
