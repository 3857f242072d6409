"""Claude Code session logs (`~/.claude/projects/<project>/<session>.jsonl`) -> one example per leaf.

Each line is an entry linked to its parent by `uuid`/`parentUuid`; the conversation is the path
from a root to a leaf, and a rewind forks the tree, so every leaf becomes its own example (they
share a prefix). Subagent threads (`isSidechain`) are their own trees, interleaved in the file
or kept in `<session>/subagents/agent-<id>.jsonl`; each becomes an example whose `parent_id` is
the example holding the spawning tool call. A compaction starts a new root whose first message
is the summary the model continued from.

Memory: a session is one tree, so it is held until the log moves on to another session (or the
file ends); per entry only what becomes a message is kept (usage, side-channel tool output and
base64 payloads are dropped while streaming), so memory follows the conversation text of the
largest session, not the size of the file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .conversation import ConversationBuilder
from .reading import FileContext, iter_jsonl
from .schema import COMPACT_SUMMARY, INTERRUPTION, MESSAGE, REFUSAL, Message, ToolCall, TraceExample

FORMAT = "claude_code"

# Entries that take part in the parent chain (or carry bookkeeping) but hold no conversation.
STRUCTURAL_TYPES = frozenset(
    {
        "system",
        "progress",
        "attachment",
        "agent-setting",
        "pr-link",
        "ai-title",
        "custom-title",
        "permission-mode",
        "file-history-snapshot",
        "queue-operation",
    }
)
SPAWN_TOOLS = frozenset({"Task", "Agent"})
INTERRUPTION_PREFIX = "[Request interrupted by user"
REFUSAL_PREFIXES = (
    "The user doesn't want to proceed with this tool use",
    "The user doesn't want to take this action right now",
)
CLIENT_SYNTHETIC_MODEL = "<synthetic>"  # API-error notices Claude Code writes as assistant entries


class _Node:
    """One entry of the tree, reduced to what becomes messages."""

    __slots__ = (
        "uuid",
        "parent",
        "line",
        "source",
        "sidechain",
        "agent_id",
        "spawned_agent",
        "role",
        "blocks",
        "model",
        "timestamp",
        "compact_summary",
        "boundary",
        "digest",
        "up",
        "children",
    )

    def __init__(self, uuid: str, record: dict[str, Any], line: int, source: int, digest: int) -> None:
        self.uuid = uuid
        self.parent: str | None = record.get("parentUuid")
        self.line = line
        self.source = source  # index of the file the entry came from
        self.sidechain = bool(record.get("isSidechain"))
        self.agent_id: str | None = record.get("agentId") if self.sidechain else None
        self.spawned_agent: str | None = None  # on a tool result: the subagent that produced it
        self.role: str | None = None  # "user" / "assistant"; None for structural entries
        self.blocks: list[tuple] = []
        self.model: str | None = None
        self.timestamp: str | None = record.get("timestamp")
        self.compact_summary = bool(record.get("isCompactSummary"))
        self.boundary: dict[str, Any] | None = None
        self.digest = digest
        self.up: _Node | None = None  # the resolved parent
        self.children: list[_Node] = []

    @property
    def tool_use_ids(self) -> set[str]:
        return {b[1] for b in self.blocks if b[0] == "tool_use"}

    @property
    def only_tool_results(self) -> bool:
        return self.role == "user" and bool(self.blocks) and all(b[0] == "tool_result" for b in self.blocks)


@dataclass
class _Session:
    session_id: str
    nodes: dict[str, _Node] = field(default_factory=dict)
    alias: dict[str, str] = field(default_factory=dict)  # uuid of a merged split line -> kept uuid
    merged_digests: dict[str, int] = field(default_factory=dict)  # uuid of a merged split line -> its hash
    by_message_id: dict[tuple[bool, str], _Node] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Spawn:
    """A Task/Agent tool call that starts a subagent thread."""

    tool_use_id: str
    prompt: str
    called_at: str | None
    answered_at: str | None = None


# An example with the root of its tree and its path of entries, while the session is being linked.
_Built = tuple[TraceExample, _Node, list[_Node]]


def read_claude_code(main: FileContext, subagents: Sequence[FileContext] = ()) -> Iterator[TraceExample]:
    """Examples of every session in `main`; `subagents` are that session's `subagents/*.jsonl` files."""
    reader = _Reader([*subagents, main])
    for source, ctx in enumerate(reader.contexts[:-1]):
        for line, record, digest in iter_jsonl(ctx.path, ctx):
            reader.add(record, line, source, digest)
    main_source = len(reader.contexts) - 1
    current: str | None = None
    for line, record, digest in iter_jsonl(main.path, main):
        session_id = reader.session_of(record, main.path)
        if session_id is not None and session_id != current:
            if current is not None:
                yield from reader.flush(current)
            if session_id in reader.flushed:
                main.problem("session_interleaved", f"session {session_id}", line=line)
            current = session_id
        reader.add(record, line, main_source, digest)
    for session_id in list(reader.sessions):
        yield from reader.flush(session_id)


