"""sandbox.py where the host forbids user namespaces (issue 10): said once, with what to do, then degraded.

The supervisor runs as `nobody` (an ordinary user) under a seccomp filter that refuses user namespaces
the way Docker's default profile does. Asserts statuses, outputs and what is left, never timing.

Why a seccomp filter and not a child user namespace with user.max_user_namespaces = 0: the filter is
exactly what a default Docker container does (the case users meet), it needs no user namespace of
its own (which would change what uid the supervisor has and what it may read in /proc), and it is
inherited across fork and exec by everything the supervisor starts, so the whole sandbox sees the
forbidding host while the machine's sysctls, which other tests share, are never written.
"""
import ctypes
import errno
import json
import os
import platform
import struct
import subprocess
import sys

import pytest

import sandbox
from test_sandbox import DROP
from test_sandbox import nobody_python  # noqa: F401 - a fixture: an interpreter `nobody` can run, and a checkout

# linux/filter.h: classic BPF opcodes (class | size | mode, or class | op | source)
BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS: load 32 bits of struct seccomp_data
BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
BPF_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K: jump if A & k
BPF_RET_K = 0x06  # BPF_RET | BPF_K
# linux/seccomp.h
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_MODE_FILTER = 2
SECCOMP_DATA_NR = 0  # offsets in struct seccomp_data
SECCOMP_DATA_ARCH = 4
SECCOMP_DATA_ARG0 = 16  # low 32 bits on a little-endian machine: where CLONE_NEWUSER sits
# linux/prctl.h, linux/sched.h, linux/mount.h
PR_SET_SECCOMP = 22
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
# linux/audit.h and the syscall tables, per architecture
SYSCALLS = {
    "x86_64": dict(arch=0xC000003E, clone=56, unshare=272, clone3=435),  # AUDIT_ARCH_X86_64
    "aarch64": dict(arch=0xC00000B7, clone=220, unshare=97, clone3=435),  # AUDIT_ARCH_AARCH64
}
GRANTED_DEGRADED = {"rlimits", "no_new_privs", "seccomp", "parent_death_signal"}  # README: what is left
LAUNCHER_CANNOT = 77  # the launcher's exit code when this kernel refuses it a mount namespace or a filter
SETTLE_S = 30  # how long the launcher waits for the sandbox's processes to exit after the supervisor did
# Each deliberately left process is a `sleep` of its own length, so that a survivor names its case.
BACKGROUND_SLEEP, TIMED_OUT_CHILD_SLEEP, STDOUT_HOLDER_SLEEP, SESSION_SLEEP = 301, 302, 303, 304
SESSION_CELLS = 140  # past 127 cells a chain of processes would hit the fork limit


def forbid_user_namespaces_filter(machine):
    """Docker's answer to user namespaces: unshare or clone with CLONE_NEWUSER fail with EPERM; clone3
    (whose flags sit in a struct BPF cannot read) fails with ENOSYS, so that glibc falls back to clone."""
    nr = SYSCALLS[machine]
    program = [
        (BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_ARCH),
        (BPF_JEQ_K, 0, "allow", nr["arch"]),  # another ABI: nothing of the sandbox uses one
        (BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_NR),
        (BPF_JEQ_K, "enosys", 0, nr["clone3"]),
        (BPF_JEQ_K, "flags", 0, nr["unshare"]),
        (BPF_JEQ_K, "flags", "allow", nr["clone"]),
        "flags",
        (BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_ARG0),  # the flags of both unshare and clone
        (BPF_JSET_K, "eperm", "allow", CLONE_NEWUSER),
        "allow",
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
        "eperm",
        (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM),
        "enosys",
        (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS),
    ]
    return sandbox.assemble_bpf(program)


