"""A fast, really isolating code interpreter for ReTool rollouts (standard library only).

Processes (who forks whom, which channel carries what):

    supervisor   the caller (trainer, eval, CLI); one thread per running snippet reads its pipes
      | spawns once: a fresh interpreter, never a fork of a caller that may run threads
    zygote       imports numpy/sympy once (its heap in huge pages); enters a user namespace when not root,
      |          then IPC and mount namespaces (the host read-only); ctl: "w" + a socket end -> a worker, "+"
    worker       one per slot, init of its own PID namespace, own network namespace, /proc and /tmp.
      |          It never sees snippet data. Ahead of each snippet it renews /tmp, forks and offers
      |          the snippet's process: "next" + a pidfd + a socket to it; then, reaped, "exit" +
      |          wait status + rusage ("retired" instead of "next" if /tmp cannot be renewed).
      |          Without a PID namespace (degraded) it is a child subreaper instead, and kills all
      |          that is left below it (the snippet's group, then every orphan) before "exit".
    snippet      init of a new PID namespace; confines itself and sets up sys while it waits. The
                 supervisor sends it "run" + 4 fds (stdout, stderr, code, ready) directly; it takes
                 its uid, reads the code, writes "r" on ready (so only a real set-up failure is
                 `internal`), runs; stdout/stderr go straight to the supervisor, which enforces the
                 deadline and the output cap. Fork and confinement are off the caller's clock.

Protections (`Sandbox.isolation` says which the kernel granted; a refused one is warned about once):

    user_namespace   unshare(CLONE_NEWUSER), user -> root   lets a non-root user apply all of the below
    ipc_namespace    CLONE_NEWIPC + SysV/mqueue limits 0    shared memory or queues outliving a snippet
    mount_namespace  mount_setattr(RDONLY|NOSUID), tmpfs    writes to the host; setuid binaries; files
                     /tmp and /dev/shm fresh per snippet    planted for the next snippet; unwipeable trees
    net_namespace    CLONE_NEWNET, no interface up          any network, the host's loopback included
    pid_namespace    CLONE_NEWPID per worker and snippet    seeing or signalling host processes; survivors
    private_proc     proc of the worker's PID ns, hidepid=2 reading the supervisor's environment
    uid_drop         root: uid 2^20+pid; user: own user ns  fork bombs across workers (RLIMIT_NPROC)
    no_new_privs     prctl(PR_SET_NO_NEW_PRIVS) per worker  gaining privileges through exec
    seccomp          BPF filter per worker, inherited       keyrings (not namespaced), AF_UNIX path sockets,
                                                            AF_VSOCK, memfd pages outside the caps
    memory_cgroup    memory cgroup per worker               many processes together above memory_mb
    parent_death_signal  prctl(PR_SET_PDEATHSIG, SIGKILL)   a snippet outliving its worker
    rlimits          setrlimit, setsid                      CPU, address space, files, fds, core dumps

Result.feedback is what the model reads in <interpreter> (~max_output chars, head + tail): ok: stdout;
error (memory for a MemoryError): stdout so far + the last stderr line, i.e. the exception; timeout:
stdout so far + "Timeout Error: ..."; killed: stdout so far + "Killed: ..." (a signal or the output
ceiling); internal: "Sandbox error: ..." (the machinery failed: run() never raises). Sessions: a
holder process keeps the state; a cell runs in a fork of it and, if it succeeds, becomes the holder,
else dies (rollback). Files in /tmp are not rolled back.
"""
import argparse
import array
import contextlib
import ctypes
import gc
import importlib
import json
import linecache
import os
import platform
import pwd
import queue
import re
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import types
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field

PRELOAD = ("math", "fractions", "itertools", "numpy", "sympy")
BLAS_THREADS = dict.fromkeys(("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"), "1")
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "USER": "sandbox", "LANG": "C.UTF-8", **BLAS_THREADS}
ISOLATION = ("user_namespace", "ipc_namespace", "mount_namespace", "net_namespace", "pid_namespace", "private_proc",
             "uid_drop", "no_new_privs", "seccomp", "memory_cgroup", "parent_death_signal", "rlimits")
CHAN_FD, MAX_FD = 5, 1 << 16  # where a waiting snippet process holds its socket; above all our fds
UID_BASE = 1 << 20  # + the worker's pid: a uid per worker, so no NPROC count or signal crosses workers
NPROC, NOFILE = 128, 256  # processes+threads per snippet; open files per process
MARK = "\n[... output truncated ...]\n"
WATCH_TICK_S = 0.1  # how often a running snippet's memory is checked (cgroup OOM kills, or the watchdog)
REAP_GRACE_S = 10  # a worker that has not reaped a killed snippet by then is broken
EXIT_POLL_S = 0.01  # how often the zygote looks for workers still cleaning up (degraded mode)
WORKER_START_S = 300  # the zygote imports numpy and sympy first


@dataclass
class Result:
    status: str  # ok | error | memory | timeout | killed | internal
    stdout: str
    stderr: str
    exit_code: int | None  # negative: killed by that signal
    wall_s: float
    cpu_s: float
    feedback: str  # what the model sees (module docstring)


@dataclass
class Config:
    timeout: float = 5.0
    memory_mb: int = 1024
    max_output: int = 1000
    preload: tuple = PRELOAD
    max_bytes: int = 1 << 22
    disk_mb: int = 64


_WARNED = set()