class _Reader:
    def __init__(self, contexts: list[FileContext]) -> None:
        self.contexts = contexts
        self.sessions: dict[str, _Session] = {}
        self.flushed: set[str] = set()
        self.titles: dict[str, str] = {}  # leafUuid -> session title from `summary` entries

    @staticmethod
    def session_of(record: dict[str, Any], path: Path) -> str | None:
        """The session a record belongs to; None for records outside any session (titles, snapshots)."""
        if record.get("type") in ("summary", "file-history-snapshot") or "uuid" not in record:
            return None
        return str(record.get("sessionId") or path.stem)

    # ---------------------------------------------------------------- streaming: one entry at a time

    def add(self, record: dict[str, Any], line: int, source: int, digest: int) -> None:
        ctx = self.contexts[source]
        kind = record.get("type")
        if kind == "summary":
            if isinstance(record.get("leafUuid"), str):
                self.titles[record["leafUuid"]] = str(record.get("summary", ""))
            return
        if kind not in STRUCTURAL_TYPES and kind not in ("user", "assistant"):
            ctx.problem("unknown_entry_type", f"type {kind!r}", line=line)
        uuid = record.get("uuid")
        if not isinstance(uuid, str):
            if kind in ("user", "assistant"):
                ctx.problem("invalid_record", "entry without a uuid", line=line)
            return  # bookkeeping outside the tree
        session_id = self.session_of(record, ctx.path)
        if session_id is None:
            return
        session = self.sessions.setdefault(session_id, _Session(session_id))
        if uuid in session.nodes or uuid in session.merged_digests:
            known = session.nodes[uuid].digest if uuid in session.nodes else session.merged_digests[uuid]
            ctx.problem("duplicate_line" if known == digest else "duplicate_uuid", f"uuid {uuid}", line=line)
            return
        node = _Node(uuid, record, line, source, digest)
        for name, key in (("cwd", "cwd"), ("git_branch", "gitBranch"), ("version", "version")):
            if record.get(key) and name not in session.metadata:
                session.metadata[name] = record[key]
        if kind in ("user", "assistant"):
            message = record.get("message")
            if not isinstance(message, dict):
                ctx.problem("invalid_record", f"{kind} entry without a message object", line=line)
                message = {}
            if kind == "assistant":
                if self._merge_split_message(session, node, message, ctx):
                    return
                self._read_assistant(node, message, ctx)
            else:
                self._read_user(node, record, message, ctx)
        elif kind == "system" and record.get("subtype") == "compact_boundary":
            node.parent = None
            node.boundary = {
                "logical_parent": record.get("logicalParentUuid"),
                **(record.get("compactMetadata") or {}),
            }
        session.nodes[uuid] = node

    def _merge_split_message(self, session: _Session, node: _Node, message: dict, ctx: FileContext) -> bool:
        """Claude Code logs one API message as one line per content block, sharing `message.id`."""
        message_id = message.get("id")
        if not isinstance(message_id, str):
            return False
        kept = session.by_message_id.get((node.sidechain, message_id))
        if kept is None:
            session.by_message_id[(node.sidechain, message_id)] = node
            return False
        part = _Node(node.uuid, {}, node.line, node.source, node.digest)
        self._read_assistant(part, message, ctx)
        known_calls = kept.tool_use_ids
        for block in part.blocks:
            duplicate = block[1] in known_calls if block[0] == "tool_use" else block in kept.blocks
            if not duplicate:
                kept.blocks.append(block)
        session.alias[node.uuid] = kept.uuid
        session.merged_digests[node.uuid] = node.digest
        ctx.normalized("split_message_merged")
        return True

    def _read_assistant(self, node: _Node, message: dict, ctx: FileContext) -> None:
        node.model = message.get("model")
        if node.model == CLIENT_SYNTHETIC_MODEL:
            ctx.normalized("client_synthetic_message")
            return  # stays structural: Claude Code wrote it, the model did not
        node.role = "assistant"
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        for block in content if isinstance(content, list) else []:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                node.blocks.append(("text", str(block.get("text") or "")))
            elif kind == "thinking":
                node.blocks.append(("thinking", str(block.get("thinking") or "")))
            elif kind == "redacted_thinking":
                ctx.normalized("redacted_thinking_omitted")
            elif kind == "tool_use" and isinstance(block.get("id"), str):
                arguments = block.get("input")
                if not isinstance(arguments, dict):
                    ctx.problem("invalid_tool_arguments", f"tool_use {block['id']}", line=node.line)
                    arguments = {"_raw": arguments}
                node.blocks.append(("tool_use", block["id"], str(block.get("name", "")), arguments))
            else:
                ctx.problem("unknown_content_block", f"assistant block {kind!r}", line=node.line)

    def _read_user(self, node: _Node, record: dict, message: dict, ctx: FileContext) -> None:
        node.role = "user"
        content = message.get("content")
        if isinstance(content, str):
            node.blocks.append(("text", content))
            return
        for block in content if isinstance(content, list) else []:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                node.blocks.append(("text", str(block.get("text") or "")))
            elif kind in ("image", "document"):
                node.blocks.append(("text", _placeholder(block, ctx)))
            elif kind == "tool_result" and isinstance(block.get("tool_use_id"), str):
                text = _result_text(block.get("content"), ctx, node.line)
                node.blocks.append(("tool_result", block["tool_use_id"], text, bool(block.get("is_error"))))
            else:
                ctx.problem("unknown_content_block", f"user block {kind!r}", line=node.line)
        if node.only_tool_results:
            side_channel = record.get("toolUseResult")
            spawned = side_channel.get("agentId") if isinstance(side_channel, dict) else None
            node.spawned_agent = spawned or (None if node.sidechain else record.get("agentId"))

    # ---------------------------------------------------------------- a finished session -> examples

    def flush(self, session_id: str) -> Iterator[TraceExample]:
        session = self.sessions.pop(session_id)
        self.flushed.add(session_id)
        reported: set[tuple] = set()

        def problem_at(source: int) -> Callable[..., None]:
            def problem(reason: str, detail: str = "", *, line: int | None = None, key: str | None = None) -> None:
                if (reason, source, line, detail) not in reported:  # shared prefixes are built once per leaf
                    reported.add((reason, source, line, detail))
                    self.contexts[source].problem(reason, detail, line=line, key=key)

            return problem

        roots = _link(session, problem_at)
        examples: list[_Built] = []
        call_owner: dict[str, str] = {}  # tool_use id -> first example whose path holds the call
        for root in roots:
            for leaf in _content_leaves(root):
                path = _path_to(leaf)
                builder = ConversationBuilder(problem_at(leaf.source))
                for node in path:
                    for message in _node_messages(node):
                        builder.add(message, line=node.line)
                if not builder.messages:
                    continue
                example = self._example(session, root, leaf, path, builder.messages)
                for node in path:
                    for tool_use_id in node.tool_use_ids:
                        call_owner.setdefault(tool_use_id, example.id)
                examples.append((example, root, path))
        _link_compactions(examples)
        self._link_sidechains(session, examples, call_owner, problem_at)
        examples.sort(key=lambda item: item[1].sidechain)  # main thread first, then subagents
        for node in session.nodes.values():  # parent <-> child links are cycles: free the tree now
            node.up, node.children = None, []
        for example, _, _ in examples:
            yield example

    def _example(
        self, session: _Session, root: _Node, leaf: _Node, path: list[_Node], messages: list[Message]
    ) -> TraceExample:
        stamps = [node.timestamp for node in path if node.timestamp]
        metadata: dict[str, Any] = {
            "leaf_uuid": leaf.uuid,
            "model": next((n.model for n in path if n.role == "assistant" and n.model), None),
            "first_timestamp": stamps[0] if stamps else None,
            "last_timestamp": stamps[-1] if stamps else None,
            "is_sidechain": root.sidechain,
            **session.metadata,
        }
        if leaf.uuid in self.titles:
            metadata["title"] = self.titles[leaf.uuid]
        if root.boundary is not None:
            metadata["compaction"] = dict(root.boundary)
        return TraceExample(
            id=f"{FORMAT}:{session.session_id}:{leaf.uuid}",
            format=FORMAT,
            session_id=session.session_id,
            messages=messages,
            metadata=metadata,
        )

    def _link_sidechains(
        self,
        session: _Session,
        examples: list[_Built],
        call_owner: dict[str, str],
        problem_at: Callable[[int], Callable[..., None]],
    ) -> None:
        """Tie each subagent thread to its spawning call: by agentId, then prompt, then time window."""
        spawns: dict[str, _Spawn] = {}
        by_agent: dict[str, str] = {}
        for node in session.nodes.values():
            for block in node.blocks:
                if block[0] == "tool_use" and block[2] in SPAWN_TOOLS:
                    spawns[block[1]] = _Spawn(block[1], str(block[3].get("prompt", "")), node.timestamp)
        for node in session.nodes.values():
            for block in node.blocks:
                if block[0] == "tool_result" and block[1] in spawns:
                    spawns[block[1]].answered_at = node.timestamp
                    if node.spawned_agent:
                        by_agent[node.spawned_agent] = block[1]
        owner_of_root: dict[int, str] = {}  # id(thread root) -> spawning tool_use id ("" if none found)
        for example, root, path in examples:
            if not root.sidechain:
                continue
            if id(root) not in owner_of_root:
                spawn = _find_spawn(root, path, spawns, by_agent)
                owner_of_root[id(root)] = spawn.tool_use_id if spawn else ""
                if spawn is None:
                    problem_at(root.source)("unlinked_sidechain", f"thread rooted at {root.uuid}", line=root.line)
            tool_use_id = owner_of_root[id(root)]
            agent_id = next((n.agent_id for n in path if n.agent_id), None)
            example.metadata.update(agent_id=agent_id, parent_tool_call_id=tool_use_id or None)
            if not tool_use_id:
                continue
            example.parent_id = call_owner.get(tool_use_id)
            if example.messages[0].role != "user" and spawns[tool_use_id].prompt:
                problem_at(root.source)("missing_sidechain_prompt", f"thread rooted at {root.uuid}", line=root.line)
                example.messages.insert(0, Message("user", spawns[tool_use_id].prompt, synthetic=True))


