"""A fast, really isolating code interpreter for ReTool rollouts (standard library only).

How it works. `Sandbox()` starts one warm *zygote*: a fresh interpreter with an empty environment
that imports the math stack once (BLAS/OpenMP threads pinned to 1 first, so it is single-threaded
when it forks), enters a private read-only view of the filesystem, probes which kernel protections
it may use, and then forks one *worker* per slot. A worker serves one snippet at a time: it forks
a fresh child per snippet (a fork, ~2 ms, instead of a ~1 s interpreter start), drains the child's
stdout and stderr concurrently, enforces the wall clock and output ceiling, and reaps it.

Each child, before running a line of the snippet: new session (no controlling tty); init of its own
PID namespace (so when it exits or is killed, every descendant dies with it, setsid or not); its
own network namespace (no network at all, not even loopback), IPC namespace and mount namespace
(the whole filesystem read-only and nosuid, a private tmpfs /tmp as cwd owned by the snippet's
uid and gone with the namespace, a private /proc); rlimits on address space, CPU, file size, open
files, processes, core dumps; uid/gid nobody when we are root; no_new_privs; SIGKILL on parent
death. `Sandbox.isolation` says which of these the kernel granted; a refusal warns once.

Result.feedback is what the model reads inside <interpreter>, capped to `max_output` characters
(head and tail kept, a marker between):
  ok      -> stdout
  error   -> stdout so far + the last line of stderr (the exception, e.g. "ZeroDivisionError: ...")
  memory  -> the same, when that exception is a MemoryError
  timeout -> stdout so far + "Timeout Error: ..."
  killed  -> stdout so far + "Killed: ..." (a signal such as SIGSEGV, or the output ceiling)
  internal-> "Sandbox error: ..." (the machinery failed, never the snippet; run() never raises)

Sessions (`sb.session()`) are stateful: a holder process keeps the globals; each cell runs in a
fork of it; a cell that succeeds becomes the new holder, one that fails, times out or crashes just
dies, leaving the previous holder (and state) untouched. Files in /tmp are not rolled back.
"""
import array
import builtins
import ctypes
import gc
import importlib
import json
import linecache
import os
import pickle
import queue
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

# ----------------------------------------------------------------------------- config
PRELOAD = ("math", "fractions", "itertools", "numpy", "sympy")
THREADS_1 = {k: "1" for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                              "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")}
# The whole environment of the zygote, hence of every snippet: nothing of the caller's leaks in.
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "USER": "sandbox", "LANG": "C.UTF-8", **THREADS_1}
UID_BASE = 1 << 20  # + the worker's pid: a uid per worker, so concurrent snippets share no NPROC count
NPROC, NOFILE = 128, 256  # processes+threads per worker uid; open files per process
MARK = "\n[... output truncated ...]\n"
INTERNAL = 254  # exit code of a child whose confinement failed (with a "SandboxError" line)

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x08000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 0x1000, 0x4000, 0x40000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags):  # Python 3.11 has no os.unshare
    _check(_libc.unshare(flags), "unshare")


def _mount(src, dst, fstype, flags, data=None):
    enc = lambda s: s.encode() if isinstance(s, str) else s
    _check(_libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), f"mount {dst}")


@dataclass
class Result:
    status: str  # ok | error | memory | timeout | killed | internal
    stdout: str
    stderr: str
    exit_code: int | None  # negative: killed by that signal
    wall_s: float
    cpu_s: float
    feedback: str  # what the model sees; see the module docstring


def _internal(err):
    return Result("internal", "", "", None, 0.0, 0.0, f"Sandbox error: {err}")


