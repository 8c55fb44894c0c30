"""A fast, really isolating code interpreter for ReTool rollouts (standard library only).

A warm zygote (fresh interpreter, fixed secret-free env, math stack imported with BLAS threads at 1,
SysV IPC off, whole filesystem read-only) forks a worker per slot: own network namespace with no
interface up, own tmpfs /tmp wiped after each snippet, a /proc hiding others. Per snippet a worker
forks a child: init of a new PID namespace (its whole tree dies with it), new session, rlimits, the
worker's own uid, no_new_privs, SIGKILL on parent death. `Sandbox.isolation` says what is active.

Result.feedback is what the model reads in <interpreter> (~max_output chars, head + tail): ok: stdout;
error (memory for a MemoryError): stdout so far + the last stderr line, i.e. the exception; timeout:
stdout so far + "Timeout Error: ..."; killed: stdout so far + "Killed: ..." (a signal or the output
ceiling); internal: "Sandbox error: ..." (the machinery failed: run() never raises). Sessions: a
holder process keeps the state; a cell runs in a fork of it and, if it succeeds, becomes the holder,
else dies (rollback). Files in /tmp are not rolled back.
"""
import array, contextlib, ctypes, gc, importlib, json, linecache, os, pickle, queue, re, resource, select  # noqa: E401
import shutil, signal, socket, struct, subprocess, sys, threading, time, traceback, types, warnings  # noqa: E401
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

PRELOAD = ("math", "fractions", "itertools", "numpy", "sympy")
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "USER": "sandbox", "LANG": "C.UTF-8",
       **dict.fromkeys(("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"), "1")}
UID_BASE = 1 << 20  # + the worker's pid: a uid per worker, so no NPROC count or signal crosses workers
NPROC, NOFILE = 128, 256  # processes+threads per worker uid; open files per process
MARK, INTERNAL = "\n[... output truncated ...]\n", 254  # INTERNAL: exit code when confinement failed
ISOLATION = ("new_session", "empty_env", "rlimits", "pid_namespace", "net_namespace", "ipc_namespace",
             "mount_namespace", "uid_drop", "no_new_privs", "parent_death_signal")
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x08000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 0x1000, 0x4000, 0x40000
_libc = ctypes.CDLL(None, use_errno=True)
_REQ, _NULL, _PIDNS_FD, _UID = None, -1, -1, 65534  # set in the zygote / its workers (nobody: the probe)


def _check(ret, what):
    if ret != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def _unshare(flags):  # Python 3.11 has no os.unshare
    _check(_libc.unshare(flags), "unshare")


def _mount(src, dst, fstype, flags, data=None):
    b = lambda s: s.encode() if isinstance(s, str) else s  # noqa: E731
    _check(_libc.mount(b(src), b(dst), b(fstype), flags, b(data)), f"mount {dst}")


def _step(iso, name, fn, strict):
    """Apply a protection iso says works; the startup probe (strict=False) records refusals instead."""
    try:
        iso[name] and fn()
    except OSError:
        if strict:
            raise
        iso[name] = False


def _close(*fds):
    for fd in fds:
        if fd is not None:
            os.close(fd)


def _rights(*fds):  # file descriptors to send over a unix socket, and to receive them
    return socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds)


def _fds(anc):
    return [fd for _, kind, data in anc if kind == socket.SCM_RIGHTS for fd in array.array("i", data)]


@dataclass
class Result:
    status: str  # ok | error | memory | timeout | killed | internal
    stdout: str
    stderr: str
    exit_code: int | None  # negative: killed by that signal
    wall_s: float
    cpu_s: float
    feedback: str  # what the model sees (module docstring)


def _internal(err):
    return asdict(Result("internal", "", "", None, 0.0, 0.0, f"Sandbox error: {err}"))


# ----------------------------------------------------------------------------- confinement
def _private_ipc():  # zygote: SysV shm/semaphores/queues and mqueues outlive processes: allow none
    _unshare(CLONE_NEWIPC)
    for key in ("kernel/shmmni", "kernel/msgmni", "kernel/sem", "fs/mqueue/queues_max"):
        with open(f"/proc/sys/{key}", "w") as f:
            f.write("0 0 0 0" if key == "kernel/sem" else "0")