class _Closing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Sandbox(_Closing):
    """Run untrusted snippets; thread-safe; run/run_many never raise for what a snippet does."""

    def __init__(self, timeout=5.0, memory_mb=1024, max_output=1000, workers=None, preload=PRELOAD,
                 max_bytes=1 << 22, disk_mb=64):
        self.cfg = Config(float(timeout), int(memory_mb), int(max_output), tuple(preload), int(max_bytes), int(disk_mb))
        self.workers = max(1, workers or os.cpu_count() or 1)
        self._lock, self._idle, self._all = threading.Lock(), queue.SimpleQueue(), []
        self._start()
        for _ in range(self.workers):
            self._idle.put(self._new_worker())
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox")

    def run(self, code):
        worker = self._idle.get()
        try:
            return self._call(worker, lambda: _run(worker, code, self.cfg))
        finally:
            self._idle.put(worker)

    def run_many(self, codes):
        """Concurrently on `workers` workers; results in input order."""
        return list(self._pool.map(self.run, codes))

    def session(self):
        return Session(self)

    def close(self):
        self._pool.shutdown(wait=False)
        for worker in self._all:
            worker.sock.close()  # each worker kills its child and exits
        self._ctl.close()  # then the zygote exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(10)
        self._proc.kill()  # a no-op once it exited

    def _start(self):
        """The zygote is a fresh interpreter, never a fork of a caller that may run threads."""
        self._ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cfg = json.dumps(asdict(self.cfg))
        self._proc = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), "--zygote", cfg, str(theirs.fileno())],
            pass_fds=[theirs.fileno()], env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            start_new_session=True)  # a ^C meant for the trainer does not reach it
        theirs.close()
        self._ctl.settimeout(WORKER_START_S)
        hello = self._ctl.recv(1 << 16)
        if not hello:
            raise RuntimeError("the sandbox zygote failed to start (its error is printed above)")
        hello = json.loads(hello)
        self.isolation = hello["isolation"]
        refused = {k for k, v in self.isolation.items() if not v} | {f"preload of {m}" for m in hello["missing"]}
        for what in sorted(refused - _WARNED, key=lambda w: (w != "user_namespace", w)):  # the cause first, with
            # what to do about it; then each protection that is missing because of it
            _WARNED.add(what)
            warnings.warn(f"sandbox: {what} refused here; running without it{_ADVICE.get(what, '')}", RuntimeWarning, 3)

    def _new_worker(self, worker=None):
        """A worker: a fork of the zygote holding the other end of a socket pair (filled into `worker`)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with self._lock:
                for _ in range(2):  # a zygote found dead (or dying) is replaced, once
                    if self._proc.poll() is not None:
                        self._ctl.close()
                        self._start()
                    with contextlib.suppress(OSError):
                        self._ctl.sendmsg([b"w"], [_rights(theirs.fileno())])
                        if self._ctl.recv(1):
                            break  # the zygote confirmed the fork
                    self._proc.kill()
                    self._proc.wait()
                else:
                    raise RuntimeError("the sandbox zygote cannot start a worker")
        finally:
            theirs.close()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the kernel stamps each sender's pid
        if worker is None:
            worker = _Worker(ours, not self.isolation["pid_namespace"])
            self._all.append(worker)
        else:
            worker.sock = ours
        return worker

    def _call(self, worker, fn):
        try:
            try:
                return fn()
            except _Retired:  # nothing of this snippet ran yet
                self._replace(worker)
                return fn()
        except Exception as e:  # noqa: BLE001 - the machinery failed, not the snippet
            with contextlib.suppress(Exception):  # else retried on the next call
                self._replace(worker)
            return Result("internal", "", "", None, 0.0, 0.0, f"Sandbox error: {e!r}")

    def _replace(self, worker):
        worker.sock.close()  # retired: a hung worker sees EOF and exits, and its child with it
        self._new_worker(worker)  # in place: the idle queue or the session keeps a live one


_ADVICE = {
    "user_namespace": ": this host forbids unprivileged user namespaces, so snippets run as you and can read "
                      "and write what you can (enable them: sysctl kernel.unprivileged_userns_clone=1 or "
                      "user.max_user_namespaces > 0; in Docker, run with --security-opt seccomp=unconfined), "
                      "or run as root",
    "memory_cgroup": ": a watchdog samples a snippet's memory every 0.1 s instead (run as root, or delegate a "
                     "memory cgroup, for a hard cap)",
}


@dataclass
class _Worker:
    sock: socket.socket  # supervisor's end; the worker process holds the other
    shared_pids: bool = False  # no PID namespace: the worker itself kills what a snippet leaves running


# ----------------------------------------------------------------------------- supervisor side of a snippet
def _run(worker, code, cfg):
    """One snippet on `worker`: hand its waiting process the pipes, feed the code, watch until the end
    or a limit."""
    t0, pipes = time.monotonic(), [os.pipe() for _ in range(4)]  # stdout, stderr, code, ready
    (out_r, out_w), (err_r, err_w), (code_r, code_w), (ready_r, ready_w) = pipes
    run = _Running(worker.sock, cfg.memory_mb, worker.shared_pids)
    try:
        run.wait_for(b"next", t0 + REAP_GRACE_S)  # (sent by the worker long before, as a rule)
        run.hand(b"run", out_w, err_w, code_r, ready_w)
        _close(out_w, err_w, code_r, ready_w)
        with contextlib.suppress(BrokenPipeError):  # a child that failed to set up reads nothing
            with open(code_w, "wb", closefd=False) as f:
                f.write(code.encode(errors="replace"))
        os.close(code_w)
        code_w = None
        bufs = {out_r: bytearray(), err_r: bytearray()}
        # Without a PID namespace the worker answers "exit" only once every process of the snippet is
        # gone: from then on an open pipe is held by no process of the snippet's, so no EOF is awaited.
        done = worker.sock.fileno() if worker.shared_pids else None
        why = _watch(bufs, [run.pidfd], t0 + cfg.timeout, cfg.max_bytes, run.over_memory, done)
        if why:
            with contextlib.suppress(ProcessLookupError):  # already exited (and reaped): nothing to kill
                # init of its PID ns: its whole tree goes; else the worker kills the rest once it reaped it
                signal.pidfd_send_signal(run.pidfd, signal.SIGKILL)
        run.wait_for(b"exit", time.monotonic() + REAP_GRACE_S)
        ready = os.read(ready_r, 1 << 12)  # one write, whose writers are all gone: read once, not watched
    finally:
        run.close()
        _close(out_r, err_r, ready_r, code_w)
    if ready != b"r":
        raise RuntimeError(ready.decode(errors="replace").strip() or "the snippet's set-up failed")
    return _finish(why, run.exit_code, run.oom or why == "memory", bufs[out_r], bufs[err_r], time.monotonic() - t0, run.cpu_s, cfg)


class _Retired(Exception):
    """The worker retired itself between snippets (before it took this one): replace it and retry."""


class _Running:
    """The worker's messages about one child: "next" + pidfd + a socket to the child (+ its cgroup's
    OOM events file), then "exit" + wait status, rusage, OOM flag; or "retired" instead of "next"."""
    pidfd = chan = oom_fd = exit_code = cpu_s = oom = over_memory = None

    def __init__(self, sock, memory_mb=None, shared_pids=False):
        self.sock, self.memory_mb, self.shared_pids = sock, memory_mb, shared_pids

    def hand(self, word, *fds):
        """To the waiting child: "run" (a snippet) or "hold" (a session) and its fds 1-4."""
        self.chan.sendmsg([word], [_rights(*fds)])
        self.chan.close()

    def close(self):
        if self.pidfd is not None and self.exit_code is None:  # the machinery failed midway: the child goes
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        if self.chan is not None:
            self.chan.close()
        _close(self.pidfd, self.oom_fd)
        self.pidfd = self.oom_fd = None

    def wait_for(self, word, deadline):
        while True:
            if not select.select([self.sock], [], [], max(deadline - time.monotonic(), 0))[0]:
                raise TimeoutError(f"no {word.decode()!r} from the sandbox worker")
            msg, anc, _, _ = self.sock.recvmsg(64, socket.CMSG_SPACE(12) + socket.CMSG_SPACE(12))
            fds = _fds(anc)
            if msg == b"next" and len(fds) >= 2:
                self._next(*fds)
            elif msg.startswith(b"exit"):
                status, user_s, user_us, sys_s, sys_us, self.oom = struct.unpack("=i4qi", msg[4:])
                self.exit_code = os.waitstatus_to_exitcode(status)
                self.cpu_s = user_s + user_us / 1e6 + sys_s + sys_us / 1e6  # ru_utime, ru_stime (timevals)
            elif msg == b"retired":
                raise _Retired()
            elif not msg:
                raise EOFError("the sandbox worker died")
            if msg.startswith(word):
                return

    def _next(self, pidfd, chan, oom_fd=None):
        self.pidfd, self.chan, self.oom_fd = pidfd, socket.socket(fileno=chan), oom_fd
        if oom_fd is not None:  # one OOM kill in the cgroup ends the whole snippet, not just that process
            before = _oom_count(oom_fd)
            self.over_memory = lambda: _oom_count(oom_fd) > before
        elif self.memory_mb:
            self.over_memory = _memory_watchdog(pidfd, self.memory_mb << 20, self.shared_pids)


def _watch(bufs, events, deadline, max_bytes, over_memory=None, done=None):
    """Drain all pipes {fd: bytearray} at once (a flood on one never blocks the other) until all are
    at EOF and every fd in events is readable, or done is readable (then what the pipes hold is read
    without waiting for EOF). Returns None, "timeout", "output" or "memory" (when over_memory(), asked
    every WATCH_TICK_S, says so)."""
    poll, live, waiting, next_check = select.poll(), dict(bufs), set(events), time.monotonic() + WATCH_TICK_S
    for fd in (*live, *events, *([] if done is None else [done])):
        poll.register(fd, select.POLLIN)
    while live or waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout"
        if over_memory is not None and time.monotonic() >= next_check:
            if over_memory():
                return "memory"
            next_check = time.monotonic() + WATCH_TICK_S
        for fd, _ in poll.poll(min(left, WATCH_TICK_S if over_memory else left) * 1000):
            if fd == done:
                return _drain(bufs, live, max_bytes)
            if fd in waiting:
                waiting.discard(fd)
                poll.unregister(fd)
                continue
            if _take(fd, poll, bufs, live, max_bytes):
                return "output"
    return None


def _take(fd, poll, bufs, live, max_bytes) -> bool:
    """One read of a snippet's pipe into live[fd] (unregistered at EOF) -> True once past the cap."""
    data = os.read(fd, 1 << 16)
    if not data:
        poll.unregister(fd)
        del live[fd]
        return False
    live[fd] += data
    return sum(map(len, bufs.values())) > max_bytes