# ----------------------------------------------------------------------------- inside the child
def _confine(iso, cfg, workdir, strict=True):
    """Apply every protection `iso` says works (we are root in a fresh fork, pid-ns init if any).
    strict=False is the startup probe: a refused step is recorded in iso instead of raised."""
    def step(name, fn):
        if iso[name]:
            try:
                fn()
            except OSError:
                if strict:
                    raise
                iso[name] = False

    os.setsid()  # own session and group: no controlling tty; kill(0)/killpg stay inside
    step("net_namespace", lambda: _unshare(CLONE_NEWNET))
    step("ipc_namespace", lambda: _unshare(CLONE_NEWIPC))  # SysV shm would outlive the snippet

    def private_tmp():  # tmpfs cwd: sized, owned by the snippet, freed with the namespace
        _unshare(CLONE_NEWNS)
        owner = f",uid={_UID},gid={_UID}" if iso["uid_drop"] else ""
        _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['disk_mb']}m,mode=0700{owner}")
        _mount("/tmp", "/dev/shm", None, MS_BIND)  # POSIX shm/semaphores (multiprocessing) land here
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # only our own pids
    step("mount_namespace", private_tmp)
    os.chdir("/tmp" if iso["mount_namespace"] else workdir)
    mb, cpu = cfg["memory_mb"] << 20, int(cfg["timeout"]) + 2  # the wall clock normally fires first
    for lim, val in ((resource.RLIMIT_AS, mb), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_CORE, 0),
                     (resource.RLIMIT_FSIZE, cfg["disk_mb"] << 20), (resource.RLIMIT_NOFILE, NOFILE),
                     (resource.RLIMIT_NPROC, NPROC)):  # NPROC binds only once we are not root
        resource.setrlimit(lim, (val, val + (lim == resource.RLIMIT_CPU)))  # SIGXCPU, then SIGKILL

    def drop_uid():
        os.setgroups([])
        os.setgid(_UID)
        os.setuid(_UID)
        _check(_libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl")  # our own /proc/self stays ours
    step("uid_drop", drop_uid)
    step("no_new_privs", lambda: _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl"))
    # After the uid change, which clears it: die with the worker, whatever happens to it.
    step("parent_death_signal", lambda: _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL), "prctl"))


def _execute(code, main):
    """Run `code` as `python file.py` would, in module `main`; returns the exit code."""
    sys.stdin = sys.__stdin__ = open(0, closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", errors="backslashreplace",
                                       buffering=1, closefd=False)  # a kill keeps what was printed
    sys.stderr = sys.__stderr__ = open(2, "w", encoding="utf-8", errors="backslashreplace",
                                       buffering=1, closefd=False)
    sys.argv, sys.modules["__main__"] = ["<code>"], main
    if "numpy" in sys.modules:  # a forked RNG would repeat itself in every snippet
        sys.modules["numpy"].random.seed()
    linecache.cache["<code>"] = (len(code), None, code.splitlines(True), "<code>")  # tracebacks show lines
    try:
        exec(compile(code, "<code>", "exec"), main.__dict__)
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else int(e.code is not None)
        if not isinstance(e.code, int | None):
            print(e.code, file=sys.stderr)
    except BaseException as e:  # noqa: BLE001 - the snippet's exception becomes its feedback
        try:
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        except BaseException:  # noqa: BLE001 - an exception whose __str__ raises
            print(type(e).__name__, file=sys.stderr)
        rc = 1
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except BaseException:  # noqa: BLE001
            pass
    return rc & 0xFF


def _cpu():
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def _hold(sock, main):
    """Session holder loop. Each cell forks; a cell that succeeds becomes the holder (it owns the
    new state), a failed one exits and the holder that forked it carries on with the old state.
    Everything here is untrusted (earlier cells ran in this process): the worker only believes
    the kernel-stamped sender pid, and the cell's own output pipes."""
    while True:
        code, anc, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(8))
        if not code:
            os._exit(0)
        fds = [fd for _, kind, data in anc if kind == socket.SCM_RIGHTS for fd in array.array("i", data)]
        pid = os.fork()
        if pid == 0:
            os.dup2(fds[0], 1), os.dup2(fds[1], 2)
            for fd in fds:
                os.close(fd)
            sock.send(b"pid")  # SO_PASSCRED: the worker learns our real pid to kill just this cell
            rc = _execute(code.decode(errors="replace"), main)
            if rc:
                os._exit(rc)
            null = os.open(os.devnull, os.O_WRONLY)  # release the pipes: the worker sees EOF
            os.dup2(null, 1), os.dup2(null, 2), os.close(null)
            sock.send(b"ok %f" % _cpu())
            continue
        for fd in fds:
            os.close(fd)
        _, status, ru = os.wait4(pid, 0)
        sock.send(b"exit %d %f" % (os.waitstatus_to_exitcode(status), ru.ru_utime + ru.ru_stime))


# ----------------------------------------------------------------------------- the worker (root, trusted)
class _Capture:
    """One output stream: keeps its head and tail, dropping the middle of a flood as it arrives."""

    def __init__(self, fd, n):
        self.fd, self.keep, self.buf, self.cut = fd, 8 * n + 64, bytearray(), 0

    def read(self):
        data = os.read(self.fd, 1 << 16)
        self.buf += data
        if len(self.buf) > self.keep:
            drop, h = len(self.buf) - self.keep, self.keep // 2
            del self.buf[h:h + drop]
            self.cut += drop
        return len(data)

    def text(self, n):
        if not self.cut:
            return _cap(self.buf.decode("utf-8", "replace"), n)
        h = self.keep // 2
        return _cap(self.buf[:h].decode("utf-8", "replace"), n, self.buf[h:].decode("utf-8", "replace"))