def _prepare_root():
    """Zygote: a private mount namespace, all read-only and nosuid. Python may live in a dir others
    cannot enter (pyenv under /root, mode 700): mask it with an empty tmpfs and bind Python back."""
    hidden = {}  # python dir -> its first ancestor others cannot traverse
    for p in {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)}:
        parts = p.split("/")
        if blocked := [a for a in ("/".join(parts[:i]) for i in range(2, len(parts))) if not os.stat(a).st_mode & 1]:
            hidden[p] = blocked[0]
    _unshare(CLONE_NEWNS)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here propagates to the host
    keep = {p: os.open(p, os.O_PATH) for p in hidden}  # opened in the new namespace, before the mask
    attr = ctypes.create_string_buffer(struct.pack("QQQQ", MS_RDONLY | MS_NOSUID, 0, 0, 0))  # = MOUNT_ATTR_*
    _check(_libc.syscall(442, -100, b"/", 0x8000, attr, 32), "mount_setattr")  # AT_FDCWD, AT_RECURSIVE
    for a in sorted(set(hidden.values())):
        _mount("tmpfs", a, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for p, fd in keep.items():
        os.makedirs(p, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
        os.close(fd)


def _worker_setup(iso, cfg, strict=True):
    """Worker, once: network namespace and work dir. Per-snippet ones would cost 6 ms; here they
    are as good, since a worker runs one snippet at a time, kills its tree and wipes the dir after."""
    _step(iso, "net_namespace", lambda: _unshare(CLONE_NEWNET), strict)
    owner = f",uid={_UID},gid={_UID}" if iso["uid_drop"] else ""

    def private_tmp():
        _unshare(CLONE_NEWNS)
        size = f"size={cfg['disk_mb']}m,nr_inodes=65536,mode=0700{owner}"
        _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, size)
        _mount("/tmp", "/dev/shm", None, MS_BIND)  # POSIX shm and semaphores (multiprocessing)
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
    _step(iso, "mount_namespace", private_tmp, strict)
    if iso["mount_namespace"]:
        return "/tmp"
    os.mkdir(workdir := f"/tmp/retool-sb-{os.getpid()}", 0o700)  # degraded: a dir in the host's /tmp
    iso["uid_drop"] and os.chown(workdir, _UID, _UID)
    return workdir


def _wipe(workdir):
    with os.scandir(workdir) as entries:  # as root: no chmod trick of the snippet stops this
        for e in entries:
            shutil.rmtree(e.path) if e.is_dir(follow_symlinks=False) else os.unlink(e.path)
    os.chmod(workdir, 0o700)


def _confine(iso, cfg, workdir, strict=True):
    """Snippet child, still root (and pid-ns init when granted): the per-process protections."""
    os.setsid()  # own session and group: no controlling tty, and kill(0)/killpg stay inside
    os.chdir(workdir)
    cpu = int(cfg["timeout"]) + 2  # the wall clock fires first unless threads burn several cores
    for lim, val in (("AS", cfg["memory_mb"] << 20), ("CPU", cpu), ("CORE", 0), ("FSIZE", cfg["disk_mb"] << 20),
                     ("NOFILE", NOFILE), ("NPROC", NPROC)):  # NPROC binds only once we are not root
        resource.setrlimit(getattr(resource, f"RLIMIT_{lim}"), (val, val + (lim == "CPU")))  # SIGXCPU, then SIGKILL

    def drop_uid():
        os.setgroups([]), os.setgid(_UID), os.setuid(_UID)
        _check(_libc.prctl(4, 1, 0, 0, 0), "prctl")  # PR_SET_DUMPABLE: /proc/self stays readable to us
    _step(iso, "uid_drop", drop_uid, strict)
    _step(iso, "no_new_privs", lambda: _check(_libc.prctl(38, 1, 0, 0, 0), "prctl"), strict)  # setuid bits inert
    # PR_SET_PDEATHSIG, after the uid change (which clears it): die with the worker, whatever kills it.
    _step(iso, "parent_death_signal", lambda: _check(_libc.prctl(1, signal.SIGKILL, 0, 0, 0), "prctl"), strict)


# ----------------------------------------------------------------------------- running code (in the child)
def _execute(code, main):
    """Run code as `python file.py` would, in module `main`; returns the exit code."""
    sys.stdin = sys.__stdin__ = open(0, closefd=False)
    std = [open(fd, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False) for fd in (1, 2)]
    (sys.stdout, sys.stderr), (sys.__stdout__, sys.__stderr__) = std, std  # line-buffered: a kill keeps prints
    sys.argv, sys.modules["__main__"] = ["<code>"], main
    if "numpy" in sys.modules:  # a forked RNG would repeat itself in every snippet
        sys.modules["numpy"].random.seed(int.from_bytes(os.urandom(4), "little"))
    linecache.cache["<code>"] = (len(code), None, code.splitlines(True), "<code>")  # tracebacks show lines
    rc = 1
    try:
        exec(compile(code, "<code>", "exec"), main.__dict__)
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else int(e.code is not None)
        isinstance(e.code, int | None) or print(e.code, file=std[1])
    except BaseException as e:  # noqa: BLE001 - the snippet's exception is its feedback: to our stderr,
        traceback.print_exception(type(e), e, e.__traceback__.tb_next, file=std[1])  # whatever sys.stderr is now
    for f in (sys.stdout, sys.stderr, *std):
        with contextlib.suppress(BaseException):  # the snippet may have closed or replaced them
            f.flush()
    return rc & 0xFF


def _hold(sock, main):
    """Session holder loop. Each cell forks; one that succeeds becomes the holder (it has the new
    state); a failed one exits and its parent carries on with the old. All of this is untrusted
    (earlier cells ran here): the worker believes only kernel-stamped pids and the pipes."""
    while True:
        code, anc = sock.recvmsg(1 << 20, socket.CMSG_SPACE(8))[:2]
        if not code:
            os._exit(0)
        fds = _fds(anc)
        if (pid := os.fork()) == 0:
            os.dup2(fds[0], 1), os.dup2(fds[1], 2), _close(*fds)
            sock.send(b"pid")  # SO_PASSCRED: the worker learns our real pid, to kill just this cell
            me, rc = os.getpid(), _execute(code.decode(errors="replace"), main)
            if rc or os.getpid() != me:  # failed, or a process the cell forked: not the new holder
                os._exit(rc)
            os.dup2(null := os.open(os.devnull, os.O_WRONLY), 1), os.dup2(null, 2), os.close(null)  # pipes: EOF
            ru = resource.getrusage(resource.RUSAGE_SELF)
            sock.send(b"ok 0 %f" % (ru.ru_utime + ru.ru_stime))
            continue
        _close(*fds)
        _, status, ru = os.wait4(pid, 0)
        sock.send(b"exit %d %f" % (os.waitstatus_to_exitcode(status), ru.ru_utime + ru.ru_stime))


# ----------------------------------------------------------------------------- the worker (root, trusted)
def _cap(s, n):
    """First and last n/2 characters with a marker between (the official code keeps 200 + 200)."""
    return s if len(s) <= n else s[:n // 2] + MARK + s[len(s) - n // 2:]


def _watch(bufs, events, deadline, on_event, max_bytes):
    """Drain all pipes {fd: bytearray} at once (a flood on one never blocks the other) until all are
    at EOF and on_event(fd) said the child is done. Returns None, "timeout" or "output"."""
    poll, live, done = select.poll(), dict(bufs), False
    for fd in (*live, *events, _REQ.fileno()):
        poll.register(fd, select.POLLIN)
    while live or not done:
        if (left := deadline - time.monotonic()) <= 0:
            return "timeout"
        for fd, _ in poll.poll(left * 1000):
            if fd == _REQ.fileno():  # the supervisor is gone: exit, our children die with us (pdeathsig)
                os._exit(0)
            if fd not in live:
                if on_event(fd):
                    done = True
                    poll.unregister(fd)
            elif data := os.read(fd, 1 << 16):
                live[fd] += data
                if sum(map(len, bufs.values())) > max_bytes:
                    return "output"
            else:
                poll.unregister(fd)
                del live[fd]
    return None


def _spawn(iso, cfg, workdir, fds, body):
    """Fork a confined child with fds as its stdout, stderr (and fd 3); it runs body()."""
    iso["pid_namespace"] and _unshare(CLONE_NEWPID)  # our next child is init of a new PID namespace
    try:
        if (pid := os.fork()) == 0:
            try:
                for i, fd in enumerate((_NULL, *fds)):
                    os.dup2(fd, i)
                os.closerange(len(fds) + 1, 1 << 16)
                _confine(iso, cfg, workdir)
                body()
            except BaseException as e:  # noqa: BLE001
                os.write(2, f"\nSandboxError: confinement failed: {e!r}\n".encode())
            os._exit(INTERNAL)
    finally:
        iso["pid_namespace"] and _setns_back()
    return pid


def _setns_back():  # our later forks: children in our own PID namespace again
    _check(_libc.setns(_PIDNS_FD, CLONE_NEWPID), "setns")


def _kill(pid):
    """SIGKILL a child of ours and its group (unreaped, so neither id can have been reused)."""
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(OSError):
            kill(pid, signal.SIGKILL)


def _finish(why, code, bufs, wall, cpu, cfg):
    n, (out, err) = cfg["max_output"], (b.decode("utf-8", "replace") for b in bufs.values())
    stdout, stderr = _cap(out, n), _cap(err, n)
    last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
    if why == "timeout" or code == -signal.SIGXCPU:
        status, msg = "timeout", f"Timeout Error: the code ran longer than {cfg['timeout']:g} s"
    elif why == "output":
        status, msg = "killed", f"Killed: output exceeded {cfg['max_bytes']} bytes"
    elif code < 0:
        status, msg = "killed", f"Killed by signal {signal.Signals(-code).name}"
    elif code == INTERNAL and last.startswith("SandboxError"):
        status, msg = "internal", last
    else:
        status = "ok" if code == 0 else "memory" if re.search(r"MemoryError\b", last) else "error"
        msg = "" if code == 0 else last or f"Exit code {code}"
    feedback = stdout if status == "ok" else _cap(msg, n // 2)
    if status != "ok" and stdout:
        feedback = _cap(out.rstrip("\n"), max(n - len(feedback) - 1, 2)) + "\n" + feedback
    return asdict(Result(status, stdout, stderr, code, round(wall, 4), round(cpu, 4), feedback))


def _run(code, iso, cfg, workdir):
    (out_r, out_w), (err_r, err_w), main, t0 = os.pipe(), os.pipe(), types.ModuleType("__main__"), time.monotonic()
    bufs, pid, pidfd = {out_r: bytearray(), err_r: bytearray()}, None, None
    try:
        pid = _spawn(iso, cfg, workdir, (out_w, err_w), lambda: os._exit(_execute(code, main)))
        _close(out_w, err_w)
        out_w = err_w = None
        pidfd = os.pidfd_open(pid)  # readable once the child exited: as pid-ns init, with its whole tree
        # Without a pid ns its group goes then; a setsid'ed survivor holding a pipe means timeout.
        why = _watch(bufs, [pidfd], t0 + cfg["timeout"], lambda fd: _kill(pid) or True, cfg["max_bytes"])
    finally:
        _close(out_w, err_w, out_r, err_r, pidfd)
        if pid:
            _kill(pid)
            _, status, ru = os.wait4(pid, 0)
    return _finish(why, os.waitstatus_to_exitcode(status), bufs, time.monotonic() - t0, ru.ru_utime + ru.ru_stime, cfg)


def _cell(sess, code, iso, cfg, workdir):
    """One cell of this worker's session (started on first use); returns (session, result)."""
    if sess is None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the kernel stamps each sender's pid
        main = types.ModuleType("__main__")
        try:
            sess = (_spawn(iso, cfg, workdir, (_NULL, _NULL, theirs.fileno()), lambda: _hold(socket.socket(fileno=3), main)),
                    ours)
        finally:
            theirs.close()
    sock, state = sess[1], {"want": (b"ok", b"exit")}

    def on_msg(fd):
        msg, anc, _, _ = sock.recvmsg(64, socket.CMSG_SPACE(12))
        if not msg:
            raise OSError("the session holder died")
        word, *rest = msg.split()
        if word == b"pid":  # a sender can only stamp its own pid; a quick cell may be gone already
            creds = [data for _, kind, data in anc if kind == socket.SCM_CREDENTIALS][0]
            with contextlib.suppress(ProcessLookupError):
                state["pidfd"] = os.pidfd_open(struct.unpack("3i", creds)[0])
        elif word in state["want"]:
            state["end"] = (int(rest[0]), float(rest[1]))
            return True

    (out_r, out_w), (err_r, err_w), t0 = os.pipe(), os.pipe(), time.monotonic()
    bufs = {out_r: bytearray(), err_r: bytearray()}
    try:
        try:
            sock.sendmsg([code.encode(errors="replace")], [_rights(out_w, err_w)])
        finally:
            _close(out_w, err_w)
        if why := _watch(bufs, [sock.fileno()], t0 + cfg["timeout"], on_msg, cfg["max_bytes"]):
            state["want"] = (b"exit",)  # kill just this cell; the holder that forked it reports, carries on
            with contextlib.suppress(KeyError, ProcessLookupError):  # (it may have ended meanwhile)
                signal.pidfd_send_signal(state["pidfd"], signal.SIGKILL)
            if _watch({}, [sock.fileno()], time.monotonic() + 5, on_msg, 0):
                raise OSError("the session holder does not answer")
    except (OSError, ValueError, LookupError) as e:  # a broken or lying holder: start afresh
        _end(sess)
        return None, _internal(f"{e!r}; the session was reset")
    finally:
        _close(out_r, err_r, state.get("pidfd"))
    rc, cpu = state["end"]
    return sess, _finish(why, rc, bufs, time.monotonic() - t0, cpu, cfg)


def _end(sess):
    sess[1].close()
    _kill(sess[0])  # pid-ns init: the whole session goes
    os.waitpid(sess[0], 0)


def _worker(req, resp, iso, cfg):
    """Serve one request at a time until the supervisor closes our pipe."""
    global _REQ, _UID
    _REQ, _UID, sess = req, UID_BASE + os.getpid(), None
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the zygote ignores it; we wait for our children
    workdir = _worker_setup(iso, cfg)
    while request := _recv(req):
        try:
            if request[0] == "run":
                res = _run(request[1], iso, cfg, workdir)
                _wipe(workdir)
            else:
                sess, res = _cell(sess, request[1], iso, cfg, workdir)
        except Exception as e:  # noqa: BLE001 - e.g. out of pids or fds: report, keep serving
            res = _internal(repr(e))
        _send(resp, res)
    sess and _end(sess)
    workdir == "/tmp" or shutil.rmtree(workdir, ignore_errors=True)
    os._exit(0)


# ----------------------------------------------------------------------------- the zygote
def _zygote(cfg, ctl_fd):
    """Import the math stack once, confine ourselves, probe, then fork a worker per pipe pair sent."""
    global _NULL, _PIDNS_FD
    ctl, missing = socket.socket(fileno=ctl_fd), []
    _NULL, _PIDNS_FD = os.open(os.devnull, os.O_RDWR), os.open("/proc/self/ns/pid", os.O_RDONLY)
    for name in cfg["preload"]:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - reported; the supervisor warns
            missing.append(name)
    if "numpy" in sys.modules:  # its first seed() costs 20 ms: pay it here, not in every snippet
        sys.modules["numpy"].random.seed(0)
    iso = dict.fromkeys(ISOLATION, True) | {"uid_drop": os.geteuid() == 0}
    _step(iso, "ipc_namespace", _private_ipc, False)
    _step(iso, "mount_namespace", _prepare_root, False)
    _step(iso, "pid_namespace", lambda: (_unshare(CLONE_NEWPID), _setns_back()), False)
    r, w = os.pipe()
    if (pid := os.fork()) == 0:  # probe the rest in a child set up like a worker and a snippet
        try:
            _confine(iso, cfg, _worker_setup(iso, cfg, strict=False), strict=False)
            os.write(w, json.dumps(iso).encode())
        finally:
            os._exit(0)
    os.close(w)
    with open(r, "rb") as f:
        iso = json.loads(f.read())
    os.waitpid(pid, 0)
    shutil.rmtree(f"/tmp/retool-sb-{pid}", ignore_errors=True)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # finished workers reap themselves
    gc.freeze()  # forked children then never copy the zygote's objects to collect them
    ctl.send(json.dumps({"isolation": iso, "missing": missing}).encode())
    while fds := _fds(ctl.recvmsg(16, socket.CMSG_SPACE(8))[1]):  # none: the supervisor is gone
        if os.fork() == 0:
            ctl.close()
            _worker(open(fds[0], "rb"), open(fds[1], "wb"), iso, cfg)
        _close(*fds)
        ctl.send(b"+")
    os._exit(0)  # each worker sees the supervisor go on its own pipe


# ----------------------------------------------------------------------------- the supervisor
def _send(f, obj):
    pickle.dump(obj, f)
    f.flush()


def _recv(f, timeout=None):
    """One message; None on EOF; TimeoutError when none starts in time."""
    if timeout is not None and not select.select([f], [], [], timeout)[0]:
        raise TimeoutError(f"no answer from the sandbox worker in {timeout:g} s")
    with contextlib.suppress(EOFError):
        return pickle.load(f)


class _Closing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_WARNED = set()


class Sandbox(_Closing):
    """Run untrusted snippets; thread-safe; run/run_many never raise for what a snippet does."""

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
        """The zygote is a fresh interpreter, never a fork of a caller that may run threads."""
        self._ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._proc = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), "--zygote", json.dumps(self.cfg), str(theirs.fileno())],
            pass_fds=[theirs.fileno()], env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            start_new_session=True)  # a ^C meant for the trainer does not reach it
        theirs.close()
        self._ctl.settimeout(300)
        if not (hello := self._ctl.recv(1 << 16)):
            raise RuntimeError("the sandbox zygote failed to start (its error is printed above)")
        self.isolation, missing = json.loads(hello).values()
        for what in {k for k, v in self.isolation.items() if not v} | {f"preload of {m}" for m in missing} - _WARNED:
            _WARNED.add(what)
            warnings.warn(f"sandbox: {what} refused here; running without it", RuntimeWarning, 3)

    def _new_worker(self, worker=None):
        """A worker: a fork of the zygote with a request pipe and a reply pipe (filled into `worker`)."""
        (req_r, req_w), (resp_r, resp_w) = os.pipe(), os.pipe()
        ours = [open(req_w, "wb"), open(resp_r, "rb")]  # closed when collected, should we fail below
        try:
            with self._lock:
                for _ in range(2):  # a zygote found dead (or dying) is replaced, once
                    if self._proc.poll() is not None:
                        self._ctl.close()
                        self._start()
                    with contextlib.suppress(OSError):
                        if self._ctl.sendmsg([b"w"], [_rights(req_r, resp_w)]) and self._ctl.recv(1):
                            break  # the zygote confirmed the fork
                    self._proc.kill()
                    self._proc.wait()
                else:
                    raise RuntimeError("the sandbox zygote cannot start a worker")
        finally:
            _close(req_r, resp_w)
        if worker is None:
            self._all.append(worker := [])
        worker[:] = ours
        return worker

    def _call(self, worker, request):
        try:
            _send(worker[0], request)
            if (reply := _recv(worker[1], self.cfg["timeout"] + 60)) is None:
                raise EOFError("the sandbox worker died")
            return Result(**reply)
        except Exception as e:  # noqa: BLE001 - the machinery failed, not the snippet
            _retire(worker)  # a hung worker sees EOF and exits, and its child with it
            with contextlib.suppress(Exception):  # else retried on the next call
                self._new_worker(worker)  # in place: the idle queue or the session keeps a live one
            return Result(**_internal(repr(e)))

    def run(self, code):
        worker = self._idle.get()
        try:
            return self._call(worker, ("run", code))
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
            _retire(worker)  # each worker kills its child and exits
        self._ctl.close()  # then the zygote exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(10)
        self._proc.kill()  # a no-op once it exited


