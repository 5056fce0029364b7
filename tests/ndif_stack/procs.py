"""Process bookkeeping for the local NDIF stack (stdlib only, Linux ``/proc``).

Which processes belong to a stack, so that tearing it down stops exactly what it started and nothing else:

* every service is started as the leader of its own session (``start_new_session=True``), and its pid and start
  time are recorded in the state file;
* a process belongs to the stack if its *session id* is one of those leaders' (Ray's daemons and workers, gunicorn's
  workers and the dispatcher stay in their service's session; Ray workers only change their process group), or if
  it descends from such a process (postgres' backends call ``setsid``), or if its environment carries the stack's
  marker ``NSLENS_NDIF_STACK=<uuid>`` (processes that rewrite their title, e.g. redis, lose that, hence all three).

Linux keeps a pid number reserved while any live process uses it as a session id, so a session id cannot be
reused while a member of the old session lives; a recorded leader whose pid now belongs to a process with another
start time is skipped all the same, and a state file from an earlier boot matches nothing.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass

MARKER_VAR = "NSLENS_NDIF_STACK"

# A child that runs this execs the real command with PR_SET_PDEATHSIG=SIGKILL (after dropping privileges when
# asked to), so it dies with the process that started it (the pytest process), whatever killed that.
LAUNCHER = (
    "import ctypes, os, sys\n"
    "uid = int(os.environ.pop('NSLENS_NDIF_SETUID', '-1'))\n"
    "if uid >= 0:\n"
    "    import pwd\n"
    "    pw = pwd.getpwuid(uid)\n"
    "    os.setgroups([]); os.setgid(pw.pw_gid); os.setuid(uid)\n"
    "    os.environ['HOME'] = pw.pw_dir; os.environ['USER'] = pw.pw_name\n"
    "if os.environ.pop('NSLENS_NDIF_PDEATHSIG', '') == '1':\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL\n"
    "    if os.getppid() != int(os.environ.get('NSLENS_NDIF_PARENT', '0')):\n"
    "        sys.exit(70)  # the parent is already gone\n"
    "os.environ.pop('NSLENS_NDIF_PARENT', None)\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    sid: int
    start: int  # clock ticks since boot
    state: str
    name: str


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def proc_info(pid: int) -> ProcInfo | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    # comm is in parentheses and may contain spaces or parentheses: split at the last ')'.
    lpar, rpar = data.index("("), data.rindex(")")
    fields = data[rpar + 2:].split()
    return ProcInfo(pid=pid, name=data[lpar + 1:rpar], state=fields[0], ppid=int(fields[1]), pgid=int(fields[2]),
                    sid=int(fields[3]), start=int(fields[19]))


def start_ticks(pid: int) -> int | None:
    info = proc_info(pid)
    return info.start if info else None


def alive(pid: int, start: int | None = None) -> bool:
    """Whether ``pid`` is a live (non-zombie) process, with that start time when one is given."""
    info = proc_info(pid)
    if info is None or info.state in ("Z", "X"):
        return False
    return start is None or info.start == start


def _has_marker(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read().split(b"\0")
    except OSError:
        return False


def all_procs() -> dict[int, ProcInfo]:
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = proc_info(int(entry))
            if info is not None:
                procs[info.pid] = info
    return procs


def stack_processes(stack_id: str, leaders: Iterable[tuple[int, int]], extra: Iterable[tuple[int, int]] = (),
                    exclude: Iterable[int] = (), zombies: bool = False) -> dict[int, ProcInfo]:
    """The live processes of the stack ``stack_id``: see the module docstring. ``leaders`` and ``extra`` are
    ``(pid, start_ticks)`` pairs from the state file (service session leaders, and a snapshot of the stack's
    processes taken when it came up). ``zombies``: include exited processes not yet reaped."""
    procs = all_procs()
    dead = ("X",) if zombies else ("Z", "X")
    skip = set(exclude) | {os.getpid()}
    marker = f"{MARKER_VAR}={stack_id}".encode()
    sessions = {}
    for pid, start in leaders:
        current = procs.get(pid)
        if current is None or current.start == start:  # the number is not reused by someone else
            sessions[pid] = start
    found: dict[int, ProcInfo] = {}
    for info in procs.values():
        if info.pid in skip or info.state in dead:
            continue
        in_session = info.sid in sessions and info.start >= sessions[info.sid]
        if in_session or _has_marker(info.pid, marker):
            found[info.pid] = info
    for pid, start in extra:
        info = procs.get(pid)
        if info is not None and info.start == start and pid not in skip and info.state not in dead:
            found[pid] = info
    # Descendants (e.g. postgres backends, which start their own sessions).
    children: dict[int, list[ProcInfo]] = {}
    for info in procs.values():
        children.setdefault(info.ppid, []).append(info)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child.pid not in found and child.pid not in skip and child.state not in dead:
                found[child.pid] = child
                todo.append(child.pid)
    return found


def signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def terminate(find, grace: float = 2.0, timeout: float = 15.0) -> list[ProcInfo]:
    """Stop every process ``find()`` returns: SIGCONT + SIGTERM, then SIGKILL after ``grace`` seconds (re-finding
    each round, so what a dying service spawns is caught too). Returns whatever is still alive after ``timeout``
    (nothing, normally)."""
    procs = find()
    signal_pids(procs, signal.SIGCONT)  # a stopped (paused) process only handles SIGTERM once continued
    signal_pids(procs, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while procs and time.monotonic() < deadline:
        time.sleep(0.1)
        procs = find()
    end = time.monotonic() + timeout
    while procs and time.monotonic() < end:
        signal_pids(procs, signal.SIGKILL)
        time.sleep(0.1)
        procs = find()
    return list(procs.values())


def free_port_block(size: int, low: int = 20000, high: int = 30000, attempts: int = 200) -> int:
    """The first port of ``size`` consecutive ports that are free on loopback and on all interfaces."""
    import random

    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(attempts):
        base = rng.randrange(low, high - size)
        if all(_port_free(p) for p in range(base, base + size)):
            return base
    raise RuntimeError(f"no block of {size} free ports in [{low}, {high})")


def _port_free(port: int) -> bool:
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def redis_command(port: int, *args: str, host: str = "127.0.0.1", timeout: float = 10.0) -> bytes:
    """One Redis command in the protocol's own framing (the test process has no Redis client); returns the reply's
    first line, e.g. ``b":1"`` for a DEL that removed one key."""
    parts = [a.encode() for a in args]
    msg = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in parts)
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(msg)
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    if reply.startswith(b"-"):
        raise OSError(f"Redis refused {args[0]}: {reply.decode(errors='replace').strip()}")
    return reply.strip()


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
