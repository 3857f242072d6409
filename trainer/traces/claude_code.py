"""Claude Code session logs (`~/.claude/projects/<project>/<session>.jsonl`) -> one example per leaf.

Each line is an entry linked to its parent by `uuid`/`parentUuid`; the conversation is the path
from a root to a leaf, and a rewind forks the tree, so every leaf becomes its own example (they
share a prefix). Subagent threads (`isSidechain`) are their own trees, interleaved in the file
or kept in `<session>/subagents/agent-<id>.jsonl` (a subagent's own subagents nest deeper); each
becomes an example whose `parent_id` is the example holding the spawning tool call. Since
Claude Code 2.1.2 each transcript has an `agent-<id>.meta.json` sidecar (`agentType`,
`description`, `toolUseId`, `spawnDepth`): it links the thread to its call and fills metadata.
A compaction starts a new root whose first message is the summary the model continued from.

`claude --resume` / `--continue` / a fork write a new file that replays the old history with the
same uuids. The files of one conversation are read as one tree: a record already read from
another file is ingested once and counted under `normalized` as `resumed_copy` (a record that
reuses a uuid with other content is still a `duplicate_uuid` issue), so a leaf that the new
file continues is no example of its own and nothing is counted twice.

Tool results may hold `tool_reference` blocks (tool search: "this tool is now available"); they
become text. Content blocks of kinds this reader does not know become a visible placeholder
(`[<type> block]`) and are counted as `unknown_content_block`.

Memory: a session is one tree, so it is held until the log moves on to another session (or the
file ends); per entry only what becomes a message is kept (usage, side-channel tool output and
base64 payloads are dropped while streaming), so memory follows the conversation text of the
largest session, not the size of the file.
"""

from __future__ import annotations

import json
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
SERVER_TOOL_CALLS = frozenset({"server_tool_use", "mcp_tool_use"})
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
        "session",
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
        self.session: str | None = record.get("sessionId")
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
    merged_digests: dict[str, tuple[int, int]] = field(default_factory=dict)  # merged split line -> (hash, source)
    by_message_id: dict[tuple[bool, str], _Node] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Spawn:
    """A Task/Agent tool call that starts a subagent thread."""

    tool_use_id: str
    prompt: str
    called_at: str | None
    answered_at: str | None = None


class _Quiet:
    """A FileContext stand-in that counts nothing: re-reading a copy must not count its blocks twice."""

    def __init__(self, ctx: FileContext) -> None:
        self.path = ctx.path

    def problem(self, *args: Any, **kwargs: Any) -> None:
        pass

    def normalized(self, *args: Any, **kwargs: Any) -> None:
        pass


# An example with the root of its tree and its path of entries, while the session is being linked.
_Built = tuple[TraceExample, _Node, list[_Node]]


def read_claude_code(
    mains: FileContext | Sequence[FileContext],
    subagents: Sequence[FileContext] = (),
    sidecars: Sequence[FileContext] = (),
) -> Iterator[TraceExample]:
    """Examples of every session in `mains` (one file, or the files of a resumed conversation).

    `subagents` are the sessions' subagent transcripts, `sidecars` their `*.meta.json` files.
    """
    mains = [mains] if isinstance(mains, FileContext) else list(mains)
    reader = _Reader([*subagents, *mains])
    for ctx in sidecars:
        reader.read_sidecar(ctx)
    for source, ctx in enumerate(reader.contexts[: len(subagents)]):
        for line, record, digest in iter_jsonl(ctx.path, ctx):
            reader.add(record, line, source, digest)
    current: str | None = None
    for source, main in enumerate(mains, start=len(subagents)):
        for line, record, digest in iter_jsonl(main.path, main):
            session_id = reader.session_of(record, main.path, source)
            if session_id is not None and session_id != current:
                if current is not None:
                    yield from reader.flush(current)
                if session_id in reader.flushed:
                    main.problem("session_interleaved", f"session {session_id}", line=line)
                current = session_id
            reader.add(record, line, source, digest)
    for session_id in list(reader.sessions):
        yield from reader.flush(session_id)