def _cap(s, n, tail=None):
    """First and last n/2 characters with a marker between (the official code keeps 200 + 200)."""
    if tail is None:
        if len(s) <= n:
            return s
        tail = s
    return s[:n // 2] + MARK + tail[len(tail) - n // 2:]


def _watch(caps, events, deadline, on_event, max_bytes):
    """Drain all pipes at once (a flood on one never blocks the other) until every pipe is at EOF
    and on_event(fd) said the child is done; returns None, "timeout" or "output"."""
    poll, live, total, done = select.poll(), {c.fd: c for c in caps}, 0, False
    for fd in [*live, *events, _REQ_FD]:
        poll.register(fd, select.POLLIN)
    while live or not done:
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout"
        for fd, _ in poll.poll(left * 1000):
            if fd == _REQ_FD:  # the supervisor died: our children die with us (parent-death signal)
                os._exit(0)
            if fd not in live:
                if on_event(fd):
                    done = True
                    poll.unregister(fd)
                continue
            n = live[fd].read()
            total += n
            if not n:
                poll.unregister(fd)
                del live[fd]
            if total > max_bytes:
                return "output"
    return None


def _spawn(iso, cfg, fds, body, strict=True):
    """Fork a confined child with fds as its stdout, stderr (and fd 3); it runs body()."""
    workdir = None
    if not iso["mount_namespace"]:  # degraded: a plain temp dir, removed by the caller
        workdir = tempfile.mkdtemp(prefix="retool-sb-")
        if iso["uid_drop"]:
            os.chown(workdir, _UID, _UID)
    if iso["pid_namespace"]:
        _unshare(CLONE_NEWPID)  # our next child is init of a fresh PID namespace
    pid = os.fork()
    if pid == 0:
        try:
            for i, fd in enumerate((_NULL, *fds)):
                os.dup2(fd, i)
            os.closerange(len(fds) + 1, 1 << 16)
            _confine(iso, cfg, workdir, strict)
            body()
        except BaseException as e:  # noqa: BLE001
            os.write(2, f"\nSandboxError: confinement failed: {e!r}\n".encode())
        os._exit(INTERNAL)
    if iso["pid_namespace"]:
        _check(_libc.setns(_PIDNS_FD, CLONE_NEWPID), "setns")  # later forks of ours: our namespace again
    return pid, workdir


def _kill(pid):
    """SIGKILL a child of ours (not yet reaped, so its pid and group id cannot be reused) and its group."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _finish(why, code, out, err, wall, cpu, cfg):
    n = cfg["max_output"]
    stdout, stderr = out.text(n), err.text(n)
    last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
    if why == "timeout" or code == -signal.SIGXCPU:
        status, msg = "timeout", f"Timeout Error: the code ran longer than {cfg['timeout']:g} s"
    elif why == "output":
        status, msg = "killed", f"Killed: output exceeded {cfg['max_bytes']} bytes"
    elif code < 0:
        status, msg = "killed", f"Killed by signal {signal.Signals(-code).name}"
    elif code == 0:
        status, msg = "ok", ""
    elif code == INTERNAL and last.startswith("SandboxError"):
        status, msg = "internal", last
    else:
        status = "memory" if re.search(r"MemoryError\b", last) else "error"
        msg = last or f"Exit code {code}"
    msg = _cap(msg, n // 2)
    feedback = stdout if status == "ok" else msg
    if status != "ok" and stdout:
        feedback = out.text(max(n - len(msg) - 1, 2)) + ("" if stdout.endswith("\n") else "\n") + msg
    return asdict(Result(status, stdout, stderr, code, round(wall, 4), round(cpu, 4), feedback))


def _pipes(cfg):
    (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe()
    return _Capture(out_r, cfg["max_output"]), _Capture(err_r, cfg["max_output"]), out_w, err_w


def _run(code, iso, cfg):
    out, err, out_w, err_w = _pipes(cfg)
    t0, main = time.monotonic(), types.ModuleType("__main__")
    try:
        pid, workdir = _spawn(iso, cfg, (out_w, err_w), lambda: os._exit(_execute(code, main)))
    finally:
        os.close(out_w), os.close(err_w)
    pidfd = os.pidfd_open(pid)
    try:
        # pidfd readable = the child exited; as pid-ns init it only does so once its tree is gone.
        # Without a pid ns its group goes then; a setsid'ed survivor holding a pipe means timeout.
        why = _watch([out, err], [pidfd], t0 + cfg["timeout"], lambda fd: _kill(pid) or True, cfg["max_bytes"])
        _kill(pid)
        _, status, ru = os.wait4(pid, 0)
    finally:
        for fd in (pidfd, out.fd, err.fd):
            os.close(fd)
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return _finish(why, os.waitstatus_to_exitcode(status), out, err, time.monotonic() - t0,
                   ru.ru_utime + ru.ru_stime, cfg)


def _cell(sess, code, iso, cfg):
    """Run one cell of this worker's session (started on first use); returns (session, result)."""
    if sess is None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # kernel stamps each sender's pid
        try:
            main = types.ModuleType("__main__")
            pid, workdir = _spawn(iso, cfg, (_NULL, _NULL, theirs.fileno()), lambda: _hold(socket.socket(fileno=3), main))
        finally:
            theirs.close()
        sess = (pid, ours, workdir)
    sock, state = sess[1], {"want": (b"ok", b"exit")}

    def on_msg(fd):
        msg, anc, _, _ = sock.recvmsg(64, socket.CMSG_SPACE(12))
        if not msg:
            raise OSError("the session holder died")
        word, *rest = msg.split()
        if word == b"pid":  # only the sender's own pid passes the kernel's check
            creds = [data for _, kind, data in anc if kind == socket.SCM_CREDENTIALS][0]
            state["pidfd"] = os.pidfd_open(struct.unpack("3i", creds)[0])
            return False
        if word not in state["want"]:
            return False
        state["end"] = (0 if word == b"ok" else int(rest[0]), float(rest[-1]))
        return True

    out, err, out_w, err_w = _pipes(cfg)
    t0 = time.monotonic()
    try:
        sock.sendmsg([code.encode(errors="replace")], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [out_w, err_w]))])
    finally:
        os.close(out_w), os.close(err_w)
    try:
        why = _watch([out, err], [sock.fileno()], t0 + cfg["timeout"], on_msg, cfg["max_bytes"])
        if why:  # kill just this cell; its parent (the previous holder) reports and carries on
            state["want"] = (b"exit",)  # the holder's report that the killed cell is gone
            if "pidfd" in state:
                signal.pidfd_send_signal(state["pidfd"], signal.SIGKILL)
            if "pidfd" not in state or _watch([], [sock.fileno()], time.monotonic() + 2, on_msg, 0):
                raise OSError("the session holder does not answer")
    except OSError as e:
        _end(sess)
        return None, _internal(f"{e}; the session was reset")
    finally:
        for fd in (out.fd, err.fd, state.get("pidfd")):
            if fd is not None:
                os.close(fd)
    code, cpu = state["end"]
    return sess, _finish(why, code, out, err, time.monotonic() - t0, cpu, cfg)