def _link_compactions(examples: list[_Built]) -> None:
    """A compaction starts a new root; record which example it continues (via logicalParentUuid)."""
    for example, root, _ in examples:
        if root.boundary is not None:
            logical = root.boundary.get("logical_parent")
            continued = next((e.id for e, _, path in examples if any(n.uuid == logical for n in path)), None)
            example.metadata["compaction"]["continues"] = continued


def _find_spawn(root: _Node, path: list[_Node], spawns: dict[str, _Spawn], by_agent: dict[str, str]) -> _Spawn | None:
    agent_id = next((n.agent_id for n in _subtree(root) if n.agent_id), None)
    if agent_id in by_agent:
        return spawns[by_agent[agent_id]]
    first_text = next((b[1] for n in path for b in n.blocks if n.role == "user" and b[0] == "text"), None)
    by_prompt = [s for s in spawns.values() if first_text is not None and s.prompt == first_text]
    if len(by_prompt) == 1:
        return by_prompt[0]
    started = root.timestamp
    if started is None:
        return None
    in_window = [
        s
        for s in spawns.values()
        if s.called_at and s.called_at <= started and (s.answered_at is None or started <= s.answered_at)
    ]
    return in_window[0] if len(in_window) == 1 else None


# -------------------------------------------------------------------- tree building


