"""The program that runs inside every sandbox: standard library only, no trainer imports.

`trainer.sandbox` starts it (as `python -I -S -B -c <this file>`) inside bubblewrap or a Docker
container and talks to it over stdin/stdout. It is two processes:

- the *judge* (this process) reads the job, forks the candidate, and alone holds the channel the
  verdict goes back on (its stdout, duplicated to a private descriptor before anything else runs).
  It makes itself non-dumpable, so a process of the same uid can neither ptrace it nor open its
  /proc/<pid>/fd or /proc/<pid>/mem. Trusted test code (the problem's tests, never model output)
  runs here, after the candidate has loaded, in an interpreter the candidate never touched.
- the *candidate* is forked before the judge reads anything secret (the nonce, the tests): it
  closes every descriptor but its own pipes, takes its rlimits and its own session, and runs the
  model's program. With a check, the tests reach the candidate's function only through a call
  bridge that carries plain data (None, bool, int, float, complex, str, bytes, range, and lists,
  tuples, dicts, sets of those; an iterator the candidate returns crosses as its items), so
  nothing the candidate defines (an object whose __eq__ is always True, patched builtins, an exit
  before the tests, os._exit) can make a test pass that should fail.

Wire format: the host sends two frames on stdin (8-byte big-endian length, then `dumps` bytes):
the job (visible to the candidate) and the judge's secrets (nonce and check). The judge answers
with one such frame, holding the nonce, on its private stdout. Between judge and candidate:
4-byte-length frames on a pair of pipes. Imports are kept few and lazy: interpreter start-up is
most of a check's cost.
"""

import _signal as signal  # the C module: `signal` imports enum, a third of start-up
import builtins
import os
import resource
import select
import struct
import sys
import time

MAX_ITEMS = 100_000  # items of an iterator a candidate returns, taken across the bridge as a list
MAX_FRAME = 64 << 20  # bytes: a larger result from the candidate is an error, not a memory blow-up
HARNESS_FILE = (lambda: None).__code__.co_filename
CANDIDATE_SOURCE = None  # (filename, source), for tracebacks
EXCLUDED_EXCEPTIONS = ("SystemExit", "KeyboardInterrupt", "GeneratorExit", "BaseException", "Exception")


# ---- plain data: the only thing that crosses between host, judge and candidate ----------------
#
# A tagged, length-prefixed encoding with a decoder that can only build None, bool, int, float,
# complex, str, bytes, list, tuple, dict, set and frozenset: safe on hostile input (unlike pickle or
# marshal) and, unlike json, free of the `re` import that would double the judge's start-up time.


def dumps(value):
    out = []
    _dump(value, out, 0)
    return b"".join(out)


def _dump(value, out, depth):
    kind = type(value)  # exact types: a subclass could carry a forged __eq__
    if depth > 100:
        raise TypeError("nested deeper than 100 levels")
    if value is None:
        out.append(b"N")
    elif value is True:
        out.append(b"T")
    elif value is False:
        out.append(b"F")
    elif kind is int:
        out.append(b"i%x;" % value)  # hex: no limit on digits (decimal str() has one)
    elif kind is float:
        out.append(b"f%s;" % repr(value).encode())
    elif kind is complex:
        out.append(b"c%s;%s;" % (repr(value.real).encode(), repr(value.imag).encode()))
    elif kind is str or kind is bytes:
        data = value.encode("utf-8", "surrogatepass") if kind is str else value
        out.append(b"%s%d:" % (b"s" if kind is str else b"b", len(data)))
        out.append(data)
    elif kind is range:
        out.append(b"r")
        for number in (value.start, value.stop, value.step):
            _dump(number, out, depth + 1)
    elif kind in _CONTAINER_TAGS:
        out.append(b"%s%d;" % (_CONTAINER_TAGS[kind], len(value)))
        items = value.items() if kind is dict else ((item,) for item in value)
        for pair in items:
            for item in pair:
                _dump(item, out, depth + 1)
    else:
        raise TypeError(f"{kind.__name__} is not plain data")


_CONTAINER_TAGS = {list: b"l", tuple: b"t", dict: b"d", set: b"S", frozenset: b"z"}
PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes, range, *_CONTAINER_TAGS)


def loads(data):
    value, end = _load(bytes(data), 0, 0)
    if end != len(data):
        raise ValueError("trailing bytes")
    return value