# Root, before it drops to nobody. Its own mount namespace with a private /tmp: the degraded sandbox
# works in the host's /tmp (there is no mount namespace to give it one), and other test runs on
# this machine assert that the host's /tmp holds no sandbox dir. A child subreaper: whatever the
# sandbox leaves behind is reparented to us, not to the machine's init, so we can see it and kill it.
# Then no_new_privs and the filter, inherited by setpriv, the supervisor and all it starts.
LAUNCHER = f"""
import ctypes
import json
import os
import signal
import struct
import sys
import time
libc = ctypes.CDLL(None, use_errno=True)
job = json.loads(sys.argv[1])

def check(ret, what):
    if ret != 0:
        raise OSError(ctypes.get_errno(), what + ": " + os.strerror(ctypes.get_errno()))

try:
    check(libc.unshare({CLONE_NEWNS}), "unshare")
    check(libc.mount(None, b"/", None, {MS_REC | MS_PRIVATE}, None), "mount --make-rprivate /")
    check(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, b"mode=1777"), "mount /tmp")
    check(libc.prctl({PR_SET_CHILD_SUBREAPER}, 1, 0, 0, 0), "PR_SET_CHILD_SUBREAPER")
    check(libc.prctl({PR_SET_NO_NEW_PRIVS}, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    program = ctypes.create_string_buffer(bytes.fromhex(job["filter"]))
    fprog = struct.pack("HxxxxxxP", len(program.raw) // 8, ctypes.addressof(program))
    check(libc.prctl({PR_SET_SECCOMP}, {SECCOMP_MODE_FILTER}, fprog, 0, 0), "PR_SET_SECCOMP")
except OSError as e:
    print(e, file=sys.stderr)
    sys.exit({LAUNCHER_CANNOT})

def descendants():
    parent = {{}}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            state, ppid = open(f"/proc/{{p}}/stat").read().rsplit(")", 1)[1].split()[:2]
            if state != "Z":
                parent[int(p)] = int(ppid)
        except (OSError, ValueError):
            pass
    out, todo = {{}}, [os.getpid()]
    while todo:
        top = todo.pop()
        for p in [p for p, pp in parent.items() if pp == top]:
            try:
                out[p] = open(f"/proc/{{p}}/cmdline").read().replace("\\0", " ").strip()
            except OSError:
                continue
            todo.append(p)
    return out

def reap():
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return

helper = os.fork()
if helper == 0:
    os.execvp(job["argv"][0], job["argv"])
while True:  # reap orphans as they end, until the supervisor does
    pid, status = os.wait()
    if pid == helper:
        break
deadline = time.monotonic() + {SETTLE_S}
while any("--zygote" in c for c in descendants().values()) and time.monotonic() < deadline:
    reap()
    time.sleep(0.05)
left = descendants()
for pid in left:
    os.kill(pid, signal.SIGKILL)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
print(json.dumps({{"left": sorted(left.values()), "tmp": sorted(os.listdir("/tmp"))}}))
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""

# The supervisor, as nobody under the filter. First checks that the host now forbids what it should.
HELPER = r"""
import ctypes
import json
import os
import signal
import subprocess
import sys
import warnings
from dataclasses import asdict
checkout, job = sys.argv[1], json.load(sys.stdin)
sys.path.insert(0, checkout)
from sandbox import Sandbox
libc = ctypes.CDLL(None, use_errno=True)
probe = {"unshare": ctypes.get_errno() if libc.unshare(job["CLONE_NEWUSER"]) else 0,
         "clone3": ctypes.get_errno() if libc.syscall(job["clone3"], None, 0) else 0}