def _drain(bufs, live, max_bytes):
    """Read what the pipes {fd: bytearray} in live hold now, without waiting for an EOF that a process
    outside the snippet (one that opened its /proc/PID/fd) could hold back. Returns None or "output"."""
    poll = select.poll()
    for fd in live:
        poll.register(fd, select.POLLIN)
    while live:
        ready = poll.poll(0)
        if not ready:
            return None
        for fd, _ in ready:
            if _take(fd, poll, bufs, live, max_bytes):
                return "output"
    return None


def _read(path):
    with open(path) as f:  # closed now, not when collected (no ResourceWarning per snippet)
        return f.read()


@dataclass
class _Stat:
    state: bytes  # b"Z": a zombie
    ppid: int
    session: int


def _stat(pid, buf):
    """The _Stat of a process from /proc/PID/stat, or None once it is gone. The line is read into buf,
    reused and zeroed: its command name is the snippet's data, and a worker's memory is what the
    next snippet is forked from. Nothing past the session is parsed (the exit code is there)."""
    n = 0
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
        try:
            n = os.readv(fd, [buf])
        finally:
            os.close(fd)
        start = end = buf.rfind(b")", 0, n) + 2  # after the command name, which may hold ")"
        for _ in range(4):  # state, ppid, pgrp, session
            end = buf.index(b" ", end, n) + 1
        state, ppid, _, session = buf[start:end].split()
        return _Stat(bytes(state), int(ppid), int(session))
    except (OSError, ValueError):  # a process that just ended (an empty read)
        return None
    finally:
        buf[:n] = bytes(n)


def _processes(buf):
    """{pid: _Stat} of every process in /proc (/proc/PID/task/TID/children needs a kernel option)."""
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _stat(entry.name, buf)
            if stat is not None:
                found[int(entry.name)] = stat
    return found


def _memory_watchdog(pidfd, limit, shared_pids=False):
    """Without a memory cgroup: is the proportional share (PSS) of anonymous and shared memory of the
    snippet's processes together above limit? Its process tree is found from the parents in /proc.
    With shared_pids (no PID namespace) a snippet's orphans are reparented to its worker (a child
    subreaper), so the tree counted is the worker's, the worker itself left out."""
    root = int(re.search(r"Pid:\s*(-?\d+)", _read(f"/proc/self/fdinfo/{pidfd}")).group(1))
    skip, buf = None, bytearray(STAT_SIZE)
    if shared_pids:
        stat = _stat(root, buf)
        if stat is not None:  # (gone already: its own tree, which is then empty)
            root = skip = stat.ppid

    def over():
        children = {}
        for pid, stat in _processes(buf).items():
            children.setdefault(stat.ppid, []).append(pid)
        total, todo = 0, [root]
        while todo:
            pid = todo.pop()
            todo += children.get(pid, [])
            if pid == skip:
                continue
            with contextlib.suppress(OSError):
                rollup = _read(f"/proc/{pid}/smaps_rollup")
                total += sum(map(int, re.findall(r"^Pss_(?:Anon|Shmem):\s+(\d+)", rollup, re.M))) << 10
        return total > limit
    return over