def _number(data, pos, end_char=b";"):
    end = data.index(end_char, pos)
    return data[pos:end].decode("ascii"), end + 1


def _load(data, pos, depth):
    if depth > 100:
        raise ValueError("nested deeper than 100 levels")
    tag = data[pos : pos + 1]
    pos += 1
    if tag == b"N":
        return None, pos
    if tag == b"T" or tag == b"F":
        return tag == b"T", pos
    if tag == b"i":
        text, pos = _number(data, pos)
        return int(text, 16), pos
    if tag == b"f":
        text, pos = _number(data, pos)
        return float(text), pos
    if tag == b"c":
        real, pos = _number(data, pos)
        imag, pos = _number(data, pos)
        return complex(float(real), float(imag)), pos
    if tag == b"s" or tag == b"b":
        text, pos = _number(data, pos, b":")
        size = int(text)
        if size < 0 or pos + size > len(data):
            raise ValueError("truncated string")
        chunk = data[pos : pos + size]
        return (chunk.decode("utf-8", "surrogatepass") if tag == b"s" else chunk), pos + size
    if tag == b"r":
        bounds = []
        for _ in range(3):
            number, pos = _load(data, pos, depth + 1)
            if type(number) is not int:
                raise ValueError("range bounds must be ints")
            bounds.append(number)
        return range(*bounds), pos
    if tag in (b"l", b"t", b"d", b"S", b"z"):
        text, pos = _number(data, pos)
        count = int(text)
        if count < 0 or count > len(data):
            raise ValueError("bad length")
        items = []
        for _ in range(count * 2 if tag == b"d" else count):
            item, pos = _load(data, pos, depth + 1)
            items.append(item)
        if tag == b"l":
            return items, pos
        if tag == b"t":
            return tuple(items), pos
        if tag == b"d":
            return dict(zip(items[::2], items[1::2], strict=True)), pos
        return (set(items) if tag == b"S" else frozenset(items)), pos
    raise ValueError(f"unknown tag {tag!r}")


# ---- framing ---------------------------------------------------------------------------------


def read_frame(fd):
    """One host frame: 8-byte big-endian length, then `dumps` bytes. Reads exactly that much."""
    (length,) = struct.unpack(">Q", _read_exact(fd, 8))
    return loads(_read_exact(fd, length))


def write_frame(fd, value):
    _write_all(fd, (lambda data: struct.pack(">Q", len(data)) + data)(dumps(value)))


def _read_exact(fd, n):
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Output:
    """One of the candidate's output pipes, drained into a head and a tail within `limit` bytes."""

    def __init__(self, fd, limit):
        self.fd, self.limit = fd, limit
        self.head, self.tail, self.dropped = bytearray(), bytearray(), 0

    def drain(self):
        """Read what is there; False at end of file."""
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            os.close(self.fd)
            self.fd = None
            return False
        half = self.limit // 2
        room = half - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        self.tail += chunk
        if len(self.tail) > half:
            self.dropped += len(self.tail) - half
            del self.tail[: len(self.tail) - half]
        return True

    def text(self):
        middle = f"\n... [{self.dropped} bytes truncated] ...\n".encode() if self.dropped else b""
        return (bytes(self.head) + middle + bytes(self.tail)).decode("utf-8", "replace")


class Channel:
    """4-byte-length frames over a pair of pipes. Waiting for a frame also drains `outputs`, so a
    candidate that prints a lot never blocks on a full pipe while the judge waits for it."""

    def __init__(self, read_fd, write_fd, outputs=()):
        self.read_fd, self.write_fd, self.outputs = read_fd, write_fd, list(outputs)
        self.buffer = bytearray()

    def send(self, value):
        data = dumps(value)
        _write_all(self.write_fd, struct.pack(">I", len(data)) + data)

    def recv(self, deadline=None):
        while True:
            if len(self.buffer) >= 4:
                (length,) = struct.unpack(">I", self.buffer[:4])
                if length > MAX_FRAME:
                    raise ValueError(f"a message of {length} bytes exceeds {MAX_FRAME}")
                if len(self.buffer) >= 4 + length:
                    frame = bytes(self.buffer[4 : 4 + length])
                    del self.buffer[: 4 + length]
                    return loads(frame)
            self._wait(deadline)

    def _wait(self, deadline):
        outputs = [o for o in self.outputs if o.fd is not None]
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            raise TimeoutError
        ready, _, _ = select.select([self.read_fd] + [o.fd for o in outputs], [], [], timeout)
        if not ready:
            raise TimeoutError
        for output in outputs:
            if output.fd in ready:
                output.drain()
        if self.read_fd in ready:
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise EOFError
            self.buffer += chunk

    def drain_outputs(self, deadline):
        """Read the outputs to their end (every writer gone) or until `deadline`."""
        while True:
            outputs = [o for o in self.outputs if o.fd is not None]
            remaining = deadline - time.monotonic()
            if not outputs or remaining <= 0:
                return
            ready, _, _ = select.select([o.fd for o in outputs], [], [], remaining)
            for output in outputs:
                if output.fd in ready:
                    output.drain()