cli = subprocess.Popen([sys.executable, os.path.join(checkout, "sandbox.py"), "--isolation"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

def orphans():  # living children of the launcher (the subreaper) but us: what the sandbox let go
    out = set()
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:  # closed now: a ResourceWarning here would be ours, not the sandbox's
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue
        if int(ppid) == os.getppid() and int(p) != os.getpid() and state != "Z":
            out.add(int(p))
    return out

report = {"probe": probe, "isolation": []}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", RuntimeWarning)  # so that only the sandbox's once-only rule holds a repeat back
    warnings.simplefilter("always", ResourceWarning)  # a file of the supervisor's left to the collector
    with Sandbox(timeout=4.0, memory_mb=512, workers=3) as sb:
        report["isolation"].append(sb.isolation)
        report["quick"] = [asdict(r) for r in sb.run_many(job["quick"])]
        report["again"] = [asdict(sb.run(c)) for c in job["quick"][:2]]  # more snippets: no more warnings
    with Sandbox(timeout=30.0, memory_mb=512, workers=2) as sb:  # time to fault 800 MB in on a loaded machine
        report["isolation"].append(sb.isolation)
        before = orphans()
        report["together"] = asdict(sb.run(job["together"]))
        let_go = orphans() - before
        report["together_left"] = len(let_go)
        for p in let_go:  # (they hold the memory for a minute)
            os.kill(p, signal.SIGKILL)
        report["load"] = [asdict(r) for r in sb.run_many(job["load"])]
        with sb.session() as session:  # its own kill of what a cell left must not reach the user's other processes
            report["session"] = [asdict(session.run(c)) for c in job["session"]]
report["warnings"] = [(w.category.__name__, str(w.message)) for w in caught]
out, err = cli.communicate()
report["cli"] = {"rc": cli.returncode, "stdout": out, "stderr": err}
print(json.dumps(report))
"""

QUICK = {
    "print": "print(1+1)",
    "exception": "print('a')\n1/0",
    "timeout": "import time\ntime.sleep(1000)",
    "output cap": "print('A' * 3000 + 'Z')",
    "flood": "while True: print('x' * 1000)",
    "numpy and sympy": "import numpy as np, sympy as sp\nprint(int(np.arange(10).sum()), sp.factorint(2**16 + 1))",
    "work dir": "import os\nopen('f.txt', 'w').write('x')\nprint(sorted(os.listdir('.')))",
    "allocation over the cap": "x = bytearray(10**11)",
    "growing list": "x = []\nwhile True: x.append(bytearray(10**7))",
    "background process": (f"import subprocess\nsubprocess.Popen(['sleep', '{BACKGROUND_SLEEP}'], stdin=subprocess.DEVNULL, "
                           "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\nprint('started')"),
    "child of a timed-out snippet": (f"import subprocess, time\nsubprocess.Popen(['sleep', '{TIMED_OUT_CHILD_SLEEP}'], "
                                     "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\ntime.sleep(1000)"),
    "child keeps stdout": f"import subprocess\nsubprocess.Popen(['sleep', '{STDOUT_HOLDER_SLEEP}'])\nprint('started')",
}
MEMORY_TOGETHER = ("import os, time\nkids = []\nfor _ in range(4):\n    pid = os.fork()\n    if pid == 0:\n"
                   "        x = bytearray(200 << 20)\n        x[::4096] = b'1' * len(x[::4096])\n        time.sleep(60)\n"
                   "    kids.append(pid)\nfor pid in kids:\n    os.waitpid(pid, 0)")
SESSION = ["x = 41", f"import subprocess\nsubprocess.Popen(['sleep', '{SESSION_SLEEP}'])\nx += 1", "print(x)", "x = 0\n1/0",
           "print(x)"] + [f"x += {i}" for i in range(SESSION_CELLS)] + ["print(x)"]
LOAD = [f"print({i} * 2)" if i % 4 else f"import numpy as np\nprint(int(np.arange({i}).sum()))" for i in range(512)]


def skip_unless_ci(why):
    if os.environ.get("CI"):  # CI is root on x86_64 Debian: there the degraded mode must be tested
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module")
def degraded(nobody_python):
    """One run of the supervisor as nobody on a host that forbids user namespaces: its report, what
    was left when it had exited, and the files left in its /tmp."""
    machine = platform.machine()
    if machine not in SYSCALLS:
        skip_unless_ci(f"no syscall numbers for {machine} to build the filter")
    python, checkout = nobody_python
    argv = [*DROP, str(python), "-c", HELPER, str(checkout)]
    job = {"CLONE_NEWUSER": CLONE_NEWUSER, "clone3": SYSCALLS[machine]["clone3"], "quick": list(QUICK.values()),
           "together": MEMORY_TOGETHER, "load": LOAD, "session": SESSION}
    launch = {"filter": forbid_user_namespaces_filter(machine).hex(), "argv": argv}
    out = subprocess.run([sys.executable, "-c", LAUNCHER, json.dumps(launch)], input=json.dumps(job),
                         capture_output=True, text=True, env={"PATH": os.environ["PATH"]}, cwd=str(checkout), timeout=600)
    if out.returncode == LAUNCHER_CANNOT:
        skip_unless_ci(f"cannot forbid user namespaces here (a mount namespace and a seccomp filter as root): {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    *lines, launcher = out.stdout.splitlines()
    report = json.loads(lines[-1])
    report["quick"] = dict(zip(QUICK, report["quick"]))
    return report, json.loads(launcher)


def test_the_host_forbids_user_namespaces_as_docker_does(degraded):
    report, _ = degraded
    assert report["probe"] == {"unshare": errno.EPERM, "clone3": errno.ENOSYS}


def test_isolation_says_what_is_left(degraded):
    report, _ = degraded
    want = {name: name in GRANTED_DEGRADED for name in sandbox.ISOLATION}
    assert report["isolation"] == [want, want]  # both sandboxes: user_namespace False, and all that needs it



def test_the_user_namespace_is_warned_about_once_with_what_to_do(degraded):
    """Two sandboxes and a dozen snippets in one process: one warning names the user namespace, and
    says what to do; every other refused protection is named once too (nothing degrades silently)."""
    report, _ = degraded
    messages = [message for category, message in report["warnings"] if category == "RuntimeWarning"]
    about_userns = [m for m in messages if "user_namespace" in m]
    assert len(about_userns) == 1, messages
    assert "user_namespace" in messages[0], messages  # the cause and what to do first, then its consequences
    assert "user_namespace refused here" in about_userns[0]
    assert sandbox._ADVICE["user_namespace"] in about_userns[0]  # how to enable them, or run as root
    refused = sorted(name for name, granted in report["isolation"][0].items() if not granted)
    named = sorted(m.split()[1] for m in messages if m.startswith("sandbox: ") and " refused here" in m)
    assert named == refused, messages


def test_snippets_still_run_correctly(degraded):
    report, _ = degraded
    quick = report["quick"]
    assert (quick["print"]["status"], quick["print"]["stdout"]) == ("ok", "2\n")
    error = quick["exception"]
    assert (error["status"], error["exit_code"], error["feedback"]) == ("error", 1, "a\nZeroDivisionError: division by zero")
    assert error["stderr"].startswith("Traceback (most recent call last):\n") and 'File "<code>", line 2' in error["stderr"]
    timeout = quick["timeout"]
    assert (timeout["status"], timeout["feedback"]) == ("timeout", "Timeout Error: the code ran longer than 4 s")
    capped = quick["output cap"]
    assert capped["status"] == "ok" and "[... output truncated ...]" in capped["stdout"]
    assert capped["stdout"].startswith("A" * 400) and capped["stdout"].endswith("AZ\n") and len(capped["stdout"]) < 1100
    assert quick["flood"]["status"] == "killed" and quick["flood"]["feedback"].endswith("Killed: output exceeded 4194304 bytes")
    assert (quick["numpy and sympy"]["status"], quick["numpy and sympy"]["stdout"]) == ("ok", "45 {65537: 1}\n")
    assert quick["work dir"]["stdout"] == "['f.txt']\n"  # a fresh, empty work dir per snippet, even without /tmp of its own
    again = [(r["status"], r["stdout"]) for r in report["again"]]
    assert again == [("ok", "2\n"), ("error", "a\n")]


def test_the_memory_cap_holds_without_cgroup_or_namespaces(degraded):
    """One allocation far over memory_mb meets the address-space limit; four processes of 200 MB,
    each below 512 MB but above it together, meet the watchdog."""
    report, _ = degraded
    for name in ("allocation over the cap", "growing list"):
        r = report["quick"][name]
        assert (r["status"], r["feedback"]) == ("memory", "MemoryError"), r
    together = report["together"]
    want = "MemoryError: the snippet's processes together used more than 512 MB"
    assert (together["status"], together["feedback"]) == ("memory", want)


def test_a_memory_kill_frees_the_snippets_processes(degraded):
    report, _ = degraded
    assert report["together_left"] == 0


def test_load_512_snippets_through_run_many(degraded):
    report, _ = degraded
    assert [r["status"] for r in report["load"]] == ["ok"] * 512
    assert [r["stdout"] for r in report["load"]] == [f"{i * 2}\n" if i % 4 else f"{i * (i - 1) // 2}\n" for i in range(512)]


def test_the_supervisor_leaves_no_file_to_the_collector(degraded):
    report, _ = degraded
    assert [m for category, m in report["warnings"] if category == "ResourceWarning"] == []


def test_a_session_works_and_kills_only_its_own(degraded):
    """State, rollback, a process a cell left, and more cells than the fork limit: as with a PID
    namespace, with the supervisor (a process of the same user) alive to the end."""
    report, launcher = degraded
    cells = report["session"]
    assert [r["status"] for r in cells] == ["ok", "ok", "ok", "error", "ok"] + ["ok"] * (SESSION_CELLS + 1), cells[-1]
    assert (cells[2]["stdout"], cells[4]["stdout"], cells[-1]["stdout"]) == ("42\n", "42\n", f"{42 + sum(range(SESSION_CELLS))}\n")
    assert f"sleep {SESSION_SLEEP}" not in launcher["left"]


def test_no_process_of_the_sandbox_is_left_after_close(degraded):
    """Zygote, workers and snippets' own processes are gone once the supervisor has closed its
    sandboxes and exited (the deliberate background `sleep`s are the next tests')."""
    _, launcher = degraded
    deliberate = {f"sleep {n}" for n in (BACKGROUND_SLEEP, TIMED_OUT_CHILD_SLEEP, STDOUT_HOLDER_SLEEP, SESSION_SLEEP)}
    assert [c for c in launcher["left"] if c not in deliberate] == []


def test_a_snippets_background_process_does_not_outlive_it(degraded):
    _, launcher = degraded
    assert f"sleep {BACKGROUND_SLEEP}" not in launcher["left"]


def test_a_timed_out_snippets_child_does_not_outlive_it(degraded):
    report, launcher = degraded
    assert report["quick"]["child of a timed-out snippet"]["status"] == "timeout"
    assert f"sleep {TIMED_OUT_CHILD_SLEEP}" not in launcher["left"]


def test_a_child_that_keeps_stdout_open_is_not_a_machinery_failure(degraded):
    report, _ = degraded
    assert report["quick"]["child keeps stdout"]["status"] == "ok", report["quick"]["child keeps stdout"]


def test_no_work_dir_is_left_in_tmp(degraded):
    _, launcher = degraded
    assert [name for name in launcher["tmp"] if name.startswith("retool-sb-")] == []


def test_cli_isolation_reports_degraded(degraded):
    report, _ = degraded
    cli = report["cli"]
    assert cli["rc"] == 0, cli["stderr"]
    assert json.loads(cli["stdout"]) == {name: name in GRANTED_DEGRADED for name in sandbox.ISOLATION}
    assert cli["stderr"].count("user_namespace refused here") == 1
    assert sandbox._ADVICE["user_namespace"] in cli["stderr"]
