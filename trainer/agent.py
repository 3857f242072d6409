"""The agent-episode API under its old import path, `trainer.agent` (what code written before the
layer split imports): `from trainer.agent import run_episode, run_episodes, episode_policy_batch,
write_episodes` keeps working.

The code lives in its layers: the environment half (workspaces, tools, the tool-call parser) in
`trainer.envs.workspace`, the model's half in `trainer.rollout` (templates, episodes, episode
batches, warm-up, evaluation). New code imports from there.
"""

from trainer.envs.workspace import (  # noqa: F401
    ERROR_KINDS,
    MAX_FILE_BYTES,
    OBSERVATION_LIMIT,
    SYSTEM_PROMPT,
    TOOL_SPECS,
    TOOLS,
    ParsedCall,
    ToolError,
    Workspace,
    WorkspaceTask,
    arguments_json,
    execute_tool,
    parse_tool_calls,
    test_report,
    workspace_task,
)
from trainer.rollout.episode_batch import (  # noqa: F401
    EpisodeRollout,
    add_episode_pairs,
    agent_rollout,
    episode_hint,
    episode_pairs,
    episode_policy_batch,
    teacher_prompt_ids,
)
from trainer.rollout.episodes import (  # noqa: F401
    TRUNCATED,
    Episode,
    Turn,
    _EpisodeRun,
    episode_metrics,
    run_episode,
    run_episodes,
    write_episodes,
)
from trainer.rollout.evaluation import evaluate_episodes  # noqa: F401
from trainer.rollout.templates import TemplateError, appended_text, demonstration_ids, render_ids  # noqa: F401
from trainer.rollout.warmup import episode_warmup  # noqa: F401