def describe_exception(exc):
    """Type, message and the traceback from the candidate's first frame on (the harness's cut)."""
    if CANDIDATE_SOURCE is not None:
        import linecache

        filename, source = CANDIDATE_SOURCE
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == HARNESS_FILE:
        tb = tb.tb_next
    try:
        message = str(exc)[:2000]
    except BaseException:
        message = "<unprintable>"
    try:
        import traceback

        text = "".join(traceback.format_exception(type(exc), exc, tb))[-4000:]
    except BaseException:
        text = f"{type(exc).__name__}: {message}"
    return {"type": type(exc).__name__, "message": message, "traceback": text}


# ---- the candidate process -------------------------------------------------------------------


def set_limits(limits):
    cpu = limits["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    memory = limits["memory_mb"] << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_size_mb"] << 20,) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def candidate_main(job, channel, out_w, err_w):
    """Never returns. Runs the model's program; with a check, then serves calls to it."""
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    keep = {0, 1, 2, channel.read_fd, channel.write_fd}
    for fd in map(int, os.listdir("/proc/self/fd")):
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    set_limits(job["limits"])
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    filename = job["filename"]
    source = job["source"]
    global CANDIDATE_SOURCE
    CANDIDATE_SOURCE = (filename, source)
    namespace = {"__name__": job["module_name"], "__builtins__": builtins, "__file__": filename}
    try:
        exec(compile(source, filename, "exec"), namespace)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) or exc.code is None else 1
        _flush()
        _say(channel, {"exit": code or 0})
        os._exit(code or 0)
    except BaseException as exc:
        info = describe_exception(exc)
        try:
            sys.stderr.write(info["traceback"])
        except BaseException:
            pass
        _flush()
        _say(channel, {"raised": info})
        os._exit(1)
    _flush()
    if job["mode"] == "run":
        _say(channel, {"exit": 0})
        os._exit(0)
    _say(channel, {"ready": True})
    while True:
        try:
            request = channel.recv()
        except BaseException:
            os._exit(0)
        try:
            function = namespace.get(request["name"])
            if not callable(function):
                raise NameError(f"the solution defines no function {request['name']!r}")
            result = function(*request["args"], **request["kwargs"])
        except BaseException as exc:  # noqa: B036 - SystemExit from a call is the candidate's answer too
            reply = {"raised": describe_exception(exc)}
        else:
            try:
                if hasattr(type(result), "__next__") and type(result) not in PLAIN_TYPES:
                    # an iterator (a generator...): its items, at most MAX_ITEMS; the judge gets iter(items)
                    items = []
                    for item in result:
                        items.append(item)
                        if len(items) > MAX_ITEMS:
                            raise TypeError(f"the iterator yielded more than {MAX_ITEMS} items")
                    reply = {"iterator": dumps(items)}
                else:
                    reply = {"value": dumps(result)}
            except TypeError as exc:
                message = (
                    f"{request['name']} returned {type(result).__name__}; a solution must return plain data ({exc})"
                )
                reply = {"raised": {"type": "TypeError", "message": message, "traceback": f"TypeError: {message}\n"}}
        _flush()
        _say(channel, reply)


def _say(channel, obj):
    try:
        channel.send(obj)
    except BaseException:
        os._exit(1)


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


# ---- the judge ------------------------------------------------------------------------------


class CandidateGone(BaseException):
    """The candidate's process ended (or stopped answering) while the tests needed it."""