def _end(sess):
    pid, sock, workdir = sess
    sock.close()
    _kill(pid)  # pid-ns init: the whole session goes
    os.waitpid(pid, 0)
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)


def _worker(req_fd, resp_fd, iso, cfg):
    """Serve requests one at a time until the supervisor closes our pipe."""
    global _REQ_FD, _UID
    _REQ_FD, _UID, sess = req_fd, UID_BASE + os.getpid(), None
    while (req := _recv(req_fd)) is not None:
        kind, code = req
        try:
            if kind == "run":
                res = _run(code, iso, cfg)
            else:
                sess, res = _cell(sess, code, iso, cfg)
        except Exception as e:  # noqa: BLE001 - e.g. out of pids or fds: report, keep serving
            res = asdict(_internal(repr(e)))
        _send(resp_fd, res)
    if sess:
        _end(sess)
    os._exit(0)


# ----------------------------------------------------------------------------- the zygote
def _prepare_root():
    """Once, in the zygote: a private mount namespace where the whole tree is read-only and nosuid
    (snippets write only to their own tmpfs /tmp). Python may live in a private dir (pyenv under
    /root, mode 700) that nobody cannot enter: mask that dir with an empty tmpfs and bind back just
    the Python directories, read-only."""
    dirs = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, *sys.path) if os.path.isdir(p)})
    hidden = {}  # python dir -> its first ancestor that others cannot traverse
    for p in dirs:
        parts = p.split("/")
        for i in range(2, len(parts)):
            a = "/".join(parts[:i])
            if not os.stat(a).st_mode & 0o001 and not any(p.startswith(q + "/") for q in hidden):
                hidden[p] = a
                break
    _unshare(CLONE_NEWNS)
    keep = {p: os.open(p, os.O_PATH) for p in hidden}  # still reachable after the mask
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    attr = ctypes.create_string_buffer(struct.pack("QQQQ", MS_RDONLY | MS_NOSUID, 0, 0, 0))  # MOUNT_ATTR_*
    _check(_libc.syscall(442, -100, b"/", 0x8000, attr, 32), "mount_setattr")  # AT_RECURSIVE
    for a in sorted(set(hidden.values())):
        _mount("tmpfs", a, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for p, fd in keep.items():
        os.makedirs(p, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
        os.close(fd)


def _probe(cfg):
    """Which protections does this kernel grant us? Try each, in a real confined child."""
    iso = dict.fromkeys(ISOLATION, True)
    iso["uid_drop"] = os.geteuid() == 0
    for name, fn in (("mount_namespace", _prepare_root),
                     ("pid_namespace", lambda: (_unshare(CLONE_NEWPID), _check(_libc.setns(_PIDNS_FD, CLONE_NEWPID), "setns")))):
        try:
            fn()
        except OSError:
            iso[name] = False
    r, w = os.pipe()
    pid, workdir = _spawn(iso, cfg, (w, w), lambda: os._exit(os.write(1, json.dumps(iso).encode()) * 0), strict=False)
    os.close(w)
    with open(r, "rb") as f:
        report = f.read()
    os.waitpid(pid, 0)
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return json.loads(report)


def _zygote(cfg, ctl_fd):
    """Import the math stack once, probe, then fork a worker for each pair of pipes we are sent."""
    global _NULL, _PIDNS_FD
    ctl = socket.socket(fileno=ctl_fd)
    _NULL, _PIDNS_FD = os.open(os.devnull, os.O_RDWR), os.open("/proc/self/ns/pid", os.O_RDONLY)
    missing = []
    for name in cfg["preload"]:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - reported to the supervisor, which warns
            missing.append(name)
    iso = _probe(cfg)
    gc.freeze()  # forked children then never touch (copy) the zygote's objects during collection
    ctl.send(json.dumps({"isolation": iso, "missing": missing}).encode())
    while True:
        msg, anc, _, _ = ctl.recvmsg(16, socket.CMSG_SPACE(8))
        if not msg:
            os._exit(0)  # the supervisor is gone; each worker notices on its own pipe
        fds = [fd for _, kind, data in anc if kind == socket.SCM_RIGHTS for fd in array.array("i", data)]
        if os.fork() == 0:
            ctl.close()
            _worker(*fds, iso, cfg)
        for fd in fds:
            os.close(fd)
        while True:  # reap finished workers
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


ISOLATION = ("new_session", "empty_env", "rlimits", "pid_namespace", "net_namespace", "ipc_namespace",
             "mount_namespace", "uid_drop", "no_new_privs", "parent_death_signal")
_REQ_FD = _NULL = _PIDNS_FD = -1  # set in the zygote / worker
_UID = 65534  # nobody, for the zygote's probe; each worker has its own


# ----------------------------------------------------------------------------- the supervisor
def _send(fd, obj):
    data = memoryview(struct.pack("<Q", len(b := pickle.dumps(obj))) + b)
    while data:
        data = data[os.write(fd, data):]


def _read(fd, n):
    buf = b""
    while len(buf) < n:
        if not (chunk := os.read(fd, n - len(buf))):
            return None
        buf += chunk
    return buf


def _recv(fd, timeout=None):
    """One framed message; None on EOF; TimeoutError when nothing starts to come in time."""
    if timeout is not None and not select.select([fd], [], [], timeout)[0]:
        raise TimeoutError(f"no answer from the sandbox worker in {timeout:g} s")
    head = _read(fd, 8)
    body = head and _read(fd, struct.unpack("<Q", head)[0])
    return None if body is None else pickle.loads(body)


_WARNED = set()


class Sandbox:
    """Run untrusted snippets; thread-safe; never raises from run/run_many for what a snippet does."""

    def __init__(self, timeout=5.0, memory_mb=1024, max_output=1000, workers=None, preload=PRELOAD,
                 max_bytes=1 << 22, disk_mb=64):
        self.cfg = dict(timeout=float(timeout), memory_mb=int(memory_mb), max_output=int(max_output),
                        preload=list(preload), max_bytes=int(max_bytes), disk_mb=int(disk_mb))
        self.workers = max(1, workers or os.cpu_count() or 1)
        self._lock, self._idle, self._all = threading.Lock(), queue.SimpleQueue(), []
        self._start()
        for _ in range(self.workers):
            self._idle.put(self._new_worker())
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox")

    def _start(self):
        """Start the zygote: a fresh interpreter (never a fork of a caller that may run threads)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._proc = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), "--zygote", json.dumps(self.cfg), str(theirs.fileno())],
            pass_fds=[theirs.fileno()], env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            start_new_session=True)  # a ^C meant for the trainer does not reach it
        theirs.close()
        ours.settimeout(300)
        hello = ours.recv(1 << 16)
        ours.settimeout(None)
        if not hello:
            raise RuntimeError("the sandbox zygote failed to start (its error is printed above)")
        self._ctl, hello = ours, json.loads(hello)
        self.isolation = hello["isolation"]
        for what in [k for k, v in self.isolation.items() if not v] + [f"preload:{m}" for m in hello["missing"]]:
            if what not in _WARNED:
                _WARNED.add(what)
                warnings.warn(f"sandbox: {what} is not available here; running without it", RuntimeWarning, 2)

    def _new_worker(self, worker=None):
        """A worker is a fork of the zygote serving one request pipe and one reply pipe."""
        (req_r, req_w), (resp_r, resp_w) = os.pipe(), os.pipe()
        try:
            with self._lock:
                if self._proc.poll() is not None:  # the zygote died: start a new one
                    self._ctl.close()
                    self._start()
                self._ctl.sendmsg([b"w"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [req_r, resp_w]))])
        finally:
            os.close(req_r), os.close(resp_w)
        if worker is None:
            self._all.append(worker := [])
        worker[:] = [req_w, resp_r]
        return worker

    def _call(self, worker, request):
        try:
            if (reply := _send(worker[0], request) or _recv(worker[1], self.cfg["timeout"] + 60)) is None:
                raise EOFError("the sandbox worker died")
            return Result(**reply)
        except Exception as e:  # noqa: BLE001 - the machinery failed, not the snippet
            _close(worker)  # a hung worker sees EOF and exits, killing its child
            try:
                self._new_worker(worker)  # in place: the idle queue or session keeps a live one
            except Exception:  # noqa: BLE001 - retried on the next call
                pass
            return _internal(repr(e))

    def run(self, code):
        worker = self._idle.get()
        try:
            return self._call(worker, ("run", code))
        finally:
            self._idle.put(worker)

    def run_many(self, codes):
        """Run concurrently on `workers` workers; results in input order."""
        return list(self._pool.map(self.run, codes))

    def session(self):
        return Session(self)

    def close(self):
        self._pool.shutdown(wait=False)
        for worker in self._all:
            _close(worker)  # each worker kills its child and exits
        self._ctl.close()  # then the zygote exits
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Session:
    """Stateful cells on a dedicated worker; sessions never share state."""

    def __init__(self, sandbox):
        self._sb, self._lock = sandbox, threading.Lock()
        self._worker = sandbox._new_worker()

    def run(self, code):
        with self._lock:
            return self._sb._call(self._worker, ("cell", code))

    def close(self):
        _close(self._worker)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _close(worker):
    for fd in worker:
        if fd >= 0:
            os.close(fd)
    worker[:] = [-1, -1]


# ----------------------------------------------------------------------------- CLI
if __name__ == "__main__" and sys.argv[1:2] == ["--zygote"]:
    _zygote(json.loads(sys.argv[2]), int(sys.argv[3]))
elif __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Run a Python file (or stdin) in the sandbox; print the Result as JSON.")
    ap.add_argument("file", nargs="?", help="code file (default: stdin)")
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--memory-mb", type=int, default=1024)
    ap.add_argument("--max-output", type=int, default=1000)
    args = ap.parse_args()
    try:
        src = open(args.file, encoding="utf-8", errors="replace").read() if args.file else sys.stdin.read()
    except OSError as e:
        print(f"sandbox.py: cannot read {args.file}: {e.strerror}", file=sys.stderr)
        sys.exit(2)
    with Sandbox(args.timeout, args.memory_mb, args.max_output, workers=1) as sb:
        print(json.dumps(asdict(sb.run(src)), ensure_ascii=False, indent=1))