def _cap(s, n):
    """First and last n/2 characters with a marker between (the official code keeps 200 + 200)."""
    return s if len(s) <= n else s[:n // 2] + MARK + s[len(s) - n // 2:]


def _signal_name(n):
    if n in (s.value for s in signal.Signals):
        return signal.Signals(n).name
    return f"SIGRTMIN+{n - signal.SIGRTMIN}"  # real-time signals have no name


def _finish(why, code, oom, out, err, wall, cpu, cfg):
    """The Result: status from how it ended (decided here, never by what the snippet printed)."""
    n = cfg.max_output
    out, err = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    stdout, stderr = _cap(out, n), _cap(err, n)
    last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
    if oom:
        status, msg = "memory", f"MemoryError: the snippet's processes together used more than {cfg.memory_mb} MB"
    elif why == "timeout" or code == -signal.SIGXCPU:
        status, msg = "timeout", f"Timeout Error: the code ran longer than {cfg.timeout:g} s"
    elif why == "output":
        status, msg = "killed", f"Killed: output exceeded {cfg.max_bytes} bytes"
    elif code < 0:
        status, msg = "killed", f"Killed by signal {_signal_name(-code)}"
    else:
        status = "ok" if code == 0 else "memory" if re.search(r"MemoryError\b", last) else "error"
        msg = "" if code == 0 else last or f"Exit code {code}"
    feedback = stdout if status == "ok" else _cap(msg, n // 2)
    if status != "ok" and stdout:
        feedback = _cap(out.rstrip("\n"), max(n - len(feedback) - 1, 2)) + "\n" + feedback
    return Result(status, stdout, stderr, code, round(wall, 4), round(cpu, 4), feedback)


# ----------------------------------------------------------------------------- kernel interfaces
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x20000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 0x1000
MS_REC, MS_PRIVATE, MNT_DETACH = 0x4000, 0x40000, 2
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 442, -100, 0x8000, 1, 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 1, 4, 22, 38, 24
PR_SET_CHILD_SUBREAPER = 36
SIGINFO_SIZE, STAT_SIZE = 128, 4096  # a siginfo_t; more than a /proc/PID/stat line needs
SECCOMP_MODE_FILTER, LINUX_CAPABILITY_VERSION_3, CAP_LAST = 2, 0x20080522, 40
MADV_COLLAPSE, HUGE_PAGE = 25, 1 << 21  # madvise: make these pages huge ones now (Linux 6.1+)
_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
    if ret != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def _unshare(flags):  # Python 3.11 has no os.unshare
    _check(_libc.unshare(flags), "unshare")


def _prctl(option, arg):
    _check(_libc.prctl(option, arg, 0, 0, 0), f"prctl {option}")


def _mount(src, dst, fstype, flags, data=None):
    def b(s):
        return s.encode() if isinstance(s, str) else s
    _check(_libc.mount(b(src), b(dst), b(fstype), flags, b(data)), f"mount {dst}")


def _write(path, text, dir_fd=None):
    fd = os.open(path, os.O_WRONLY, dir_fd=dir_fd)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _close(*fds):
    for fd in fds:
        if fd is not None:
            os.close(fd)


def _rights(*fds):  # file descriptors to send over a unix socket, and to receive them
    return socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds)


def _fds(anc):
    return [fd for _, kind, data in anc if kind == socket.SCM_RIGHTS for fd in array.array("i", data)]


def _drop_capabilities():
    """A user namespace's creator has every capability in it: give them all up (no exec follows)."""
    for cap in range(CAP_LAST + 1):
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # caps this kernel lacks fail harmlessly
    header = struct.pack("Ii", LINUX_CAPABILITY_VERSION_3, 0)
    _check(_libc.capset(header, bytes(24)), "capset")  # effective, permitted, inheritable: empty


# seccomp: syscalls that reach state the namespaces do not scope. Keyrings are per uid, not per
# namespace; a path-named AF_UNIX socket of the host is reachable from any network namespace (and a
# datagram socket pair can be re-aimed at one); AF_VSOCK talks to the hypervisor; memfd pages escape
# the /tmp size cap. socketpair(AF_UNIX, SOCK_STREAM) stays: multiprocessing uses it.
SECCOMP_NR = {"x86_64": dict(arch=0xC000003E, socket=41, socketpair=53, add_key=248, request_key=249, keyctl=250,
                             memfd_create=319),
              "aarch64": dict(arch=0xC00000B7, socket=198, socketpair=199, add_key=217, request_key=218,
                              keyctl=219, memfd_create=279)}
AF_UNIX, AF_VSOCK, SOCK_DGRAM, SOCK_TYPE_MASK, X32_SYSCALL_BIT = 1, 40, 2, 0xF, 0x40000000
BPF_LD_ABS, BPF_JEQ, BPF_JGE, BPF_AND, BPF_RET = 0x20, 0x15, 0x35, 0x54, 0x06
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, EPERM = 0x7FFF0000, 0x00050000, 1
SECCOMP_ARCH, SECCOMP_ARG0, SECCOMP_ARG1 = 4, 16, 24  # offsets in struct seccomp_data (little-endian)


def _seccomp_filter(nr):
    """The BPF program as (code, true-label, false-label, k); labels are resolved to jump offsets."""
    prog = [(BPF_LD_ABS, 0, 0, SECCOMP_ARCH), (BPF_JEQ, 0, "deny", nr["arch"]), (BPF_LD_ABS, 0, 0, 0),
            (BPF_JGE, "deny", 0, X32_SYSCALL_BIT)]
    prog += [(BPF_JEQ, "deny", 0, nr[name]) for name in ("add_key", "request_key", "keyctl", "memfd_create")]
    prog += [(BPF_JEQ, "socket", 0, nr["socket"]), (BPF_JEQ, "pair", 0, nr["socketpair"]), (BPF_RET, 0, 0, SECCOMP_RET_ALLOW),
             "socket", (BPF_LD_ABS, 0, 0, SECCOMP_ARG0), (BPF_JEQ, "deny", 0, AF_UNIX), (BPF_JEQ, "deny", 0, AF_VSOCK),
             (BPF_RET, 0, 0, SECCOMP_RET_ALLOW),
             "pair", (BPF_LD_ABS, 0, 0, SECCOMP_ARG1), (BPF_AND, 0, 0, SOCK_TYPE_MASK), (BPF_JEQ, "deny", 0, SOCK_DGRAM),
             (BPF_RET, 0, 0, SECCOMP_RET_ALLOW),
             "deny", (BPF_RET, 0, 0, SECCOMP_RET_ERRNO | EPERM)]
    return assemble_bpf(prog)


def assemble_bpf(prog) -> bytes:
    """A classic BPF program of (code, jump-if-true, jump-if-false, k) and label strings -> its bytes;
    a jump may name a label, resolved to the offset the kernel wants."""
    labels, code = {}, []
    for item in prog:
        if isinstance(item, str):
            labels[item] = len(code)
        else:
            code.append(item)
    out = b""
    for pc, (op, jt, jf, k) in enumerate(code):  # a label's offset counts from the next instruction
        jt, jf = (labels[j] - pc - 1 if isinstance(j, str) else j for j in (jt, jf))
        out += struct.pack("HBBI", op, jt, jf, k)
    return out


def _install_seccomp():
    nr = SECCOMP_NR.get(platform.machine())
    if nr is None:
        raise OSError(f"no seccomp syscall table for {platform.machine()}")
    prog = ctypes.create_string_buffer(_seccomp_filter(nr))
    fprog = struct.pack("HxxxxxxP", len(prog.raw) // 8, ctypes.addressof(prog))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, fprog, 0, 0), "seccomp")


# ----------------------------------------------------------------------------- the zygote (once)
def _python_paths():
    """Where this Python lives: interpreter, stdlib, site-packages, all of sys.path (outermost dirs)."""
    paths = {sys.prefix, sys.base_prefix, os.path.dirname(sys.executable), os.path.dirname(os.path.abspath(__file__)),
             os.path.dirname(os.path.realpath(sys.executable)), *filter(None, sys.path)}
    keep = []
    for p in sorted(os.path.abspath(p) for p in paths if os.path.exists(p)):
        if not any(p.startswith(k.rstrip("/") + "/") or p == k for k in keep):
            keep.append(p)
    return keep


def _new_user_namespace(inside, uid, gid):
    """unshare(CLONE_NEWUSER), with `inside` as the uid and gid that uid and gid of the parent's map to."""
    _unshare(CLONE_NEWUSER)
    _write("/proc/self/setgroups", "deny")  # required before an unprivileged gid_map
    _write("/proc/self/uid_map", f"{inside} {uid} 1")
    _write("/proc/self/gid_map", f"{inside} {gid} 1")


def _enter_user_namespace():
    """Not root: become root of a new user namespace (the user's id mapped to 0, as bwrap does)."""
    _new_user_namespace(0, os.geteuid(), os.getegid())
    # Our PID namespace belongs to the host's user namespace: we could not return to it after
    # forking a worker into a new one. So go on as init of a PID namespace that is ours.
    _unshare(CLONE_NEWPID)
    pid = os.fork()
    if pid:
        os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) & 0xFF)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _prepare_root(userns):
    """Zygote: a private mount namespace, all read-only and nosuid. Dirs a snippet must not see (the
    user's home when snippets keep the user's kernel uid) or cannot enter (pyenv under /root, mode
    700) are masked with an empty read-only tmpfs, and Python's own dirs bound back into them."""
    python = _python_paths()
    masks = set()
    for p in python:
        parts = p.split("/")
        blocked = [a for a in ("/".join(parts[:i]) for i in range(2, len(parts))) if not os.stat(a).st_mode & 1]
        if blocked and not userns:
            masks.add(blocked[0])
    # /var/tmp: the host's other world-writable dir (and its sockets); home and runtime dir: the
    # user's own files, readable when snippets keep the user's kernel uid (user mode).
    for d in ["/var/tmp"] + ([pwd.getpwuid(os.getuid()).pw_dir, f"/run/user/{os.getuid()}"] if userns else []):
        d = os.path.realpath(d)
        if d != "/" and os.path.isdir(d) and not any(p == d or d.startswith(p + "/") for p in python):
            masks.add(d)
    _unshare(CLONE_NEWNS)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here propagates to the host
    keep = {p: os.open(p, os.O_PATH) for p in python if any(p.startswith(m + "/") for m in masks)}
    attr = ctypes.create_string_buffer(struct.pack("QQQQ", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0))
    _check(_libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, attr, len(attr.raw)), "mount_setattr")
    for m in sorted(masks):
        _mount("tmpfs", m, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        for p, fd in keep.items():
            if p.startswith(m + "/"):
                os.makedirs(p, exist_ok=True)
                _mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
        _mount(None, m, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    _close(*keep.values())


def _step(iso, name, fn, strict):
    """Apply a protection iso says works; the startup probe (strict=False) records refusals instead."""
    if not iso.get(name):
        return
    try:
        fn()
    except OSError:
        if strict:
            raise
        iso[name] = False


def _zygote(cfg, ctl_fd):
    """Import the math stack once, confine ourselves, probe, then fork a worker per socket sent."""
    ctl, missing = socket.socket(fileno=ctl_fd), []
    for name in cfg.preload:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - reported; the supervisor warns
            missing.append(name)
    if "numpy" in sys.modules:  # its first seed() costs 20 ms: pay it here, not in every snippet
        sys.modules["numpy"].random.seed(0)
    iso = dict.fromkeys(ISOLATION, True)
    userns = os.geteuid() != 0
    if not userns:
        del iso["user_namespace"]  # root needs none
    _step(iso, "user_namespace", _enter_user_namespace, False)
    if userns and not iso["user_namespace"]:
        iso = dict.fromkeys(iso, False) | {"rlimits": True, "no_new_privs": True, "seccomp": True,
                                             "parent_death_signal": True}
    cgroup = _cgroup_parent()
    _step(iso, "mount_namespace", lambda: _prepare_root(userns), False)
    pidns = os.open("/proc/self/ns/pid", os.O_RDONLY)
    _step(iso, "pid_namespace", lambda: _pid_namespace_probe(pidns), False)
    iso = _probe(iso, cfg, pidns, userns, cgroup)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # finished workers reap themselves
    gc.freeze()  # forked children then never copy the zygote's objects to collect them
    _huge_pages()
    ctl.send(json.dumps({"isolation": iso, "missing": missing}).encode())
    workers = []
    while True:
        try:
            fds = _fds(ctl.recvmsg(16, socket.CMSG_SPACE(4))[1])
        except OSError:  # (reset): the supervisor is gone too
            fds = []
        if not fds:  # the supervisor is gone
            if cgroup is not None:
                _remove_cgroups(cgroup, workers)
            if not iso["mount_namespace"]:
                _await_workers()
            os._exit(0)
        pid = _fork(iso["pid_namespace"], pidns)
        if pid == 0:
            ctl.close()
            _worker(socket.socket(fileno=fds[0]), iso, cfg, pidns, userns, cgroup)
        workers.append(pid)
        _close(*fds)
        ctl.send(b"+")


def _await_workers():
    """Degraded mode: our exit would kill the workers (their parent-death signal) before they killed
    what their snippets left and removed their dirs in the host's /tmp; they exit on their own once
    the supervisor is gone (EOF on their sockets), so wait until no child of ours is left (SIGCHLD
    is ignored: none lingers as a zombie), for REAP_GRACE_S at most."""
    deadline, buf = time.monotonic() + REAP_GRACE_S, bytearray(STAT_SIZE)
    while _children(buf) and time.monotonic() < deadline:
        time.sleep(EXIT_POLL_S)


def _huge_pages():
    """Back our heap with 2 MiB pages where the kernel can (transparent huge pages): a fork then copies,
    and an exit unmaps, one entry per 2 MiB of it instead of 512, and those two are most of what a
    snippet costs. Regions it cannot collapse keep their 4 KiB pages."""
    for line in open("/proc/self/maps"):
        addr, perms, *rest = line.split()
        if perms.startswith("rw") and (len(rest) == 3 or rest[3] == "[heap]"):  # anonymous, or the heap
            lo, hi = (int(x, 16) for x in addr.split("-"))
            lo, hi = -(-lo // HUGE_PAGE) * HUGE_PAGE, hi // HUGE_PAGE * HUGE_PAGE
            if hi > lo:
                _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_COLLAPSE)


def _remove_cgroups(cgroup, pids):
    """Kill the workers and remove their cgroups (possible once their processes are gone)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        for _ in range(100):
            with contextlib.suppress(OSError):
                if os.path.exists(f"/proc/self/fd/{cgroup[0]}/retool-sb-{pid}"):
                    os.rmdir(f"retool-sb-{pid}", dir_fd=cgroup[0])
                break
            time.sleep(0.01)


def _pid_namespace_probe(pidns):  # can we make a PID namespace for a child and come back to ours?
    _unshare(CLONE_NEWPID)
    _check(_libc.setns(pidns, CLONE_NEWPID), "setns")


def _fork(new_pid_namespace, pidns):
    """Fork; with new_pid_namespace the child is init of a PID namespace of its own, and our later
    children are born in pidns (ours) again."""
    if not new_pid_namespace:
        return os.fork()
    _unshare(CLONE_NEWPID)
    pid = None
    try:
        pid = os.fork()
    finally:
        if pid != 0:  # the parent, also when the fork failed
            _check(_libc.setns(pidns, CLONE_NEWPID), "setns")
    return pid


def _probe(iso, cfg, pidns, userns, cgroup):
    """Try the worker's and the snippet's protections in a child set up like both; returns what worked."""
    r, w = os.pipe()
    pid = _fork(iso["pid_namespace"], pidns)
    if pid == 0:
        state = None
        try:
            state = _setup_worker(iso, cfg, pidns, userns, cgroup, strict=False)
            if not _fresh_tmp(state):
                raise OSError("cannot set up the worker's /tmp")
            _confine(state, strict=False)
            _take_uid(state, strict=False)
            os.write(w, json.dumps(state.iso).encode())
        finally:
            if state is not None:
                _remove_workdir(state)  # (degraded: made in the host's /tmp by _fresh_tmp)
            os._exit(0)
    os.close(w)
    with open(r, "rb") as f:
        found = f.read()
    os.waitpid(pid, 0)
    if cgroup is not None:
        _remove_cgroups(cgroup, [pid])
    return json.loads(found) if found else iso


# ----------------------------------------------------------------------------- the worker (trusted, data-free)
@dataclass
class _State:
    """What a worker knows: set up once, never a byte of snippet data."""
    iso: dict
    cfg: Config
    userns: bool
    pidns: int  # fd of the worker's own PID namespace
    uid: int = 0  # the snippets' uid (root mode)
    null: int = -1
    workdir: str = "/tmp"
    keep: dict = field(default_factory=dict)  # python dir under /tmp -> O_PATH fd, bound into each fresh /tmp
    tmp_mounted: bool = False
    cgroup: tuple | None = None  # the zygote's cgroup: (dir fd, limit file, events file)
    oom_fd: int | None = None  # its OOM events file
    ooms: int = 0
    siginfo: ctypes.Array = field(default_factory=lambda: ctypes.create_string_buffer(SIGINFO_SIZE))
    stat: bytearray = field(default_factory=lambda: bytearray(STAT_SIZE))  # a /proc/PID/stat, read in place


def _setup_worker(iso, cfg, pidns, userns, cgroup, strict=True):
    """Worker, once: own network namespace, mount namespace with /proc of our PID namespace, cgroup."""
    host_pid = int(os.readlink("/proc/self"))  # still the zygote's /proc: our pid on the host
    state = _State(dict(iso), cfg, userns, pidns, uid=UID_BASE + host_pid, null=os.open(os.devnull, os.O_RDWR),
                   cgroup=cgroup)
    iso = state.iso
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the zygote goes (the supervisor is gone): so do we
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the zygote ignores it; we wait for our children
    if iso["pid_namespace"]:
        state.pidns = os.open("/proc/self/ns/pid", os.O_RDONLY)  # ours, of which we are init
    else:  # no PID namespace whose end kills them: a snippet's orphans come to us, and we kill them
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _step(iso, "net_namespace", lambda: _unshare(CLONE_NEWNET), strict)
    _step(iso, "mount_namespace", lambda: _unshare(CLONE_NEWNS), strict)
    if iso["mount_namespace"]:  # opened in our namespace (a bind source must be in it), before /tmp is covered
        state.keep = {p: os.open(p, os.O_PATH) for p in _python_paths() if p.startswith("/tmp/")}
    iso["private_proc"] = iso["private_proc"] and iso["mount_namespace"] and iso["pid_namespace"]
    _step(iso, "private_proc", lambda: _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2"),
          strict)
    _step(iso, "memory_cgroup", lambda: _join_cgroup(state, host_pid), strict)
    if not iso["mount_namespace"]:
        state.workdir = f"/tmp/retool-sb-{host_pid}"  # degraded: a dir in the host's /tmp
    # Once here, inherited by every process we fork: the BPF program is built and loaded once per
    # worker, not per snippet. We need nothing they refuse.
    _step(iso, "no_new_privs", lambda: _prctl(PR_SET_NO_NEW_PRIVS, 1), strict)  # setuid bits inert
    _step(iso, "seccomp", _install_seccomp, strict)
    _prctl(PR_SET_DUMPABLE, 0)  # nothing a snippet runs can read or write our memory
    return state


def _fresh_tmp(state):
    """A new empty /tmp (and /dev/shm) for the next snippet: the old tmpfs is detached whole, so no
    tree the snippet built (however deep) can make this fail. Returns False if it failed anyway."""
    try:
        if not state.iso["mount_namespace"]:
            if os.path.exists(state.workdir):
                subprocess.run(["rm", "-rf", state.workdir], check=True, stdin=state.null)
            os.mkdir(state.workdir, 0o700)
            if state.iso["uid_drop"] and not state.userns:
                os.chown(state.workdir, state.uid, state.uid)
            return True
        if state.tmp_mounted:
            _check(_libc.umount2(b"/dev/shm", MNT_DETACH), "umount /dev/shm")
            _check(_libc.umount2(b"/tmp", MNT_DETACH), "umount /tmp")
        owner = "" if state.userns else f",uid={state.uid},gid={state.uid}"
        _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={state.cfg.disk_mb}m,nr_inodes=65536,mode=0700{owner}")
        for p, fd in state.keep.items():  # Python under /tmp stays visible, read-only
            os.makedirs(p, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
        _mount("/tmp", "/dev/shm", None, MS_BIND)  # POSIX shm and semaphores (multiprocessing)
        state.tmp_mounted = True
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


def _cgroup_parent():
    """Zygote, before the host turns read-only: our memory cgroup's dir as an fd (writes through it
    reach the host's mount), the limit file and the events file; None where none is ours to use."""
    for line in open("/proc/self/cgroup").read().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "memory":
            base, files = "/sys/fs/cgroup/memory", ("memory.limit_in_bytes", "memory.oom_control")
        elif controllers == "" and os.path.exists(f"/sys/fs/cgroup/unified{path}/memory.max"):
            base, files = "/sys/fs/cgroup/unified", ("memory.max", "memory.events")
        else:
            continue
        with contextlib.suppress(OSError):
            fd = os.open(base + path, os.O_RDONLY | os.O_DIRECTORY)
            if os.access(f"/proc/self/fd/{fd}", os.W_OK):
                for name in os.listdir(fd):  # of sandboxes killed before they could clean up: empty ones go
                    if name.startswith("retool-sb-"):
                        with contextlib.suppress(OSError):
                            os.rmdir(name, dir_fd=fd)
                return fd, *files
            os.close(fd)
    return None


def _join_cgroup(state, host_pid):
    """A memory cgroup for this worker and its snippets (one at a time): memory_mb for all of a
    snippet's processes together, tmpfs pages included."""
    if state.cgroup is None:
        raise OSError("no memory cgroup of ours to divide")
    fd, limit_file, _ = state.cgroup
    name = f"retool-sb-{host_pid}"
    os.mkdir(name, dir_fd=fd)
    _write(f"{name}/{limit_file}", str((state.cfg.memory_mb + state.cfg.disk_mb) << 20), fd)
    _write(f"{name}/cgroup.procs", "0", fd)  # ourselves, so every child is born inside
    state.oom_fd = os.open(f"{name}/{state.cgroup[2]}", os.O_RDONLY, dir_fd=fd)
    state.ooms = _oom_count(state.oom_fd)


def _oom_count(fd):  # memory.oom_control (v1) or memory.events (v2)
    found = re.search(rb"oom_kill (\d+)", os.pread(fd, 4096, 0))
    return int(found.group(1)) if found else 0


def _worker(sock, iso, cfg, pidns, userns, cgroup):
    """A worker's life. However it ends, what a snippet left running and (degraded) its work dir go
    with it, and it dies quietly: its stderr is the caller's, and the supervisor learns of a death
    from EOF on the socket (an `internal` result and a new worker), not from a traceback."""
    state = None
    try:
        state = _setup_worker(iso, cfg, pidns, userns, cgroup)
        _serve(sock, state)
    except BaseException:  # noqa: BLE001 - see above: reported as EOF, never printed
        pass
    finally:
        with contextlib.suppress(BaseException):
            sock.close()
            if state is not None and not state.iso["pid_namespace"]:
                _kill_children(state)
            if state is not None:
                _remove_workdir(state)
        os._exit(0)  # (our cgroup goes when the zygote exits)


def _serve(sock, state):
    """One snippet at a time. Its process is forked and confined before it is asked for (off the
    caller's clock) and offered at once: "next" + a pidfd and a socket to it, on which the supervisor
    sends it the snippet's fds (we never see them). We reap it, answer "exit", renew /tmp, fork the next."""
    status, rusage = ctypes.c_int(), ctypes.create_string_buffer(256)  # reused, zeroed after each use
    while True:
        if not _fresh_tmp(state):  # a worker that cannot give the next snippet a clean /tmp is retired,
            with contextlib.suppress(OSError):  # before it gets one: the supervisor replaces it
                sock.send(b"retired")
            return
        pid, chan = _fork_next(state)
        pidfd = os.pidfd_open(pid)  # our unreaped child: the id cannot have been reused
        try:
            sock.sendmsg([b"next"], [_rights(pidfd, chan.fileno(), *([] if state.oom_fd is None else [state.oom_fd]))])
        except OSError:
            return  # the supervisor is gone (the child sees EOF on its socket and exits)
        finally:
            os.close(pidfd)
            chan.close()
        # Reaped into ctypes buffers, sent as raw bytes and zeroed: nothing of the snippet (not even
        # its exit code) stays in the memory that the next snippet is forked from.
        _reap(state, pid, status, rusage)
        oom = _oom_count(state.oom_fd) if state.oom_fd is not None else 0
        try:
            sock.sendmsg([b"exit", status, memoryview(rusage)[:32], struct.pack("=i", int(oom > state.ooms))])
        except OSError:
            return  # the supervisor retired us
        finally:
            ctypes.memset(ctypes.byref(status), 0, 4)
            ctypes.memset(rusage, 0, len(rusage))
        state.ooms = oom


def _reap(state, pid, status, rusage):
    """Reap the snippet's process into status and rusage. In its own PID namespace its end killed all
    it started. Without one, the rest is ours to kill before "exit" is sent (so that the Result's
    memory is free and its pipes are held by nobody of the snippet's): its process group while the
    unreaped zombie still holds the group's id (so the id names no one else), then every process left
    below us, orphans included (we are their subreaper)."""
    if not state.iso["pid_namespace"]:
        _check(_libc.waitid(os.P_PID, pid, state.siginfo, os.WEXITED | os.WNOWAIT), "waitid")
        ctypes.memset(state.siginfo, 0, SIGINFO_SIZE)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    _check(int(_libc.wait4(pid, ctypes.byref(status), 0, rusage) != pid), "wait4")
    if not state.iso["pid_namespace"]:
        _kill_children(state)


def _kill_children(state):
    """Degraded mode: kill and reap all our children until none is left (a killed one's own children
    come to us, the subreaper, so the scan repeats). A child cannot be reaped by anyone else, so its
    pid names it until we reap it: no kill here can reach an unrelated process."""
    while True:
        children = _children(state.stat)
        if not children:
            return
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in children:
            _libc.waitpid(pid, None, 0)  # no status kept: a child's exit code is snippet data


def _children(buf):
    """Our children, from the host's /proc (no PID namespace: our own pid as that /proc numbers it)."""
    me = int(os.readlink("/proc/self"))
    return [pid for pid, stat in _processes(buf).items() if stat.ppid == me]


def _remove_workdir(state):
    """Degraded mode: the work dir in the host's /tmp (rm -rf: a tree too deep for Python goes too)."""
    if not state.iso["mount_namespace"] and os.path.lexists(state.workdir):
        subprocess.run(["rm", "-rf", state.workdir], stdin=state.null)


def _fork_next(state):
    """The next snippet's process, init of a new PID namespace: it confines itself now and waits on
    its end of a socket pair (ours, returned with its pid) for "run"/"hold" + the caller's 4 fds."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with theirs:  # (the child never returns from _next_snippet)
        pid = _fork(state.iso["pid_namespace"], state.pidns)
        if pid == 0:
            _next_snippet(state, theirs.fileno())
    return pid, ours


# ----------------------------------------------------------------------------- the snippet child
def _drop_uid(state):
    os.setgroups([])
    os.setgid(state.uid)
    os.setuid(state.uid)


def _rlimits(state):
    cfg = state.cfg
    cpu = int(cfg.timeout) + 2  # the wall clock fires first unless threads burn several cores
    limits = {"AS": cfg.memory_mb << 20, "CPU": cpu, "CORE": 0, "FSIZE": cfg.disk_mb << 20, "NOFILE": NOFILE,
              "NPROC": NPROC}  # NPROC binds only once we are not root
    for name, value in limits.items():
        hard = value + 1 if name == "CPU" else value  # SIGXCPU at the soft limit, SIGKILL at the hard one
        resource.setrlimit(getattr(resource, f"RLIMIT_{name}"), (value, hard))


def _next_snippet(state, chan):
    """The next snippet's process. Until its fds arrive it is ours: it confines itself and warms up;
    then it takes them as 1-4 (stdout, stderr, code, ready), its uid, and runs the snippet (or, on
    "hold", a session). A set-up failure is reported on the ready pipe once there is one."""
    failure = None
    try:
        os.dup2(state.null, 0)
        os.dup2(chan, CHAN_FD)
        for fd in range(1, CHAN_FD):
            os.dup2(0, fd)  # 0-4 are taken, so the fds that arrive land above CHAN_FD
        os.closerange(CHAN_FD + 1, MAX_FD)  # the worker's socket, namespace, cgroup and path fds
        _confine(state)
        std = _warm_up()
    except Exception as e:  # noqa: BLE001 - reported below, where the supervisor reads it
        failure = e
    chan = socket.socket(fileno=CHAN_FD)
    msg, anc, _, _ = chan.recvmsg(16, socket.CMSG_SPACE(4 * 4))
    chan.detach()  # (closed below by number; the object must not close a later fd 5 of the snippet's)
    fds = _fds(anc)
    if len(fds) == 4 and msg in (b"run", b"hold"):
        try:
            for fd, to in zip(fds, range(1, CHAN_FD)):
                os.dup2(fd, to)
            os.closerange(CHAN_FD, MAX_FD)
            if failure is not None:
                raise failure
            _take_uid(state)
            if msg == b"run":
                _snippet(std)
            else:
                _session_init(not state.iso["pid_namespace"])
        except BaseException as e:  # noqa: BLE001
            with contextlib.suppress(OSError):
                os.write(4, f"SandboxError: confinement failed: {e!r}".encode())
    os._exit(1)


def _confine(state, strict=True):
    """Snippet child, still root of its namespaces: the per-process protections but the uid change, in
    this order (no_new_privs and seccomp come from the worker)."""
    iso = state.iso
    os.setsid()  # own session and group: no controlling tty, and kill(0)/killpg stay inside
    _prctl(PR_SET_DUMPABLE, 1)  # the worker is not dumpable; we are, so our /proc/self is ours
    _step(iso, "ipc_namespace", lambda: _unshare(CLONE_NEWIPC), strict)  # SysV IPC and mqueues die with us
    os.chdir(state.workdir)
    # 1. User mode: a user namespace of our own, uid 2^20+pid mapped to the worker's root (the user): its
    # RLIMIT_NPROC count starts at 0 and caps this snippet alone. First, so that it does not inherit the
    # RLIMIT_NPROC that 2. lowers.
    if state.userns:
        _step(iso, "uid_drop", lambda: _new_user_namespace(state.uid, 0, 0), strict)
    _step(iso, "rlimits", lambda: _rlimits(state), strict)  # 2.
    if state.userns:  # 3. unprivileged: in a user namespace of our own, by giving caps up
        _step(iso, "uid_drop", _drop_capabilities, strict)
    _step(iso, "parent_death_signal", lambda: _prctl(PR_SET_PDEATHSIG, signal.SIGKILL), strict)  # after both


def _take_uid(state, strict=True):
    """Root: the snippets' uid, only once a snippet is ours to run (an idle child keeps root's, so that
    uid means a running snippet); then die with the worker again (the uid change cleared it)."""
    if state.userns:
        return
    _step(state.iso, "uid_drop", lambda: _drop_uid(state), strict)
    _prctl(PR_SET_DUMPABLE, 1)  # the uid change cleared it
    _step(state.iso, "parent_death_signal", lambda: _prctl(PR_SET_PDEATHSIG, signal.SIGKILL), strict)


def _warm_up():
    """Per-snippet work that needs no snippet, done before it arrives: the process set up as `python
    file.py` starts (its streams made on stand-in pipes, as the real ones will be), and a first touch
    (copy-on-write) of what every run uses."""
    stand_in = os.pipe()  # (closed with the rest when the real fds arrive)
    for fd in (1, 2):
        os.dup2(stand_in[1], fd)
    std = _prepare(types.ModuleType("__main__"))
    with open(0, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False) as f:
        exec(compile("print(sum(i * i for i in range(3)), file=f)", "<warm-up>", "exec"), {"f": f})
    return std


def _prepare(main):
    """sys as `python file.py` has it: argv, __main__, the standard streams on fds 0-2 (line-buffered:
    a kill keeps prints), and a fresh numpy seed (a forked RNG would repeat itself in every snippet)."""
    sys.stdin = sys.__stdin__ = open(0, closefd=False)
    std = [open(fd, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False) for fd in (1, 2)]
    sys.stdout, sys.stderr = std
    sys.__stdout__, sys.__stderr__ = std
    sys.argv, sys.modules["__main__"] = ["<code>"], main
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(int.from_bytes(os.urandom(4), "little"))
    return std


def _snippet(std):
    with open(3, "rb") as f:
        code = f.read().decode(errors="replace")
    os.write(4, b"r")  # set up: from here on, every failure is the snippet's own
    os.close(4)
    os._exit(_execute(code, sys.modules["__main__"], std))


def _execute(code, main, std):
    """Run code as `python file.py` would, in module `main` (set up by _prepare); returns the exit code."""
    linecache.cache["<code>"] = (len(code), None, code.splitlines(True), "<code>")  # tracebacks show lines
    rc = 1
    try:
        exec(compile(code, "<code>", "exec"), main.__dict__)
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else int(e.code is not None)
        if not isinstance(e.code, int | None):
            print(e.code, file=std[1])
    except BaseException as e:  # noqa: BLE001 - the snippet's exception is its feedback: to our stderr,
        traceback.print_exception(type(e), e, e.__traceback__.tb_next, file=std[1])  # whatever sys.stderr is now
    for f in (sys.stdout, sys.stderr, *std):
        with contextlib.suppress(BaseException):  # the snippet may have closed or replaced them
            f.flush()
    return rc & 0xFF


# ----------------------------------------------------------------------------- sessions
class Session(_Closing):
    """Stateful cells on a worker of its own: sessions never share state.

    The worker's child is init of the session's PID namespace and only reaps; its child, the holder,
    keeps the state. A cell runs in a fork of the holder; one that succeeds kills every other process
    of the namespace (the old holder, anything the cell left running) and becomes the holder; a
    failed one exits, and the holder kills what it left. No chain grows, nothing survives a cell."""

    def __init__(self, sandbox):
        self._sb, self._lock = sandbox, threading.Lock()
        self._worker, self._cells = sandbox._new_worker(), None

    def run(self, code):
        with self._lock:
            return self._sb._call(self._worker, lambda: self._cell(code))

    def close(self):
        with self._lock:
            self._reset()
            self._worker.sock.close()

    def _cell(self, code):
        try:
            if self._cells is None:
                self._cells = _start_session(self._worker)
            return _run_cell(self._cells, code, self._sb.cfg)
        except Exception:
            self._reset()
            raise

    def _reset(self):
        if self._cells is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._cells.run.pidfd, signal.SIGKILL)  # the namespace goes whole
                self._cells.run.wait_for(b"exit", time.monotonic() + REAP_GRACE_S)
            self._cells.run.close()
            self._cells.sock.close()
            self._cells = None


@dataclass
class _Cells:
    sock: socket.socket  # to the holder: code + stdout/stderr fds in; "hello", "pid", "ok", "exit" out
    run: _Running  # the worker's messages about the session's init
    holder: int  # pid (ours) of the process that holds the state


def _start_session(worker):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the kernel stamps each sender's pid
    ready_r, ready_w = os.pipe()
    null = os.open(os.devnull, os.O_WRONLY)
    run = _Running(worker.sock)
    try:
        run.wait_for(b"next", time.monotonic() + REAP_GRACE_S)
        run.hand(b"hold", null, null, theirs.fileno(), ready_w)
    except BaseException:
        run.close()
        raise
    finally:
        _close(null, ready_w)
        theirs.close()
    with open(ready_r, "rb") as f:
        ready = f.read()
    if ready != b"r":
        raise RuntimeError(ready.decode(errors="replace") or "the session's set-up failed")
    cells = _Cells(ours, run, 0)
    cells.holder = _message(cells, {b"hello"}, time.monotonic() + REAP_GRACE_S, lambda pid: True)[1]
    return cells


def _message(cells, words, deadline, trusted):
    """The next message in words from a sender trusted(pid) says is who it claims; others are dropped."""
    while True:
        if not select.select([cells.sock], [], [], max(deadline - time.monotonic(), 0))[0]:
            raise TimeoutError("the session holder does not answer")
        msg, anc, _, _ = cells.sock.recvmsg(64, socket.CMSG_SPACE(12))
        if not msg:
            raise EOFError("the session holder died")
        creds = [data for _, kind, data in anc if kind == socket.SCM_CREDENTIALS]
        pid = struct.unpack("3i", creds[0])[0] if creds else 0
        word, *rest = msg.split()
        if word in words and pid and trusted(pid):
            return word, pid, rest


def _run_cell(cells, code, cfg):
    (out_r, out_w), (err_r, err_w), t0 = os.pipe(), os.pipe(), time.monotonic()
    bufs, cell_fd = {out_r: bytearray(), err_r: bytearray()}, None
    try:
        try:
            cells.sock.sendmsg([code.encode(errors="replace")], [_rights(out_w, err_w)])
        finally:
            _close(out_w, err_w)
        # The cell says "pid" before any of its code runs, so the first "pid" from a process other than
        # the holder (whose threads may be a past cell's) is the cell's; its parent is no test: a quick
        # cell may have exited, or killed the holder and been reparented, before we read it. Only the
        # cell may say "ok"; only the holder "exit".
        _, cell, _ = _message(cells, {b"pid"}, t0 + cfg.timeout + REAP_GRACE_S, lambda p: p != cells.holder)
        with contextlib.suppress(ProcessLookupError):  # a quick cell may be gone already
            cell_fd = os.pidfd_open(cell)
        why = _watch(bufs, [], t0 + cfg.timeout, cfg.max_bytes)
        if why and cell_fd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(cell_fd, signal.SIGKILL)  # the holder that forked it reports, carries on
        word, pid, rest = _message(cells, {b"ok", b"exit"}, time.monotonic() + cfg.timeout + REAP_GRACE_S,
                                   lambda p: p == cell or p == cells.holder)
        if word == b"ok":
            if pid != cell:
                raise RuntimeError("the session holder sent ok")
            cells.holder = cell
    finally:
        _close(out_r, err_r, cell_fd)
    return _finish(why, int(rest[0]), False, bufs[out_r], bufs[err_r], time.monotonic() - t0, float(rest[1]), cfg)


def _session_init(shared_pids):
    """Init of the session's PID namespace: start the holder, then reap until nothing is left. Without
    a PID namespace, a subreaper: the session's orphans (each replaced holder's successor) come to us
    to be reaped, not to the worker, which waits for us alone until the session ends."""
    os.write(4, b"r")
    os.close(4)
    if shared_pids:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
    if os.fork() == 0:
        _hold(socket.socket(fileno=3), types.ModuleType("__main__"), shared_pids)
    os.close(3)
    with contextlib.suppress(ChildProcessError):
        while True:
            os.wait()
    os._exit(0)


def _hold(sock, main, shared_pids):
    """Session holder loop. Untrusted (earlier cells ran here): the supervisor believes only
    kernel-stamped pids and the pipes."""
    sock.send(b"hello")
    while True:
        code, anc = sock.recvmsg(1 << 20, socket.CMSG_SPACE(8))[:2]
        if not code:
            os._exit(0)
        fds = _fds(anc)
        _prctl(PR_SET_DUMPABLE, 0)  # while the cell runs, nothing it starts can write the state it forks from
        pid = os.fork()
        if pid == 0:
            _prctl(PR_SET_DUMPABLE, 1)
            os.dup2(fds[0], 1)
            os.dup2(fds[1], 2)
            _close(*fds)
            sock.send(b"pid")  # SO_PASSCRED: the supervisor learns our real pid, to kill just this cell
            me, rc = os.getpid(), _execute(code.decode(errors="replace"), main, _prepare(main))
            if rc or os.getpid() != me:  # failed, or a process the cell forked: not the new holder
                os._exit(rc)
            null = os.open(os.devnull, os.O_WRONLY)
            for fd in (1, 2):
                os.dup2(null, fd)  # the cell's pipes: EOF
            os.close(null)
            _kill_others(shared_pids)  # all but us and init: the old holder, what the cell left running
            ru = resource.getrusage(resource.RUSAGE_SELF)
            sock.send(b"ok 0 %f" % (ru.ru_utime + ru.ru_stime))
            continue
        _close(*fds)
        _, status, ru = os.wait4(pid, 0)
        _kill_others(shared_pids)  # what the failed cell left running
        sock.send(b"exit %d %f" % (os.waitstatus_to_exitcode(status), ru.ru_utime + ru.ru_stime))


def _kill_others(shared_pids):
    """Kill every process of the session but us and its init. In the session's own PID namespace that
    is kill(-1); without one kill(-1) would reach every process of the user, the caller's included.
    There the session's processes are found by their session id (the init's pid: it called setsid),
    each checked again once a pidfd holds it, so that a pid reused meanwhile is never signalled."""
    if not shared_pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
        return
    me, sid, buf = os.getpid(), os.getsid(0), bytearray(STAT_SIZE)
    while True:
        others = [pid for pid in _session_members(sid, buf) if pid not in (me, sid)]
        if not others:
            return
        for pid in others:
            with contextlib.suppress(OSError):
                fd = os.pidfd_open(pid)
                try:
                    if _session_members(sid, buf, [pid]):
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                finally:
                    os.close(fd)


def _session_members(sid, buf, pids=None):
    """The live (not zombie) processes among pids (default: all in /proc) whose session is sid."""
    stats = _processes(buf) if pids is None else {pid: _stat(pid, buf) for pid in pids}
    return [pid for pid, stat in stats.items() if stat is not None and stat.session == sid and stat.state != b"Z"]


# ----------------------------------------------------------------------------- CLI
def _die(msg):
    print(f"sandbox.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def _cli():
    ap = argparse.ArgumentParser(prog="sandbox.py", description="Run a Python file (or stdin) in the sandbox; "
                                 "print the Result as JSON.")
    ap.add_argument("file", nargs="?", help="code file (default: stdin)")
    ap.add_argument("--timeout", type=float, default=5.0, help="wall-clock limit in seconds (default: 5)")
    ap.add_argument("--isolation", action="store_true", help="print the protections active here and exit")
    ap.error = _die  # one line, not the usage block
    args = ap.parse_args()
    if not 0 < args.timeout < float("inf"):
        _die(f"--timeout must be a positive number of seconds, not {args.timeout:g}")
    src = ""
    if not args.isolation:
        try:
            src = open(args.file, encoding="utf-8", errors="replace").read() if args.file else sys.stdin.read()
        except OSError as e:
            _die(f"cannot read {args.file}: {e.strerror}")
    with Sandbox(args.timeout, workers=1) as sb:
        if args.isolation:
            print(json.dumps(sb.isolation, indent=1))
        else:
            print(json.dumps(asdict(sb.run(src)), ensure_ascii=False, indent=1))


if __name__ == "__main__" and sys.argv[1:2] == ["--zygote"]:
    _zygote(Config(**json.loads(sys.argv[2])), int(sys.argv[3]))
elif __name__ == "__main__":
    _cli()