class CandidateTimeout(BaseException):
    """Past the deadline. BaseException, like CandidateGone, so that a test's `except Exception` cannot
    swallow it and go on to pass."""


class Bridge:
    """The judge's end: calls into the candidate with plain data, under one deadline."""

    def __init__(self, channel, deadline):
        self.channel = channel
        self.deadline = deadline
        self.last_call = None

    def receive(self):
        try:
            return self.channel.recv(self.deadline)
        except TimeoutError:
            raise CandidateTimeout from None
        except EOFError as exc:
            raise CandidateGone from exc

    def call(self, name, args, kwargs):
        self.last_call = [name, args, kwargs, ""]
        try:
            self.channel.send({"name": name, "args": args, "kwargs": kwargs})
        except OSError as exc:
            raise CandidateGone from exc
        reply = self.receive()
        if "raised" in reply:
            raise rebuild_exception(reply["raised"])
        try:
            value = loads(reply["value"]) if "value" in reply else iter(loads(reply["iterator"]))
        except (ValueError, TypeError, KeyError) as exc:
            raise CandidateGone(f"malformed reply: {exc}") from None
        self.last_call[3] = f" returned {value!r}"[:400]
        return value


def rebuild_exception(info):
    """A builtin exception type by name (tests may expect ValueError...), else RuntimeError."""
    cls = getattr(builtins, str(info.get("type")), None)
    ok = isinstance(cls, type) and issubclass(cls, BaseException) and cls.__name__ not in EXCLUDED_EXCEPTIONS
    exc = cls(str(info.get("message"))) if ok else RuntimeError(f"{info.get('type')}: {info.get('message')}")
    exc.candidate_traceback = str(info.get("traceback", ""))
    return exc


def make_proxy(bridge, name):
    def candidate(*args, **kwargs):
        return bridge.call(name, args, kwargs)

    candidate.__name__ = candidate.__qualname__ = name
    return candidate


def set_nondumpable():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE = 4
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def kill_everything_else(pid, job):
    """SIGKILL the candidate's process group and, where the backend says this uid owns nothing else
    in this pid namespace, every process of the uid but us (kill(-1)): daemons that left the group
    too, so their pipes close now. Never kill(-1) as root or unasked: outside a sandbox that would
    hit the whole host. (Under bubblewrap the kernel also kills the namespace when the judge exits.)"""
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    if job.get("kill_all_of_uid") and os.getuid() != 0:
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass


def wait_candidate(pid, deadline):
    """(wait status or None on timeout). Uses a pidfd so the wait has a deadline."""
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
    finally:
        os.close(pidfd)
    if not ready:
        return None
    return os.waitpid(pid, 0)[1]


def status_of_exception(type_name):
    if type_name == "AssertionError":
        return "failed"
    if type_name == "MemoryError":
        return "memory"
    return "error"


def status_of_wait(wait_status, timed_out):
    """(status, returncode) from how the candidate's process ended."""
    if timed_out:
        return "timeout", None
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        return ("timeout" if sig == signal.SIGXCPU else "killed"), -sig
    code = os.waitstatus_to_exitcode(wait_status)
    return ("passed" if code == 0 else "error"), code


def judge_main():
    """One program per interpreter (docker backend; bubblewrap without a zygote)."""
    report_fd = os.dup(1)
    devnull = os.open("/dev/null", os.O_RDWR)
    os.dup2(devnull, 1)
    set_nondumpable()
    if os.environ.get("SANDBOX_WIPE"):  # docker backend: a reused container starts clean
        wipe(os.environ["SANDBOX_WIPE"].split(":"))
    judge(read_frame(0), report_fd, devnull)