class _Reader:
    def __init__(self, contexts: list[FileContext]) -> None:
        self.contexts = contexts
        self.sessions: dict[str, _Session] = {}
        self.flushed: set[str] = set()
        self.titles: dict[str, str] = {}  # leafUuid -> session title from `summary` entries
        self.tree_of_uuid: dict[str, tuple[str, int]] = {}  # uuid -> (tree, file) it was read into
        self.tree_of_session: dict[str, str] = {}  # sessionId of a resumed copy -> the tree it continues
        self.agent_meta: dict[str, dict[str, Any]] = {}  # agent id -> its sidecar

    def read_sidecar(self, ctx: FileContext) -> None:
        """`agent-<id>.meta.json`: the subagent's type, description and spawning call."""
        try:
            value = json.loads(ctx.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            ctx.problem("invalid_json", str(error), line=getattr(error, "lineno", None))
            return
        if not isinstance(value, dict):
            ctx.problem("invalid_record", f"expected an object, got {type(value).__name__}")
            return
        agent_id = ctx.path.name.removesuffix(".meta.json").removeprefix("agent-")
        self.agent_meta[agent_id] = value
        ctx.normalized("sidecar_metadata")

    def session_of(self, record: dict[str, Any], path: Path, source: int) -> str | None:
        """The tree a record belongs to; None for records outside any (titles, snapshots).

        A record whose uuid was already read from another file under another session starts a
        resumed copy: its session is read into the tree it copies.
        """
        if record.get("type") in ("summary", "file-history-snapshot") or "uuid" not in record:
            return None
        session_id = str(record.get("sessionId") or path.stem)
        tree, known_source = (
            self.tree_of_uuid.get(record["uuid"], (None, None)) if isinstance(record["uuid"], str) else (None, None)
        )
        if tree is not None and tree != session_id and known_source != source and session_id not in self.sessions:
            self.tree_of_session.setdefault(session_id, tree)
        return self.tree_of_session.get(session_id, session_id)

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
        session_id = self.session_of(record, ctx.path, source)
        if session_id is None:
            return
        session = self.sessions.setdefault(session_id, _Session(session_id))
        node = _Node(uuid, record, line, source, digest)
        if uuid in session.nodes or uuid in session.merged_digests:
            self._duplicate(session, node, record, ctx)
            return
        self.tree_of_uuid[uuid] = (session_id, source)
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

    def _duplicate(self, session: _Session, node: _Node, record: dict[str, Any], ctx: FileContext) -> None:
        """A uuid seen before: a copy from another file (resumed session) or a duplicate in this one."""
        kept = session.nodes.get(node.uuid)
        known_digest, known_source = (
            (kept.digest, kept.source) if kept is not None else session.merged_digests[node.uuid]
        )
        if known_source != node.source:
            same = kept is None  # a merged split line: its blocks live on in the line it joined
            if kept is not None:
                copy = _Node(node.uuid, record, node.line, node.source, node.digest)
                message = record.get("message") if isinstance(record.get("message"), dict) else {}
                if record.get("type") == "assistant":
                    self._read_assistant(copy, message, _Quiet(ctx))
                elif record.get("type") == "user":
                    self._read_user(copy, record, message, _Quiet(ctx))
                blocks = kept.blocks[: len(copy.blocks)]  # split parts merged into `kept` come after
                same = (copy.role, copy.blocks, copy.parent) == (kept.role, blocks, kept.parent)
            if same:
                ctx.normalized("resumed_copy")
                return
        reason = "duplicate_line" if known_digest == node.digest else "duplicate_uuid"
        ctx.problem(reason, f"uuid {node.uuid}", line=node.line)

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
        session.merged_digests[node.uuid] = (node.digest, node.source)
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
            elif kind in SERVER_TOOL_CALLS:  # run by the API, not by Claude Code: what the model asked, as text
                arguments = json.dumps(block.get("input"), ensure_ascii=False, sort_keys=True)
                node.blocks.append(("text", f"[{kind}: {block.get('name', '')} {arguments}]"))
                ctx.normalized("server_tool_call_as_text")
            elif isinstance(kind, str) and kind.endswith("_tool_result"):  # the API's answer, not model text
                ctx.normalized("server_tool_result_omitted")
            else:
                ctx.problem("unknown_content_block", f"assistant block {kind!r}", line=node.line)
                node.blocks.append(("text", _unknown_block(kind)))

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
            elif kind == "tool_result" and isinstance(block.get("tool_use_id"), str):
                text = _result_text(block.get("content"), ctx, node.line)
                node.blocks.append(("tool_result", block["tool_use_id"], text, bool(block.get("is_error"))))
            else:
                node.blocks.append(("text", _block_text(block, ctx, node.line, "user")))
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
            self.tree_of_uuid.pop(node.uuid, None)
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
        session_id = leaf.session or session.session_id  # a resumed copy's own id where it continues
        if session_id != session.session_id:
            metadata["tree_id"] = session.session_id
        return TraceExample(
            id=f"{FORMAT}:{session_id}:{leaf.uuid}",
            format=FORMAT,
            session_id=session_id,
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
        for agent_id, meta in self.agent_meta.items():  # the sidecar names the spawning call outright
            if meta.get("toolUseId") in spawns:
                by_agent.setdefault(agent_id, meta["toolUseId"])
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
            meta = self.agent_meta.get(agent_id or "", {})
            for name, key in (
                ("agent_type", "agentType"),
                ("description", "description"),
                ("spawn_depth", "spawnDepth"),
            ):
                if key in meta:
                    example.metadata[name] = meta[key]
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
    return "\n".join(
        _block_text(b, ctx, line, "tool_result") for b in (content if isinstance(content, list) else [content])
    )


def _block_text(block: Any, ctx: FileContext, line: int, where: str) -> str:
    """A user or tool-result content block as text; an unknown kind becomes a counted placeholder."""
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text":
        return str(block.get("text") or "")
    if kind in ("image", "document"):
        return _placeholder(block, ctx)
    if kind == "tool_reference":  # tool search (Claude Code >= 2.1.69): a deferred tool became available
        ctx.normalized("tool_reference")
        return f"Tool available: {block.get('tool_name', '')}"
    if kind == "search_result":
        ctx.normalized("search_result")
        texts = [str(b.get("text") or "") for b in block.get("content") or [] if isinstance(b, dict)]
        return "\n".join([f"[search result: {block.get('title', '')} ({block.get('source', '')})]", *texts])
    ctx.problem("unknown_content_block", f"{where} block {kind!r}", line=line)
    return _unknown_block(kind)


def _unknown_block(kind: Any) -> str:
    return f"[{kind if isinstance(kind, str) else type(kind).__name__} block]"


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
