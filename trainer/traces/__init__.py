"""Real agent logs -> `TraceExample`s -> preference pairs -> token ids for the DPO channel.

examples = TraceIngester().ingest("logs/")          # Claude Code, OpenHands, SWE-agent, OpenAI
pairs = mine_pairs(examples)                        # outcome pairs and rewound/interrupted forks
tokens = render_pair(next(pairs), tokenizer)        # chat template, loss mask on the responses
"""

from .ingest import TraceIngester, detect_format
from .mining import ExampleReward, PreferencePair, mine_pairs
from .render import TokenizedPair, render, render_pair
from .schema import (
    COMPACT_SUMMARY,
    FORMATS,
    INTERRUPTION,
    ISSUE_REASONS,
    REFUSAL,
    UNDONE,
    IngestReport,
    Message,
    ToolCall,
    TraceExample,
    TraceFormatError,
)

__all__ = [
    "COMPACT_SUMMARY",
    "FORMATS",
    "INTERRUPTION",
    "ISSUE_REASONS",
    "REFUSAL",
    "UNDONE",
    "ExampleReward",
    "IngestReport",
    "Message",
    "PreferencePair",
    "TokenizedPair",
    "ToolCall",
    "TraceExample",
    "TraceFormatError",
    "TraceIngester",
    "detect_format",
    "mine_pairs",
    "render",
    "render_pair",
]