def judge(job, report_fd, devnull):
    """Fork the candidate, then read the judge's frame, run the program or check, report."""
    limits = job["limits"]
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"],) * 2)
    for module in job["preload"]:  # before the fork: judge and candidate share one import
        __import__(module)
    os.chdir("/work")
    to_candidate_r, to_candidate_w = os.pipe()
    to_judge_r, to_judge_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            candidate_main(job, Channel(to_candidate_r, to_judge_w), out_w, err_w)
        finally:
            os._exit(70)
    for fd in (to_candidate_r, to_judge_w, out_w, err_w):
        os.close(fd)
    outputs = [Output(out_r, job["output_limit"]), Output(err_r, job["output_limit"])]
    secret = read_frame(0)
    os.dup2(devnull, 0)
    deadline = started + job["timeout_s"]
    channel = Channel(to_judge_r, to_candidate_w, outputs)
    bridge = Bridge(channel, deadline)
    if job["mode"] == "run":
        report = judge_run(bridge, pid, deadline)
    else:
        report = judge_check(bridge, pid, deadline, secret["check"])
    kill_everything_else(pid, job)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    channel.drain_outputs(time.monotonic() + 2.0)
    report.update(
        nonce=secret["nonce"],
        stdout=outputs[0].text(),
        stderr=outputs[1].text(),
        duration_s=time.monotonic() - started,
    )
    if os.environ.get("SANDBOX_WIPE"):
        wipe(os.environ["SANDBOX_WIPE"].split(":"))
    write_frame(report_fd, report)
    os.close(report_fd)


def judge_run(bridge, pid, deadline):
    """A plain program: exit 0 passes, AssertionError fails, any other exception is an error."""
    try:
        said = bridge.receive()
    except (CandidateGone, CandidateTimeout, ValueError):
        said = {}
    wait_status = wait_candidate(pid, deadline)
    status, code = status_of_wait(wait_status, wait_status is None)
    feedback = ""
    if "raised" in said and status in ("passed", "error"):
        status = status_of_exception(said["raised"]["type"])
        feedback = said["raised"]["traceback"]
    elif status == "timeout":
        feedback = "time limit exceeded"
    elif status != "passed":
        feedback = describe_end(code)
    return {"status": status, "returncode": code, "feedback": feedback}


def describe_end(code):
    if code is None or code >= 0:
        return f"the program exited with status {code}"
    names = {getattr(signal, n): n for n in dir(signal) if n.startswith("SIG") and not n.startswith("SIG_")}
    name = names.get(-code, f"signal {-code}")
    hint = " (file size limit)" if name == "SIGXFSZ" else ""
    return f"the program was killed by {name}{hint}"


def judge_check(bridge, pid, deadline, check):
    """Trusted tests against the loaded candidate; only a clean end of the tests passes."""
    try:
        hello = bridge.receive()
    except CandidateTimeout:
        return {"status": "timeout", "returncode": None, "feedback": "time limit exceeded while loading"}
    except (CandidateGone, ValueError):
        hello = {}
    if "ready" not in hello:
        return candidate_ended(bridge, pid, deadline, hello, "while loading")
    import linecache

    namespace = {"__name__": "__check__", "__builtins__": builtins}
    name = check["entry_point"]
    try:
        for filename, code in (("<setup>", check["setup"]), ("<tests>", check["tests"])):
            linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
            exec(compile(code, filename, "exec"), namespace)
            namespace[name] = make_proxy(bridge, name)
        if check["call"]:
            linecache.cache["<call>"] = (len(check["call"]), None, [check["call"]], "<call>")
            exec(compile(check["call"], "<call>", "exec"), namespace)
    except CandidateTimeout:
        return {"status": "timeout", "returncode": None, "feedback": "time limit exceeded" + last_call(bridge)}
    except CandidateGone as exc:
        return candidate_ended(bridge, pid, deadline, {}, f"during the tests ({exc})" if str(exc) else "")
    except BaseException as exc:  # the verdict of the tests; nothing here is the candidate's code
        status = status_of_exception(type(exc).__name__)
        return {"status": status, "returncode": None, "feedback": test_feedback(exc) + last_call(bridge)}
    return {"status": "passed", "returncode": 0, "feedback": ""}


def candidate_ended(bridge, pid, deadline, said, when):
    """The candidate stopped before the tests were through: never a pass."""
    wait_status = wait_candidate(pid, deadline)
    status, code = status_of_wait(wait_status, wait_status is None)
    if "raised" in said:
        return {
            "status": status_of_exception(said["raised"]["type"]),
            "returncode": code,
            "feedback": said["raised"]["traceback"],
        }
    if status == "passed":
        status = "error"
    if status == "timeout":
        return {"status": status, "returncode": code, "feedback": "time limit exceeded" + last_call(bridge)}
    feedback = f"{describe_end(code)} {when}, before the tests finished".replace(" ,", ",")
    return {"status": status, "returncode": code, "feedback": feedback + last_call(bridge)}