def _link(session: _Session, problem_at) -> list[_Node]:
    """Resolve parents (dangling -> previous entry of the same thread), break cycles; return roots."""
    nodes = session.nodes
    previous_in_thread: dict[tuple[int, bool], str] = {}
    for node in nodes.values():
        parent = node.parent
        if parent is not None:
            parent = session.alias.get(parent, parent)
            if parent not in nodes or parent == node.uuid:
                problem_at(node.source)("dangling_parent", f"parentUuid {node.parent}", line=node.line)
                parent = previous_in_thread.get((node.source, node.sidechain))
        node.parent = parent
        previous_in_thread[(node.source, node.sidechain)] = node.uuid
    acyclic: set[str] = set()
    for node in nodes.values():
        seen: list[str] = []
        current: str | None = node.uuid
        while current is not None and current not in acyclic:
            if current in seen:
                culprit = nodes[current]
                problem_at(culprit.source)("parent_cycle", f"uuid {current}", line=culprit.line)
                culprit.parent = None
                break
            seen.append(current)
            current = nodes[current].parent
        acyclic.update(seen)
    roots = []
    for node in nodes.values():
        if node.parent is None:
            roots.append(node)
        else:
            node.up = nodes[node.parent]
            node.up.children.append(node)
    for node in nodes.values():
        _chain_parallel_results(node)
    return roots


