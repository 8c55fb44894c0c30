"""sandbox.py: correctness, a hostile battery, sessions, load, CLI. Asserts statuses and outputs, never timing."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from sandbox import ISOLATION, UID_BASE, Sandbox

REPO = Path(__file__).resolve().parents[1]
SECRET = "retool-secret-" + uuid.uuid4().hex
MARK = "retool-leak-" + uuid.uuid4().hex  # every file a hostile snippet tries to leave behind


@pytest.fixture(scope="module")
def sb():
    os.environ["RETOOL_TEST_SECRET"] = SECRET  # the caller's environment must not reach snippets
    try:
        with Sandbox(timeout=2.0, memory_mb=512, workers=2) as box:
            yield box
    finally:
        os.environ.pop("RETOOL_TEST_SECRET")


def _descendants(root):
    """pid -> uid of every live process below root."""
    parent, uid = {}, {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        parent[int(p)], uid[int(p)] = int(fields["PPid"]), int(fields["Uid"].split()[0])
    out, todo = {}, [root]
    while todo:
        top = todo.pop()
        kids = [p for p, pp in parent.items() if pp == top]
        out.update({k: uid[k] for k in kids})
        todo += kids
    return out


def test_isolation_all_granted_here(sb):
    assert set(sb.isolation) == set(ISOLATION) - {"user_namespace"}  # root needs none
    assert all(sb.isolation.values()), sb.isolation  # root on this kind of machine: nothing refused


CORRECT = [
    ("print('hello')", "ok", "hello\n", None),
    ("print('a')\n1/0", "error", "a\nZeroDivisionError: division by zero", "ZeroDivisionError: division by zero"),
    ("def f(:\n  pass", "error", None, "SyntaxError"),
    ("import sys\nprint('x')\nsys.exit(3)", "error", "x\nExit code 3", None),
    ("import sys\nsys.exit(0)", "ok", "", None),
    ("import sys\nsys.exit('bye')", "error", "bye", None),
    ("import os\nprint('kept')\nos._exit(0)", "ok", "kept\n", None),
    ("print('héllo ✓ 你好')", "ok", "héllo ✓ 你好\n", None),
    ("import sys\nsys.stdout.buffer.write(b'ok \\xff\\xfe end\\n')", "ok", "ok \ufffd\ufffd end\n", None),
    ("import sys\nprint('warn', file=sys.stderr)", "ok", "", None),
    ("import numpy as np\na = np.random.default_rng(0).normal(size=(200, 200))\nprint(round(float(np.linalg.det(a @ np.linalg.inv(a))), 6))",
     "ok", "1.0\n", None),
    ("import sympy as sp\nx = sp.symbols('x')\nprint(sp.solve(x**2 - 4, x), sp.factorint(2**16 + 1))", "ok", "[-2, 2] {65537: 1}\n", None),
    ("from fractions import Fraction\nimport itertools, math\nprint(sum(Fraction(1, math.comb(6, k)) for k in range(7)), len(list(itertools.permutations(range(5)))))",
     "ok", "151/60 120\n", None),
    ("import os\nprint(os.getuid() > 0, os.getcwd(), os.listdir('.'))\nopen('f.txt', 'w').write('x')\nprint(os.listdir('.'))",
     "ok", "True /tmp []\n['f.txt']\n", None),
    ("input()", "error", "EOFError: EOF when reading a line", None),
    ("import io, sys\nprint('a')\nsys.stdout = sys.stderr = io.StringIO()\nprint('lost')\n1/0", "error",
     "a\nZeroDivisionError: division by zero", None),
    ("import multiprocessing as mp\ndef sq(x): return x * x\nif __name__ == '__main__':\n"
     "    with mp.Pool(2) as p: print(p.map(sq, range(5)))", "ok", "[0, 1, 4, 9, 16]\n", None),
    ("import subprocess, sys\nprint(subprocess.run([sys.executable, '-c', 'import fractions; print(1)'], "
     "capture_output=True, text=True).stdout, end='')", "ok", "1\n", None),
]


@pytest.mark.parametrize("code,status,feedback,last", CORRECT)
def test_correctness(sb, code, status, feedback, last):
    r = sb.run(code)
    assert r.status == status, r
    if feedback is not None:
        assert r.feedback == feedback, r
    if last is not None:
        assert r.stderr.strip().splitlines()[-1].startswith(last) and r.feedback.endswith(r.stderr.strip().splitlines()[-1])


def test_result_fields_and_capping(sb):
    r = sb.run("import sys\nprint('warn', file=sys.stderr)\nprint('A' * 3000 + 'Z')\n1/0")
    assert r.status == "error" and r.exit_code == 1 and r.wall_s > 0 and r.cpu_s >= 0
    assert r.stdout.startswith("A" * 400) and r.stdout.endswith("AZ\n") and "truncated" in r.stdout
    assert len(r.stdout) < 1100 and len(r.feedback) < 1100 and r.stderr.startswith("warn\n")
    assert r.feedback.startswith("A" * 100) and r.feedback.endswith("AZ\nZeroDivisionError: division by zero")


def test_fresh_state_and_rng_per_snippet(sb):
    a, b, c = sb.run_many(["import numpy as np, random\nprint(np.random.rand(), random.random())",
                           "import numpy as np, random\nprint(np.random.rand(), random.random())",
                           "print(x)"])
    assert a.status == b.status == "ok" and a.stdout != b.stdout
    assert c.status == "error" and c.feedback == "NameError: name 'x' is not defined"


def test_session_state_and_rollback(sb):
    with sb.session() as s, sb.session() as other:
        assert s.run("x = 41\nimport numpy as np\nv = np.arange(3)").status == "ok"
        assert s.run("x += 1\nprint(x, v.sum())").stdout == "42 3\n"
        r = s.run("x = 0\nv[0] = 100\nprint('partial')\n1/0")  # a failed cell leaves no trace
        assert r.status == "error" and r.feedback == "partial\nZeroDivisionError: division by zero"
        assert s.run("x = -1\nwhile True: pass").status == "timeout"
        assert s.run("x = -2\nimport ctypes\nctypes.string_at(0)").status == "killed"
        assert s.run("x = -3\nb = bytearray(2 << 30)").status == "memory"
        assert s.run("print(x, v.sum())").stdout == "42 3\n"
        r = other.run("print(x)")  # sessions never share state
        assert r.status == "error" and "NameError" in r.feedback
        assert other.run("y = 1").status == "ok" and s.run("print('y' in dir())").stdout == "False\n"
        assert s.run("import os\nif os.fork() == 0: x = 7").status == "ok"  # the forked copy is not the holder
        assert s.run("print(x)").stdout == "42\n"


def test_hostile_battery(sb, tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))  # a local service a snippet must not reach
    port = listener.getsockname()[1]
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(SECRET)
    secret_file.chmod(0o600)
    places = ["/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/work", str(REPO), str(tmp_path), "/root", "/"]
    battery = {
        "busy loop": ("while True: pass", "timeout"),
        "signals ignored, BaseException caught": (
            "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU, signal.SIGALRM):\n"
            "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    try:\n        while True: pass\n"
            "    except BaseException:\n        pass", "timeout"),
        "long sleep": ("import time\ntime.sleep(1000)", "timeout"),
        "catastrophic regex": ("import re\nre.match(r'(a+)+$', 'a' * 64 + 'b')", "timeout"),
        "bytearray bomb": ("x = bytearray(10**11)", "memory"),
        "growing list": ("x = []\nwhile True: x.append(bytearray(10**7))", "memory"),
        "numpy bomb": ("import numpy as np\nx = np.ones((10**5, 10**5))", "memory"),
        "fork bomb": ("import os\nwhile True:\n    try: os.fork()\n    except OSError: pass", "timeout"),
        "many subprocesses": ("import subprocess\nps = [subprocess.Popen(['sleep', '1000']) for _ in range(20)]\nprint(len(ps))", "ok"),
        "double fork + setsid survivor": (
            "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        time.sleep(1000)\n    os._exit(0)\nos.wait()\nprint('parent done')", "ok"),
        "stdout flood": ("while True: print('x' * 1000)", "killed"),
        "stderr flood": ("import sys\nwhile True: sys.stderr.write('y' * 1000)", "killed"),
        "both streams flood": ("import sys\nwhile True:\n    sys.stdout.write('x' * 999)\n    sys.stderr.write('y' * 999)", "killed"),
        "environment secret": ("import os\nprint(dict(os.environ))\nprint(open('/proc/self/environ', 'rb').read())", "ok"),
        "parent's environ": (f"print(open('/proc/{os.getpid()}/environ').read())", "error"),
        "secret file": (f"print(open({str(secret_file)!r}).read())", "error"),
        "shadow": ("print(open('/etc/shadow').read())", "error"),
        "connect outside": ("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)", "error"),
        "connect to host loopback": (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)", "error"),
        "kill parent, group, everyone": (
            "import os, signal\nfor pid in (os.getppid(), 0, -1):\n    try: os.kill(pid, signal.SIGKILL)\n"
            "    except OSError as e: print(type(e).__name__)\nprint('still here')", "ok"),
        "write outside the work dir": (
            f"import os\nfor d in {places!r}:\n    try:\n        open(os.path.join(d, {MARK!r}), 'w').write('x'); print('WROTE', d)\n"
            "    except OSError as e: print('denied', d)\nopen('" + MARK + "', 'w').write('in cwd is fine')", "ok"),
        "huge file": ("f = open('big', 'wb')\nwhile True: f.write(b'0' * 10**6)", "error"),
        "fd exhaustion": ("fs = [open('/dev/null') for _ in range(100000)]", "error"),
        "thread explosion": ("import threading, time\nthreading.stack_size(1 << 16)  # hit the process cap, not memory\n"
                             "for _ in range(100000):\n"
                             "    threading.Thread(target=time.sleep, args=(1000,), daemon=True).start()", "error"),
        "segfault via ctypes": ("import ctypes\nctypes.string_at(0)", "killed"),
        "deep recursion": ("def f(n): return f(n + 1)\nf(0)", "error"),
        "C stack overflow": ("import pickle, sys\nsys.setrecursionlimit(10**8)\nx = []\nfor _ in range(10**6): x = [x]\n"
                             "pickle.dumps(x)", "killed"),  # (print(x) is quadratic: 2 s before the overflow)
        "setuid": ("import os\nos.setuid(0)", "error"),
        "setuid-root binary": ("import subprocess\nprint(subprocess.run(['mount', '-t', 'tmpfs', 'x', '/tmp'], capture_output=True).returncode)", "ok"),
    }
    # The fork bomb runs alone: its 128 spinning processes would starve concurrent snippets into timeouts.
    names = [n for n in battery if n != "fork bomb"]
    results = dict(zip(names, sb.run_many([battery[n][0] for n in names])), **{"fork bomb": sb.run(battery["fork bomb"][0])})
    wrong = {name: r for name, r in results.items() if r.status != battery[name][1]}
    assert not wrong, wrong
    for name, r in results.items():  # nothing secret came out, whatever the status
        assert SECRET not in r.stdout + r.stderr + r.feedback, name
    assert "Timeout Error" in results["long sleep"].feedback and "output exceeded" in results["stdout flood"].feedback
    assert "MemoryError" in results["numpy bomb"].feedback and "SIGSEGV" in results["segfault via ctypes"].feedback
    assert results["kill parent, group, everyone"].stdout.endswith("still here\n")
    wrote = [line.split()[1] for line in results["write outside the work dir"].stdout.splitlines() if "WROTE" in line]
    assert wrote == ["/tmp", "/dev/shm"]  # the snippet's own private tmpfs; checked below to be absent on the host
    assert results["setuid-root binary"].stdout != "0\n"
    assert results["connect outside"].feedback.startswith("OSError") or "unreachable" in results["connect outside"].feedback
    listener.close()
    # After the battery: no process of a snippet survives, no file was left, the sandbox still works.
    assert all(uid == 0 for uid in _descendants(sb._proc.pid).values()), _descendants(sb._proc.pid)
    assert not [d for d in places if os.path.exists(os.path.join(d, MARK))]
    assert not [p for p in os.listdir("/tmp") if p.startswith("retool-sb-")]
    assert sb.run("print(6 * 7)").stdout == "42\n"


def test_machinery_failure_is_a_result_and_heals(sb):
    for kill_zygote in (False, True):
        workers = [p for p, uid in _descendants(sb._proc.pid).items() if uid == 0]
        for p in workers + [sb._proc.pid] * kill_zygote:
            os.kill(p, signal.SIGKILL)
        results = sb.run_many(["print(1)"] * 4)
        assert {r.status for r in results} <= {"ok", "internal"} and "internal" in {r.status for r in results}
        assert all(r.feedback.startswith("Sandbox error") for r in results if r.status == "internal")
        assert [r.stdout for r in sb.run_many(["print(2)"] * 4)] == ["2\n"] * 4


def test_worker_death_kills_its_running_snippet(sb):
    done = []
    thread = threading.Thread(target=lambda: done.append(sb.run("import time\ntime.sleep(60)")))
    thread.start()
    deadline = time.monotonic() + 30
    while not (snippet := [p for p, uid in _descendants(sb._proc.pid).items() if uid >= UID_BASE]):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    worker = int(Path(f"/proc/{snippet[0]}/status").read_text().split("PPid:")[1].split()[0])
    os.kill(worker, signal.SIGKILL)  # the snippet gets SIGKILL as its parent dies, and with it its pid ns
    thread.join()
    while os.path.exists(f"/proc/{snippet[0]}"):  # killed and reaped (asynchronously)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert done[0].status == "internal"
    assert sb.run("print(5)").stdout == "5\n"


def test_load_512_no_failure_no_false_timeout():
    codes = [f"print({i} * 2)" if i % 4 else f"import numpy as np\nprint(int(np.arange({i}).sum()))" for i in range(512)]
    with Sandbox(timeout=30.0, workers=2) as box:  # generous: other jobs share these 2 cores
        results = box.run_many(codes)
    want = [f"{i * 2}\n" if i % 4 else f"{i * (i - 1) // 2}\n" for i in range(512)]
    assert [r.status for r in results] == ["ok"] * 512
    assert [r.stdout for r in results] == want


def test_cli(tmp_path):
    f = tmp_path / "snippet.py"
    f.write_text("print(sum(range(10)))\n")
    out = subprocess.run([sys.executable, str(REPO / "sandbox.py"), str(f)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout)["feedback"] == "45\n"
    out = subprocess.run([sys.executable, str(REPO / "sandbox.py")], input="1/0", capture_output=True, text=True, timeout=120)
    assert json.loads(out.stdout)["status"] == "error"
    out = subprocess.run([sys.executable, str(REPO / "sandbox.py"), str(tmp_path / "nope.py")], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "nope.py" in out.stderr