def test_feedback(exc):
    """The failing test's lines (not the judge's frames), then the candidate's own traceback if any."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename in ("<setup>", "<tests>", "<call>")]
    lines = traceback.format_list(frames) + traceback.format_exception_only(exc)
    candidate_tb = getattr(exc, "candidate_traceback", "")
    return "".join(lines) + (f"raised inside the solution:\n{candidate_tb}" if candidate_tb else "")


def last_call(bridge):
    if bridge.last_call is None:
        return ""
    name, args, kwargs, result = bridge.last_call
    shown = ", ".join([repr(a)[:200] for a in args] + [f"{k}={v!r}"[:200] for k, v in kwargs.items()])
    return f"\nlast call: {name}({shown}){result}"


def wipe(paths):
    import shutil

    for root in paths:
        for entry in os.listdir(root) if os.path.isdir(root) else ():
            path = os.path.join(root, entry)
            try:
                os.chmod(path, 0o700)
            except OSError:
                pass
            if os.path.isdir(path) and not os.path.islink(path):
                for dirpath, dirnames, _ in os.walk(path):
                    for d in dirnames:
                        try:
                            os.chmod(os.path.join(dirpath, d), 0o700)
                        except OSError:
                            pass
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass


# ---- the zygote: one long-lived sandbox per slot, a fresh namespace set per program ---------
#
# Starting an interpreter is most of what a check costs. The zygote runs (as root inside its own
# bubblewrap sandbox: no network, read-only file system) and, per program, forks a child that
# enters new mount, pid and IPC namespaces, mounts a fresh tmpfs on /work and /tmp, and forks the
# judge as pid 1 of the new pid namespace; the judge mounts its own /proc, drops every capability
# and becomes the slot's unprivileged uid before it forks the candidate. When the judge exits,
# the kernel kills whatever is left in its pid namespace; the namespaces, the tmpfs and any SysV
# IPC objects go with it, so nothing carries over to the next program. The zygote reads only the
# job frame (never the judge's frame: that one the judge reads from the same pipe), so nothing
# secret is in the memory the candidate inherits.

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID = 0x00020000, 0x08000000, 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 16384, 1 << 18
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38


def _libc_call(libc, name, *args):
    import ctypes

    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}{args}: {os.strerror(errno)}")


def zygote_main(uid, tmpfs_bytes, preload):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    report_fd = os.dup(1)
    devnull = os.open("/dev/null", os.O_RDWR)
    os.dup2(devnull, 1)
    for module in preload:
        __import__(module)
    while True:
        try:
            job = read_frame(0)
        except EOFError:
            os._exit(0)
        pid = os.fork()
        if pid == 0:
            try:
                enter_fresh_namespaces(libc, job, uid, tmpfs_bytes, report_fd, devnull)
            finally:
                os._exit(70)
        _, status = os.waitpid(pid, 0)
        write_frame(report_fd, {"reaped": status})


def enter_fresh_namespaces(libc, job, uid, tmpfs_bytes, report_fd, devnull):
    """Never returns. New mount/pid/IPC namespaces, fresh /work and /tmp, the judge as pid 1."""
    _libc_call(libc, "unshare", CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC)
    _libc_call(libc, "mount", b"none", b"/", None, MS_REC | MS_PRIVATE, None)
    options = b"size=%d,mode=1777" % tmpfs_bytes
    for target in (b"/work", b"/tmp"):
        _libc_call(libc, "mount", b"tmpfs", target, b"tmpfs", MS_NOSUID | MS_NODEV, options)
    pid = os.fork()
    if pid == 0:
        try:
            _libc_call(libc, "mount", b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
            drop_privileges(libc, uid)
            judge(job, report_fd, devnull)
        finally:
            os._exit(0)
    os.close(report_fd)
    os.waitpid(pid, 0)  # returns once the pid namespace is empty (its init reaps everyone first)
    os._exit(0)


def drop_privileges(libc, uid):
    """Root -> `uid`: no capabilities (bounding set emptied first), no supplementary groups, no new
    privileges, not dumpable."""
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # past the last capability the kernel knows
    _libc_call(libc, "prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # all ids non-zero: permitted and effective capabilities cleared
    _libc_call(libc, "prctl", 4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["zygote"]:
        zygote_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
    else:
        judge_main()