def _chain_parallel_results(node: _Node) -> None:
    """Results of parallel tool calls hang side by side under the call; that is no fork, chain them."""
    if node.role != "assistant" or len(node.children) < 2:
        return
    calls = node.tool_use_ids
    results = [c for c in node.children if c.only_tool_results and all(b[1] in calls for b in c.blocks)]
    for earlier, later in zip(results, results[1:], strict=False):
        node.children.remove(later)
        earlier.children.append(later)
        later.up = earlier


def _subtree(root: _Node) -> Iterator[_Node]:
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.children))


def _content_leaves(root: _Node) -> list[_Node]:
    """Leaves of the tree once branches holding no conversation (hooks, progress notes) are pruned."""
    order = list(_subtree(root))
    has_content: dict[int, bool] = {}
    for node in reversed(order):  # children before parents
        has_content[id(node)] = bool(node.role and node.blocks) or any(has_content[id(c)] for c in node.children)
    return [n for n in order if has_content[id(n)] and not any(has_content[id(c)] for c in n.children)]


def _path_to(leaf: _Node) -> list[_Node]:
    path = [leaf]
    while path[-1].up is not None:
        path.append(path[-1].up)
    return path[::-1]


# -------------------------------------------------------------------- entries -> messages


def _placeholder(block: dict[str, Any], ctx: FileContext) -> str:
    """Base64 images and documents become a short marker; the payload is counted and dropped."""
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    ctx.normalized(f"{block.get('type')}_omitted")
    ctx.normalized("base64_chars_omitted", len(source.get("data") or ""))
    return f"[{block.get('type')}: {source.get('media_type', 'unknown type')} omitted]"


def _result_text(content: Any, ctx: FileContext, line: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for block in content if isinstance(content, list) else [content]:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append(str(block.get("text") or ""))
        elif kind in ("image", "document"):
            parts.append(_placeholder(block, ctx))
        else:
            ctx.problem("unknown_content_block", f"tool_result block {kind!r}", line=line)
    return "\n".join(parts)


def _node_messages(node: _Node) -> list[Message]:
    if node.role == "assistant":
        if not node.blocks:
            return []
        return [
            Message(
                "assistant",
                "\n".join(b[1] for b in node.blocks if b[0] == "text"),
                tool_calls=[ToolCall(b[1], b[2], b[3]) for b in node.blocks if b[0] == "tool_use"],
                reasoning="\n".join(b[1] for b in node.blocks if b[0] == "thinking"),
                timestamp=node.timestamp,
            )
        ]
    if node.role != "user":
        return []
    messages = [
        Message(
            "tool",
            b[2],
            tool_call_id=b[1],
            is_error=b[3],
            timestamp=node.timestamp,
            kind=REFUSAL if b[2].startswith(REFUSAL_PREFIXES) else MESSAGE,
        )
        for b in node.blocks
        if b[0] == "tool_result"
    ]
    texts = [b[1] for b in node.blocks if b[0] == "text"]
    if texts:
        text = "\n".join(texts)
        kind = MESSAGE
        if node.compact_summary:
            kind = COMPACT_SUMMARY
        elif text.startswith(INTERRUPTION_PREFIX):
            kind = INTERRUPTION
        messages.append(Message("user", text, kind=kind, timestamp=node.timestamp))
    return messages
