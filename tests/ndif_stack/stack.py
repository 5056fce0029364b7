"""Start, describe and stop a real NDIF stack (ndif 0.1.2) on this machine. Stdlib only at import.

See ``tests/ndif_stack/README.md`` for the picture and every workaround; in short, ``start()``:

1. makes the server's virtual environment if it is missing (``ensure_venv``; ndif 0.1.2 declares Python >= 3.12),
2. starts Redis, Postgres (API keys), moto (S3) and a Ray head with a declared "GPU", then ndif's controller and
   its API (gunicorn), each the leader of its own session, logging under ``<state_dir>/logs/``,
3. deploys the embedded model and a random Llama with ``ndif deploy -f`` (CPU actor, explicit ``size_bytes`` and
   ``model_key``), and waits until both answer a real remote trace,
4. records every pid in ``<state_dir>/state.json``, so ``stop()`` (``make ndif-down``) stops exactly that.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from . import procs

PKG_DIR = Path(__file__).resolve().parent
REPO = PKG_DIR.parents[1]
SERVER_PATH = PKG_DIR / "server"
CACHE = Path(os.environ.get("NSLENS_NDIF_CACHE", REPO / ".cache" / "ndif"))
VENV = Path(os.environ.get("NSLENS_NDIF_VENV", CACHE / "venv"))
MODELS_DIR = CACHE / "models"
CLI_STATE_DIR = CACHE / "up"

NDIF = "ndif==0.1.2"
# ndif 0.1.2's Requires-Dist with its `api` and `ray` extras. Installed *without* --ignore-requires-python, so pip
# picks releases that support this Python; then ndif itself goes in with --no-deps --ignore-requires-python.
NDIF_DEPS = [
    "pydantic", "redis", "click", "python-dotenv", "pyyaml", "boto3",  # core
    "fastapi", "uvicorn[standard]", "gunicorn", "python-multipart",  # api
    "ray[default]", "transformers>=5.15.0", "accelerate", "numpy", "zstandard", "peft",  # ray
]
# Not ndif's, but what the stack uses: asyncpg for ndif's Postgres API-key auth, moto as the S3 store, psutil for
# ndif's resources script.
STACK_DEPS = ["asyncpg", "moto[server]", "psutil"]
# Pinned to the project's versions (torch first, on its own, so pip never reaches for the CUDA wheels).
PINNED_FROM_PROJECT = ("torch", "nnsight", "transformers")

CLIENT_THREADS_VAR = "NSLENS_NDIF_TORCH_THREADS"


class StackError(RuntimeError):
    """The stack could not be started or stopped; the message names the step and the log to read."""


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(f"    {line}" for line in text[-lines:])


def _say(progress, message: str) -> None:
    if progress is not None:
        progress(message)


# ---------------------------------------------------------------------------------------------- the server venv

def _project_pins() -> list[str]:
    """``name==version`` for every distribution of the running (project) environment, for use as constraints."""
    from importlib.metadata import distributions

    pins = {}
    for dist in distributions():
        name = dist.metadata["Name"]
        if not name or name.lower() == "nslens":
            continue
        pins[name.lower()] = f"{name}=={dist.version.split('+')[0]}"
    return sorted(pins.values())


def _venv_spec() -> dict:
    from importlib.metadata import version

    pinned = {name: version(name).split("+")[0] for name in PINNED_FROM_PROJECT}
    torch_spec = os.environ.get("TORCH_SPEC") or f"torch=={pinned['torch']}"
    return {"python": sys.version.split()[0], "torch": torch_spec, "ndif": NDIF,
            "deps": NDIF_DEPS + STACK_DEPS + [f"{n}=={v}" for n, v in pinned.items() if n != "torch"]}


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv(progress=None) -> Path:
    """Create the server's virtual environment at ``VENV`` if it is missing or out of date; return its python.

    Why a separate environment: ndif 0.1.2 declares ``Requires-Python >=3.12`` and pulls Ray, FastAPI, gunicorn,
    boto3 and some 40 other packages the project does not need; and the server must *not* be able to import nslens
    (the public NDIF cannot), which an install into the project venv (editable nslens) would allow. torch,
    transformers and nnsight are pinned to the project's versions so local and remote runs compute the same thing.
    """
    spec = _venv_spec()
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    marker = VENV / ".nslens-installed"
    if marker.exists() and marker.read_text().strip() == digest and venv_python().exists():
        return venv_python()
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".venv.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and marker.read_text().strip() == digest and venv_python().exists():
            return venv_python()
        log = CACHE / "venv-install.log"
        _say(progress, f"creating the NDIF server environment in {VENV} (once, a few minutes; log: {log})")
        shutil.rmtree(VENV, ignore_errors=True)
        constraints = CACHE / "venv-constraints.txt"
        constraints.write_text("\n".join(_project_pins()) + "\n")
        base = getattr(sys, "_base_executable", None) or sys.executable
        pip = [str(venv_python()), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        steps = [
            [base, "-m", "venv", str(VENV)],
            pip + [spec["torch"]],
            pip + ["-c", str(constraints)] + spec["deps"],
            pip + ["--no-deps", "--ignore-requires-python", spec["ndif"]],
            [str(venv_python()), "-m", "pip", "check"],
        ]
        with open(log, "w") as out:
            for step in steps:
                out.write(f"$ {' '.join(step)}\n")
                out.flush()
                rc = subprocess.call(step, stdout=out, stderr=subprocess.STDOUT, cwd=CACHE)
                if rc != 0:
                    raise StackError(f"creating the NDIF server environment failed at `{' '.join(step)}` "
                                     f"(exit {rc}); see {log}:\n{_log_tail(log)}")
        marker.write_text(digest + "\n")
    return venv_python()


# --------------------------------------------------------------------------------------------------- state file

def _read_state(state_dir: Path) -> dict | None:
    try:
        return json.loads((state_dir / "state.json").read_text())
    except (OSError, ValueError):
        return None


def _write_state(state_dir: Path, state: dict) -> None:
    tmp = state_dir / f".state.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, state_dir / "state.json")


@contextlib.contextmanager
def _state_lock(state_dir: Path):
    if not state_dir.exists():
        yield
        return
    with open(state_dir / ".state.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _others_can_reach(path: Path) -> bool:
    """Whether another user (postgres, when the tests run as root) can pass through every folder above ``path``."""
    return all(p.stat().st_mode & stat.S_IXOTH for p in path.resolve().parents)


def _pg_temp_dir(state_dir: Path) -> Path:
    # Postgres's data and socket folder when the state folder is out of its reach (and a short socket path)
    return Path("/tmp") / f"nslens-pg-{hashlib.sha256(str(state_dir).encode()).hexdigest()[:10]}"


def _ray_temp_dir(state_dir: Path) -> Path:
    # Ray puts unix sockets under its temp dir; their paths must stay under ~107 bytes, so not under the repo.
    return Path("/tmp") / f"nslens-ray-{hashlib.sha256(str(state_dir).encode()).hexdigest()[:10]}"


# ------------------------------------------------------------------------------------------------------ the stack

class Stack:
    """A running stack, as its state file describes it. ``start()`` returns one, ``load()`` finds one."""

    def __init__(self, state_dir: Path, state: dict) -> None:
        self.state_dir = Path(state_dir)
        self.state = state
        self._popen: dict[int, subprocess.Popen] = {}
        self._lock = threading.RLock()

    # -- what a client needs
    @property
    def host(self) -> str:
        return self.state["host"]

    @property
    def api_key(self) -> str | None:
        """The one valid API key, or None when the stack runs without auth (``auth=False``)."""
        return self.state.get("api_key")

    @property
    def auth(self) -> bool:
        return self.state.get("api_key") is not None

    @property
    def models(self) -> list[str]:
        """Model ids, the embedded model first; each is a checkpoint directory, loadable locally by that id."""
        return [m["id"] for m in self.state["models"]]

    @property
    def model_keys(self) -> dict[str, str]:
        return {m["id"]: m["model_key"] for m in self.state["models"]}

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def client_env(self) -> dict[str, str]:
        """Environment variables for a client process (e.g. an ``nslens`` CLI run in a subprocess)."""
        env = {"NDIF_HOST": self.host, "NDIF_MODELS": ",".join(self.models), "HF_HUB_OFFLINE": "1"}
        if self.api_key:
            env["NDIF_API_KEY"] = self.api_key
        return env

    def configured(self):
        """Context manager: nnsight's ``CONFIG.API.HOST``/``APIKEY`` (and ``NDIF_HOST``/``NDIF_API_KEY``) point at
        this stack and nnsight's id cache knows its models; everything is restored afterwards."""
        from .client import configured

        return configured(self.host, self.api_key, self.models)

    def remote_model(self, model_id: str, **kwargs):
        from .client import remote_model

        return remote_model(model_id, **kwargs)

    def backend(self, model, api_key: str | None = None, **kwargs):
        """A ``RemoteBackend`` for this stack (host and key given explicitly, ``api_key`` overriding the stack's;
        no global config touched)."""
        from .client import remote_backend

        return remote_backend(model, self.host, api_key or self.api_key, **kwargs)

    # -- processes
    def _leaders(self) -> list[tuple[int, int]]:
        return [tuple(x) for x in self.state.get("sessions", [])]

    def processes(self, zombies: bool = False) -> dict[int, procs.ProcInfo]:
        """Every live process of this stack (see ``procs.stack_processes``); with ``zombies``, also the exited
        ones nobody has reaped yet."""
        self.refresh()
        if self.state.get("boot_id") != procs.boot_id():
            return {}
        watchdog = self.state.get("watchdog") or {}
        return procs.stack_processes(self.state["stack_id"], self._leaders(),
                                     [tuple(x) for x in self.state.get("snapshot", [])],
                                     exclude=[watchdog.get("pid", -1)], zombies=zombies)

    def service_processes(self, name: str) -> dict[int, procs.ProcInfo]:
        """The live processes of one service (its session), e.g. ``"api"``: gunicorn's master, worker and
        ndif's queue dispatcher."""
        self.refresh()
        svc = self.state["services"].get(name)
        if not svc or not procs.alive(svc["pid"], svc["start"]):
            return {}
        return {pid: info for pid, info in procs.all_procs().items()
                if info.sid == svc["pid"] and info.state not in ("Z", "X")}

    def is_running(self) -> bool:
        self.refresh()
        return not self.state.get("stopped") and all(
            procs.alive(s["pid"], s["start"]) for s in self.state["services"].values())

    def memory(self) -> dict:
        """RSS and PSS (MiB) summed over the stack's processes, and per process."""
        rows, rss, pss = [], 0, 0
        for pid, info in sorted(self.processes().items()):
            r, p = _smaps(pid)
            rss, pss = rss + r, pss + p
            rows.append({"pid": pid, "name": info.name, "rss_mib": round(r / 1024, 1), "pss_mib": round(p / 1024, 1)})
        return {"rss_mib": round(rss / 1024, 1), "pss_mib": round(pss / 1024, 1), "processes": rows}

    def _save(self) -> None:
        """Write the state file, merged with what another process may have written meanwhile (e.g. a restarted
        API): sessions are the union, each service the most recently started."""
        with self._lock, _state_lock(self.state_dir):
            self._merge(_read_state(self.state_dir))
            _write_state(self.state_dir, self.state)

    def refresh(self) -> None:
        """Take in what another process recorded (e.g. a restarted API)."""
        with self._lock, _state_lock(self.state_dir):
            self._merge(_read_state(self.state_dir))

    def _merge(self, other: dict | None) -> None:
        if not other or other.get("stack_id") != self.state.get("stack_id"):
            return
        seen = {tuple(x) for x in self.state.get("sessions", [])}
        self.state["sessions"] = self.state.get("sessions", []) + [
            x for x in other.get("sessions", []) if tuple(x) not in seen]
        services = self.state.setdefault("services", {})
        for name, svc in other.get("services", {}).items():
            if name not in services or svc["start"] > services[name]["start"]:
                services[name] = svc
        for key in ("stopped", "watchdog"):
            if other.get(key) and not self.state.get(key):
                self.state[key] = other[key]

    def _spawn(self, name: str, cmd: list[str], env: dict, *, cwd: Path | None = None, uid: int | None = None,
               record: bool = True) -> subprocess.Popen:
        """Start ``cmd`` as the leader of a new session, logging to ``logs/<name>.log``, and record it."""
        log_path = self.log_dir / f"{name}.log"
        env = dict(env)
        # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so only from the main thread; the
        # watchdog covers a service (re)started from another thread.
        if self.state.get("tie_to_parent") and threading.current_thread() is threading.main_thread():
            env["NSLENS_NDIF_PDEATHSIG"] = "1"
            env["NSLENS_NDIF_PARENT"] = str(os.getpid())
        if uid is not None:
            env["NSLENS_NDIF_SETUID"] = str(uid)
        launcher = [sys.executable, "-c", procs.LAUNCHER]
        with open(log_path, "ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(launcher + cmd, env=env, cwd=str(cwd or self.state_dir), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        start = procs.start_ticks(proc.pid) or 0
        with self._lock:
            self._popen[proc.pid] = proc
            self.state.setdefault("sessions", []).append([proc.pid, start])
            if record:
                self.state["services"][name] = {"pid": proc.pid, "start": start, "log": str(log_path),
                                                "cmd": cmd, "cwd": str(cwd or self.state_dir), "uid": uid}
            self._save()
        return proc

    def _reap(self) -> None:
        for pid, proc in list(self._popen.items()):
            if proc.poll() is not None:
                self._popen.pop(pid, None)

    # -- faults (for the fault tests)
    def kill_api(self, sig: int = signal.SIGKILL, timeout: float = 15.0) -> list[int]:
        """Kill the API (gunicorn's master and worker and ndif's queue dispatcher) with ``sig``; returns the pids."""
        pids = list(self.service_processes("api"))
        procs.signal_pids(pids, sig)
        if sig != signal.SIGKILL:
            procs.signal_pids(pids, signal.SIGCONT)  # a paused API handles the signal once continued
        end = time.monotonic() + timeout
        while any(procs.alive(p) for p in pids) and time.monotonic() < end:
            self._reap()
            time.sleep(0.05)
        self._reap()
        if any(procs.alive(p) for p in pids):
            procs.signal_pids(pids, signal.SIGKILL)
        return pids

    def start_api(self, wait: bool = True, timeout: float = 180.0) -> None:
        """Start the API again (same port, same environment); with ``wait``, until it serves requests."""
        svc = self.state["services"]["api"]
        if procs.alive(svc["pid"], svc["start"]):
            raise StackError("the API is still running; kill_api() first")
        # A killed API leaves its dispatcher's "ray:connected" flag in Redis. The new dispatcher deletes it only
        # when it starts connecting to Ray, seconds after gunicorn listens, so until then /connected would answer
        # 200 from the dead one's flag and a request sent on that answer gets 503 "reconnecting" for ~10 s.
        procs.redis_command(self.state["ports"]["redis"], "DEL", "ray:connected")
        self._spawn("api", svc["cmd"], self.state["env"], cwd=Path(svc["cwd"]))
        if wait:
            self.wait_api(timeout)

    def restart_api(self, timeout: float = 180.0) -> None:
        self.kill_api()
        self.start_api(wait=True, timeout=timeout)

    def pause_api(self) -> list[int]:
        """SIGSTOP the API's processes: connections are accepted by the kernel but never answered (a hung
        server). ``resume_api()`` continues them."""
        pids = list(self.service_processes("api"))
        procs.signal_pids(pids, signal.SIGSTOP)
        return pids

    def resume_api(self) -> list[int]:
        pids = list(self.service_processes("api"))
        procs.signal_pids(pids, signal.SIGCONT)
        return pids

    @contextlib.contextmanager
    def api_paused(self):
        self.pause_api()
        try:
            yield
        finally:
            self.resume_api()

    def model_actor_pid(self, model_id: str) -> int | None:
        """The pid of the Ray actor serving ``model_id`` (its CPU actor writes it once the model is loaded)."""
        key = self.model_keys[model_id]
        path = self.state_dir / "actors" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        try:
            pid = int(json.loads(path.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None
        return pid if pid in self.processes() else None

    def kill_model_actor(self, model_id: str, sig: int = signal.SIGKILL) -> int:
        """Kill the model actor's process (Ray restarts it: ``max_restarts=-1``); returns the killed pid."""
        pid = self.model_actor_pid(model_id)
        if pid is None:
            raise StackError(f"no live model actor for {model_id}")
        os.kill(pid, sig)
        return pid

    def wait_model_actor(self, model_id: str, old_pid: int | None = None, timeout: float = 180.0) -> int:
        """Wait until a model actor other than ``old_pid`` has loaded ``model_id``; returns its pid."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pid = self.model_actor_pid(model_id)
            if pid is not None and pid != old_pid:
                return pid
            time.sleep(0.25)
        raise StackError(f"no model actor for {model_id} came back within {timeout:.0f} s; Ray's logs: "
                         f"{self.log_dir / 'ray'}")

    def wait_api(self, timeout: float = 180.0) -> None:
        """Wait until the API answers ``/connected`` (it is up and its dispatcher has reached Ray)."""
        _wait(lambda: _http_ok(self.host + "/connected"), timeout, "the API to reach Ray",
              self.log_dir / "api.log", self._api_dead)

    def wait_serving(self, timeout: float = 180.0) -> None:
        """Wait until the API's ``/status`` answers 200 (the controller reached and every deployment reported):
        after the fault tests kill the API or a model actor, ``/connected`` comes back before ``/status`` does,
        which answers 503 until the controller has its deployments again."""
        self.wait_api(timeout)
        _wait(lambda: _http_ok(self.host + "/status", timeout=60.0), timeout, "the API's status page",
              self.log_dir / "api.log", self._api_dead)

    def _api_dead(self) -> str | None:
        svc = self.state["services"].get("api")
        if svc and not procs.alive(svc["pid"], svc["start"]):
            return "the API process exited"
        return None

    def stop(self, grace: float = 2.0) -> list[procs.ProcInfo]:
        """Stop every process of the stack (see ``procs.terminate``); idempotent. Returns survivors (none)."""
        with self._lock:
            leftover = procs.terminate(self.processes, grace=grace) if not self.state.get("stopped") else []
            for proc in self._popen.values():
                with contextlib.suppress(Exception):
                    proc.wait(timeout=5)
            self._popen.clear()
            end = time.monotonic() + 5  # orphans are reaped by init: wait until they are gone from `ps` too
            while not leftover and self.processes(zombies=True) and time.monotonic() < end:
                time.sleep(0.1)
            watchdog = self.state.get("watchdog")
            if watchdog and watchdog.get("pid") != os.getpid() and procs.alive(watchdog["pid"], watchdog["start"]):
                procs.signal_pids([watchdog["pid"]], signal.SIGTERM)
            self.state["stopped"] = time.time()
            if self.state.get("pg_dir"):  # postgres's own folder outside the state folder
                shutil.rmtree(self.state["pg_dir"], ignore_errors=True)
            if self.state_dir.exists():
                self._save()
                (self.state_dir / "env").unlink(missing_ok=True)
            _LIVE.discard(self)
        if leftover:
            raise StackError("could not stop: " + ", ".join(f"{p.pid} ({p.name})" for p in leftover))
        return leftover

    def __repr__(self) -> str:
        return f"Stack(host={self.host!r}, models={self.models!r}, state_dir='{self.state_dir}')"


def _smaps(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def _http_ok(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _wait(ready, timeout: float, what: str, log: Path | None = None, dead=None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ready():
            return
        why = dead() if dead is not None else None
        if why:
            raise StackError(f"waiting for {what}: {why}; see {log}:\n{_log_tail(log) if log else ''}")
        time.sleep(0.25)
    raise StackError(f"timed out after {timeout:.0f} s waiting for {what}" +
                     (f"; see {log}:\n{_log_tail(log)}" if log else ""))


_LIVE: set[Stack] = set()


def load(state_dir: Path | str = CLI_STATE_DIR) -> Stack | None:
    """The stack recorded in ``state_dir``, whether or not it still runs (None if there is no state file)."""
    state = _read_state(Path(state_dir))
    return Stack(Path(state_dir), state) if state else None


def stop(state_dir: Path | str = CLI_STATE_DIR, progress=None) -> int:
    """Stop the stack recorded in ``state_dir`` (``make ndif-down``); returns how many processes were running."""
    stack = load(state_dir)
    if stack is None:
        _say(progress, f"no NDIF stack recorded in {state_dir}")
        return 0
    running = stack.processes() if not stack.state.get("stopped") else {}
    stack.stop()
    _say(progress, f"stopped the NDIF stack in {state_dir} ({len(running)} processes)")
    return len(running)


# ------------------------------------------------------------------------------------------------------ start-up

def _postgres_bin() -> Path | None:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3])
                        if p.parts[-3].isdigit() else 0)
    if candidates:
        return candidates[-1].parent
    found = shutil.which("postgres")
    return Path(found).parent if found else None


AUTH_SCHEMA = """
CREATE TABLE users (user_id uuid PRIMARY KEY, email text);
CREATE TABLE keys (key_id uuid PRIMARY KEY, user_id uuid REFERENCES users(user_id));
CREATE TABLE user_tags (user_tag_id serial PRIMARY KEY, name text UNIQUE NOT NULL);
CREATE TABLE key_user_tag_assignments (key_id uuid REFERENCES keys(key_id),
                                       user_tag_id integer REFERENCES user_tags(user_tag_id));
INSERT INTO users VALUES ('00000000-0000-4000-8000-000000000001', 'stack@nslens.test');
INSERT INTO user_tags (name) VALUES ('trusted');
"""


def add_api_key(stack: Stack, key: str | None = None, trusted: bool = True) -> str:
    """Add a valid API key to the stack's key database (ndif's schema); returns it."""
    key = key or str(uuid.uuid4())
    uuid.UUID(key)
    sql = f"INSERT INTO keys VALUES ('{key}', '00000000-0000-4000-8000-000000000001');"
    if trusted:
        sql += (f" INSERT INTO key_user_tag_assignments SELECT '{key}', user_tag_id FROM user_tags"
                " WHERE name = 'trusted';")
    _psql(stack, sql)
    return key


def _psql(stack: Stack, sql: str) -> None:
    pg = stack.state["postgres"]
    psql = Path(pg["bin"]) / "psql"
    cmd = [str(psql) if psql.exists() else "psql", "-h", "127.0.0.1", "-p", str(pg["port"]), "-U", "ndif",
           "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q", "-c", sql]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise StackError(f"psql failed: {out.stderr.strip()}")


def _server_env(state: dict, stack_id: str, state_dir: Path) -> dict:
    """The environment every server process gets: the caller's, minus anything that would point ndif, Ray, pip or
    Python elsewhere, plus the stack's configuration."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NDIF_", "RAY_", "PYTHON", "VIRTUAL_ENV", "CONDA", "PIP_", "NSLENS_NDIF_"))}
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    p = state["ports"]
    env.update({
        procs.MARKER_VAR: stack_id,
        "NSLENS_NDIF_STATE_DIR": str(state_dir),
        CLIENT_THREADS_VAR: str(state["torch_threads"]),
        # Only this directory, never the repository: the server cannot import nslens, like the public NDIF.
        "PYTHONPATH": str(SERVER_PATH),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # ndif's configuration (all NDIF_*; see ndif's docs/reference/env-vars).
        "NDIF_REDIS_URL": f"redis://127.0.0.1:{p['redis']}",
        "NDIF_RAY_ADDRESS": f"ray://127.0.0.1:{p['ray_client']}",
        "NDIF_API_PORT": str(p["api"]),
        "NDIF_API_URL": state["host"],
        "NDIF_API_WORKERS": "1",
        "NDIF_OBJECT_STORE_URL": f"http://127.0.0.1:{p['s3']}",
        "NDIF_OBJECT_STORE_ACCESS_KEY": "nslens", "NDIF_OBJECT_STORE_SECRET_KEY": "nslens",
        "NDIF_CONTROLLER_IMPORT_PATH": "ndif_stack_server.ControllerActor",
        "NDIF_MODEL_IMPORT_PATH": "ndif_stack_server.CPUModelActor",
        "NDIF_DEFAULT_DTYPE": "float32",
        # One replica per model: on 2 cores a slow request must not make ndif deploy a second one.
        "NDIF_AUTOSCALING_MAX_REPLICAS": "1",
        # Ray: fewer idle processes (no prestarted workers); see ray start's flags below for the rest.
        "RAY_enable_worker_prestart": "0",
        "RAY_prestart_worker_first_driver": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
        # ndif's ray/start.sh sets this: the Ray client proxier's forked servers die otherwise (see its comment).
        "GRPC_ENABLE_FORK_SUPPORT": "0",
    })
    if state.get("postgres"):
        env["NDIF_POSTGRES_URL"] = f"postgresql://ndif@127.0.0.1:{p['postgres']}/postgres"
    return env


PORTS = ["redis", "postgres", "s3", "api", "gcs", "ray_client", "dashboard", "dashboard_agent", "dashboard_grpc",
         "metrics", "runtime_env_agent", "node_manager", "object_manager"]
WORKER_PORTS = 48


def _start_model_prep(stack: Stack, which: str) -> tuple[subprocess.Popen, Path]:
    """Build the embedded model and the random Llama in a project-venv subprocess (``models.py``), as a process
    of the stack (so stopping the stack stops it too); returns it and the file its JSON result goes to."""
    env = dict(os.environ)
    env.setdefault("NSLENS_HOME", str(REPO / ".cache" / "nslens"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env[procs.MARKER_VAR] = stack.state["stack_id"]
    env["PYTHONPATH"] = os.pathsep.join([str(PKG_DIR.parent)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                                 else []))
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    out = stack.state_dir / "models.json"
    out.unlink(missing_ok=True)
    proc = stack._spawn("models", [sys.executable, "-m", "ndif_stack.models", "prepare", str(MODELS_DIR), which,
                                   str(out)], env, cwd=REPO, record=False)
    return proc, out


def _finish_model_prep(stack: Stack, proc: subprocess.Popen, out: Path, timeout: float, progress) -> list[dict]:
    log = stack.log_dir / "models.log"
    try:
        rc = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        _say(progress, f"waiting for the models (building the embedded model takes a minute or two the first time;"
                       f" log: {log})")
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as error:
            raise StackError(f"timed out after {timeout:.0f} s preparing the models; see {log}:\n"
                             f"{_log_tail(log)}") from error
    if rc != 0:
        raise StackError(f"preparing the models failed (exit {rc}); see {log}:\n{_log_tail(log)}")
    return json.loads(out.read_text())


def _deploy_file(models: list[dict]) -> str:
    lines = ["models:"]
    for m in models:
        lines += [
            f"  - checkpoint: {json.dumps(m['id'])}",
            # Given, so `ndif deploy` does not ask the Hub for it (nnsight's key for a checkpoint asks the Hub).
            f"    model_key: {json.dumps(m['model_key'])}",
            # Given, so the controller does not have to size the checkpoint (ndif 0.1.2 calls nnsight's
            # describe_checkpoint with a trust_remote_code argument nnsight 0.8.1 does not take).
            f"    size_bytes: {m['size_bytes']}",
            "    dtype: float32",
            "    actor_class: ndif_stack_server.CPUModelActor",
            "    pinned: true",
            "    replicas: 1",
        ]
    return "\n".join(lines) + "\n"


def start(state_dir: Path | str | None = None, *, tie_to_parent: bool = False, auth: bool | None = None,
          s3: bool | None = None, models: str | None = None, progress=None, timeout: float | None = None) -> Stack:
    """Start a stack recorded in ``state_dir`` and return it once both models answer a remote trace.

    ``tie_to_parent``: the stack must not outlive this process (the pytest fixture): children get
    ``PR_SET_PDEATHSIG``, a watchdog process stops the rest if this process dies, and atexit and SIGTERM/SIGHUP
    handlers stop it on a normal or signalled exit. ``auth`` (default on; ``NSLENS_NDIF_AUTH=0``) starts Postgres
    so ndif checks API keys; ``s3`` (default on; ``NSLENS_NDIF_S3=0``) starts moto as ndif's object store, which
    non-blocking jobs and results over Redis's 8 MiB pub/sub cap need. ``models`` (``NSLENS_NDIF_MODELS``):
    ``"all"`` (default: the embedded model and the random Llama), ``"llama"`` (only the random Llama) or ``"none"``.
    """
    t0 = time.monotonic()
    state_dir = Path(state_dir or CLI_STATE_DIR).resolve()
    auth = _env_flag("NSLENS_NDIF_AUTH", True) if auth is None else auth
    s3 = _env_flag("NSLENS_NDIF_S3", True) if s3 is None else s3
    models = (os.environ.get("NSLENS_NDIF_MODELS") or "all") if models is None else models
    if models not in ("all", "llama", "none"):
        raise StackError(f"models must be all, llama or none, not {models!r}")
    timeout = float(os.environ.get("NSLENS_NDIF_START_TIMEOUT", "900")) if timeout is None else timeout
    deadline = t0 + timeout

    def left(cap: float) -> float:
        return max(1.0, min(cap, deadline - time.monotonic()))

    redis_bin = shutil.which("redis-server")
    pg_bin = _postgres_bin() if auth else None
    missing = [name for name, found in (("redis-server", redis_bin), ("postgres", pg_bin or not auth)) if not found]
    if missing:
        raise StackError(f"{' and '.join(missing)} not found: `apt-get install -y redis-server postgresql` "
                         "(what .ci/run does), or set NSLENS_NDIF_AUTH=0 to run without API keys")

    old = load(state_dir)
    if old is not None and not old.state.get("stopped"):
        if old.processes():
            if not tie_to_parent and old.is_running() and _http_ok(old.host + "/connected"):
                _say(progress, f"an NDIF stack is already running from {state_dir}")
                return old
            _say(progress, f"stopping what is left of the previous stack in {state_dir}")
        old.stop()
    python = ensure_venv(progress)

    state_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("logs", "actors", "redis", "pg"):
        shutil.rmtree(state_dir / sub, ignore_errors=True)
        (state_dir / sub).mkdir()
    ray_tmp = _ray_temp_dir(state_dir)
    shutil.rmtree(ray_tmp, ignore_errors=True)

    stack_id = uuid.uuid4().hex
    base = procs.free_port_block(len(PORTS) + WORKER_PORTS)
    ports = {name: base + i for i, name in enumerate(PORTS)}
    ports["workers"] = [base + len(PORTS), base + len(PORTS) + WORKER_PORTS - 1]
    state = {
        "version": 1, "stack_id": stack_id, "boot_id": procs.boot_id(), "created": time.time(),
        "owner_pid": os.getpid(), "tie_to_parent": tie_to_parent, "state_dir": str(state_dir),
        "host": f"http://127.0.0.1:{ports['api']}", "ports": ports, "services": {}, "sessions": [],
        "ray_temp_dir": str(ray_tmp), "models": [], "api_key": None, "s3": s3,
        "torch_threads": _client_threads(),
        "postgres": {"bin": str(pg_bin), "port": ports["postgres"]} if auth else None,
    }
    stack = Stack(state_dir, state)
    stack._save()
    _LIVE.add(stack)
    if tie_to_parent:
        _tie_to_this_process(stack)
    try:
        env = _server_env(state, stack_id, state_dir)
        state["env"] = env
        stack._save()
        _say(progress, f"starting the NDIF stack (state and logs: {state_dir})")
        prep = _start_model_prep(stack, models) if models != "none" else None
        stack._spawn("redis", [redis_bin, "--port", str(ports["redis"]), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(state_dir / "redis"), "--daemonize", "no"], env)
        if auth:
            _start_postgres(stack, env, left(120))
        if s3:
            stack._spawn("s3", [str(VENV / "bin" / "moto_server"), "-H", "127.0.0.1", "-p", str(ports["s3"])], env)
        stack._spawn("ray", [
            str(VENV / "bin" / "ray"), "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", f"--port={ports['gcs']}", f"--ray-client-server-port={ports['ray_client']}",
            f"--dashboard-port={ports['dashboard']}", "--dashboard-host=127.0.0.1",
            f"--dashboard-agent-listen-port={ports['dashboard_agent']}",
            f"--dashboard-agent-grpc-port={ports['dashboard_grpc']}", f"--metrics-export-port={ports['metrics']}",
            f"--runtime-env-agent-port={ports['runtime_env_agent']}", f"--node-manager-port={ports['node_manager']}",
            f"--object-manager-port={ports['object_manager']}",
            f"--min-worker-port={ports['workers'][0]}", f"--max-worker-port={ports['workers'][1]}",
            # The controller and one actor per model each take one logical CPU; the "GPU" is declared so ndif's
            # controller treats the node as one it may place models on, and cuda_memory_bytes is what it
            # places them by (ndif's resources.py would report 0 here). Nothing ever asks Ray for the GPU itself.
            "--num-cpus=3", "--num-gpus=1",
            "--resources=" + json.dumps({"head": 10, "cuda_memory_bytes": 16 << 30, "cpu_memory_bytes": 16 << 30}),
            "--object-store-memory=100000000",
            # Lighter: no full dashboard (see ndif_stack_server), no log streaming, no autoscaler monitor.
            "--include-dashboard=false", "--include-log-monitor=false", "--no-monitor",
            f"--temp-dir={ray_tmp}",
        ], env)
        _wait(lambda: procs.port_open(ports["redis"]), left(60), "Redis", stack.log_dir / "redis.log",
              _dead(stack, "redis"))
        _wait(lambda: procs.port_open(ports["ray_client"]) and procs.port_open(ports["gcs"]), left(180),
              "the Ray head", stack.log_dir / "ray.log", _dead(stack, "ray"))
        with contextlib.suppress(OSError):
            (stack.log_dir / "ray").symlink_to(ray_tmp / "session_latest" / "logs")
        _say(progress, f"Ray is up ({time.monotonic() - t0:.0f} s); launching ndif's controller and API")
        launcher = stack._spawn("controller", [str(python), "-m",
                                               "ndif.services.ray.deployments.controller.controller"],
                                {**env, "RAY_ADDRESS": f"127.0.0.1:{ports['gcs']}"}, record=False)
        stack._spawn("api", [str(VENV / "bin" / "gunicorn"), "--config", "python:ndif.services.api.gunicorn_conf",
                             "--bind", f"127.0.0.1:{ports['api']}", "ndif.services.api.app:app"], env)
        try:
            rc = launcher.wait(timeout=left(300))
        except subprocess.TimeoutExpired as error:
            raise StackError(f"ndif's controller launch did not finish; see {stack.log_dir / 'controller.log'}:\n"
                             f"{_log_tail(stack.log_dir / 'controller.log')}") from error
        if rc != 0:
            raise StackError(f"launching ndif's controller failed (exit {rc}); see "
                             f"{stack.log_dir / 'controller.log'}:\n{_log_tail(stack.log_dir / 'controller.log')}")
        stack.wait_api(left(300))
        if auth:
            state["api_key"] = add_api_key(stack)
            stack._save()
        t_services = time.monotonic() - t0
        _say(progress, f"the API is up ({t_services:.0f} s); preparing and deploying the models")
        waited = time.monotonic()
        prep_timeout = float(os.environ.get("NSLENS_NDIF_MODELS_TIMEOUT", "3600"))
        state["models"] = _finish_model_prep(stack, *prep, timeout=prep_timeout, progress=progress) if prep else []
        deadline += time.monotonic() - waited  # building the models once is not part of the stack's start-up
        stack._save()
        t_models = time.monotonic()
        deploy_file = state_dir / "deploy.yaml"
        deploy_file.write_text(_deploy_file(state["models"]))
        rc = 0
        if state["models"]:
            deploy = stack._spawn("deploy", [str(VENV / "bin" / "ndif"), "deploy", "-f", str(deploy_file)], env,
                                  record=False)
            try:
                rc = deploy.wait(timeout=left(600))
            except subprocess.TimeoutExpired as error:
                raise StackError(f"`ndif deploy` did not finish; see {stack.log_dir / 'deploy.log'}:\n"
                                 f"{_log_tail(stack.log_dir / 'deploy.log')}") from error
        if rc != 0:
            raise StackError(f"`ndif deploy` failed (exit {rc}); see {stack.log_dir / 'deploy.log'}:\n"
                             f"{_log_tail(stack.log_dir / 'deploy.log')}\nand Ray's worker logs in "
                             f"{stack.log_dir / 'ray'}")
        t_deploy = time.monotonic() - t_models
        deploy_wall = time.time() - t_deploy
        loaded = {}
        for model in state["models"]:
            path = state_dir / "actors" / f"{hashlib.sha256(model['model_key'].encode()).hexdigest()[:16]}.json"
            with contextlib.suppress(OSError, ValueError, KeyError):
                loaded[model["id"]] = round(json.loads(path.read_text())["loaded_at"] - deploy_wall, 1)
        from .client import check_trace

        for model in state["models"]:
            try:
                check_trace(state["host"], state["api_key"], model["id"])
            except Exception as error:
                raise StackError(f"{model['id']} is deployed but a remote trace failed: {error}; see "
                                 f"{stack.log_dir / 'api.log'} and {stack.log_dir / 'ray'}") from error
        state["timings"] = {"services_s": round(t_services, 1), "deploy_s": round(t_deploy, 1),
                            "model_loaded_after_s": loaded,
                            "total_s": round(time.monotonic() - t0, 1)}
        state["snapshot"] = [[pid, info.start] for pid, info in stack.processes().items()]
        stack._save()
        (state_dir / "env").write_text("".join(f"export {k}={v}\n" for k, v in stack.client_env().items()))
        _say(progress, f"the NDIF stack is ready ({time.monotonic() - t0:.0f} s)")
        return stack
    except BaseException:
        with contextlib.suppress(Exception):
            stack.stop()
        raise


def _dead(stack: Stack, name: str):
    def check():
        svc = stack.state["services"].get(name)
        if svc and not procs.alive(svc["pid"], svc["start"]):
            return f"{name} exited"
        return None
    return check


def _start_postgres(stack: Stack, env: dict, timeout: float) -> None:
    """ndif checks API keys against Postgres (``NDIF_POSTGRES_URL``): start one with ndif's key schema."""
    pg = stack.state["postgres"]
    pg_dir = stack.state_dir / "pg"
    uid = None
    if os.geteuid() == 0:  # postgres refuses to run as root
        import pwd

        try:
            uid = pwd.getpwnam("postgres").pw_uid
        except KeyError as error:
            raise StackError("running as root needs the `postgres` user (apt-get install postgresql)") from error
        if not _others_can_reach(pg_dir):  # e.g. a checkout under a 0700 `mktemp -d`: postgres could not enter it
            pg_dir = _pg_temp_dir(stack.state_dir)
            shutil.rmtree(pg_dir, ignore_errors=True)
            pg_dir.mkdir(mode=0o700)
            stack.state["pg_dir"] = str(pg_dir)  # removed when the stack stops
            stack._save()
        os.chown(pg_dir, uid, -1)
    init = stack._spawn("initdb", [str(Path(pg["bin"]) / "initdb"), "-D", str(pg_dir / "data"), "-U", "ndif",
                                   "--auth=trust", "-E", "UTF8", "--no-instructions", "--no-sync"],
                        env, cwd=pg_dir, uid=uid, record=False)
    if init.wait(timeout=timeout) != 0:
        raise StackError(f"initdb failed; see {stack.log_dir / 'initdb.log'}:\n"
                         f"{_log_tail(stack.log_dir / 'initdb.log')}")
    stack._spawn("postgres", [str(Path(pg["bin"]) / "postgres"), "-D", str(pg_dir / "data"), "-p", str(pg["port"]),
                              "-k", str(pg_dir), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                              "-c", "shared_buffers=16MB", "-c", "max_connections=30", "-c", "log_min_messages=warning"],
                 env, cwd=pg_dir, uid=uid)
    _wait(lambda: procs.port_open(pg["port"]), timeout, "Postgres", stack.log_dir / "postgres.log",
          _dead(stack, "postgres"))
    for attempt in range(20):
        try:
            _psql(stack, AUTH_SCHEMA)
            return
        except StackError:
            if attempt == 19:
                raise
            time.sleep(0.5)


def _client_threads() -> int:
    """torch's thread count in this (client) process: the CPU actors use the same, for bit-identical results."""
    override = os.environ.get(CLIENT_THREADS_VAR)
    if override:
        return int(override)
    import torch

    return torch.get_num_threads()


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() not in ("0", "false", "no", "off", "")


# -------------------------------------------------------------------------------------- tying to this process

_HANDLERS_INSTALLED = False


def stop_all() -> None:
    """Stop every stack this process started and has not stopped yet."""
    for stack in list(_LIVE):
        with contextlib.suppress(Exception):
            stack.stop()


def _tie_to_this_process(stack: Stack) -> None:
    """No process of ``stack`` may outlive this one: a watchdog process (survives SIGKILL of this one), atexit (a
    normal exit, also after Ctrl-C), and SIGTERM/SIGHUP handlers (whose default would skip atexit)."""
    global _HANDLERS_INSTALLED
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "ndif_stack.watchdog", str(stack.state_dir), str(os.getpid()),
         str(procs.start_ticks(os.getpid()))],
        env={**os.environ, "PYTHONPATH": str(PKG_DIR.parent)}, cwd=str(stack.state_dir),
        stdin=subprocess.DEVNULL, stdout=open(stack.log_dir / "watchdog.log", "ab"), stderr=subprocess.STDOUT,
        start_new_session=True)
    stack.state["watchdog"] = {"pid": watchdog.pid, "start": procs.start_ticks(watchdog.pid)}
    stack._save()
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(stop_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        previous = signal.getsignal(signum)

        def handler(sig, frame, previous=previous):
            stop_all()
            if callable(previous):
                previous(sig, frame)
            else:
                signal.signal(sig, signal.SIG_DFL)
                os.kill(os.getpid(), sig)

        signal.signal(signum, handler)