class Session(_Closing):
    """Stateful cells on a worker of its own: sessions never share state."""

    def __init__(self, sandbox):
        self._sb, self._lock, self._worker = sandbox, threading.Lock(), sandbox._new_worker()

    def run(self, code):
        with self._lock:
            return self._sb._call(self._worker, ("cell", code))

    def close(self):
        _retire(self._worker)


def _retire(worker):
    for f in worker:
        with contextlib.suppress(OSError):  # a dead worker's pipe: still closed
            f.close()


# ----------------------------------------------------------------------------- CLI
if __name__ == "__main__" and sys.argv[1:2] == ["--zygote"]:
    _zygote(json.loads(sys.argv[2]), int(sys.argv[3]))
elif __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Run a Python file (or stdin) in the sandbox; print the Result as JSON.")
    ap.add_argument("file", nargs="?", help="code file (default: stdin)")
    ap.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args()
    try:
        src = open(args.file, encoding="utf-8", errors="replace").read() if args.file else sys.stdin.read()
    except OSError as e:
        print(f"sandbox.py: cannot read {args.file}: {e.strerror}", file=sys.stderr)
        sys.exit(2)
    with Sandbox(args.timeout, workers=1) as sb:
        print(json.dumps(asdict(sb.run(src)), ensure_ascii=False, indent=1))
