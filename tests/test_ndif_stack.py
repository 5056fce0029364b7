"""The local NDIF stack itself (tests/ndif_stack): plain nnsight 0.8.1 traces (no nslens object inside a trace)
with remote=True over the real wire equal the local run, and the stack leaves no process behind.

Tolerance: exact (``torch.equal``). The server's CPU actor runs torch with this process's thread count, so the
float32 matmuls reduce in the same order; with different thread counts the two differ by ~1e-7.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

PROMPTS = ["the cat sat on the mat", "a dog"]


@pytest.fixture
def same_threads(ndif_stack):
    """Run the local side with the thread count the server's actors use (see the module docstring)."""
    before = torch.get_num_threads()
    torch.set_num_threads(ndif_stack.state["torch_threads"])
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("which", [0, 1], ids=["embedded", "random-llama"])
def test_remote_trace_equals_local(ndif_stack, same_threads, which):
    from ndif_stack.client import local_model, remote_model

    model_id = ndif_stack.models[which]
    remote = remote_model(model_id)
    with ndif_stack.configured():  # CONFIG.API.HOST/APIKEY -> the stack, nnsight's id cache seeded
        with remote.trace(PROMPTS, remote=True):
            hidden = remote.model.layers[0].output.save()
            logits = remote.lm_head.output.save()
        with remote.trace(PROMPTS, remote=True):  # an edit travels too
            remote.model.layers[0].output[:, -1] = 0
            edited = remote.lm_head.output.save()

    local = local_model(model_id)
    with local.trace(PROMPTS):
        hidden_local = local.model.layers[0].output.save()
        logits_local = local.lm_head.output.save()
    with local.trace(PROMPTS):
        local.model.layers[0].output[:, -1] = 0
        edited_local = local.lm_head.output.save()

    assert logits.shape == (2, logits_local.shape[1], len(local.tokenizer))
    assert torch.equal(hidden, hidden_local)
    assert torch.equal(logits, logits_local)
    assert torch.equal(edited, edited_local)
    assert not torch.equal(edited, logits)


def test_ids_and_keys(ndif_stack):
    """Each id is a checkpoint directory, and the key the server deployed is the one nnsight's client sends."""
    assert len(ndif_stack.models) == 2
    assert "embedded" in Path(ndif_stack.models[0]).name
    for model_id in ndif_stack.models:
        assert (Path(model_id) / "config.json").exists()
        assert ndif_stack.remote_model(model_id).to_model_key() == ndif_stack.model_keys[model_id]


def test_api_key_is_checked(ndif_stack):
    from nnsight.intervention.backends.remote import RemoteError

    if not ndif_stack.auth:
        pytest.fail("the stack runs without API keys (NSLENS_NDIF_AUTH=0)")
    model = ndif_stack.remote_model(ndif_stack.models[1])
    with pytest.raises(RemoteError, match="Invalid API key"):
        with model.trace(PROMPTS, backend=ndif_stack.backend(model, api_key="00000000-0000-4000-8000-00000000dead")):
            model.lm_head.output.save()


CHILD_TEST = """
import os, signal

def test_killed(ndif_stack):
    print("STATE_DIR=" + str(ndif_stack.state_dir), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # the harshest end of a session: no teardown, no atexit
"""

def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


SERVICE_NAMES = ("redis-server", "ray::", "raylet", "gcs_server", "gunicorn", "uvicorn", "moto_server", "postgres")


def test_nothing_outlives_a_killed_session(ndif_stack, tmp_path):
    """A pytest session whose process is SIGKILLed while its ndif_stack fixture is up leaves no process of its
    stack behind (its children die with it, a watchdog stops the rest), and this session's stack is untouched."""
    from ndif_stack import procs, stack

    (tmp_path / "conftest.py").write_text("from ndif_stack.fixture import ndif_stack  # noqa: F401\n")
    (tmp_path / "test_child.py").write_text(textwrap.dedent(CHILD_TEST))
    tests_dir = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": str(tests_dir), "NSLENS_NDIF_MODELS": "none"}
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                            "--rootdir", str(tmp_path), str(tmp_path / "test_child.py")],
                           env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=900)
    assert child.returncode == -signal.SIGKILL, child.stdout[-3000:] + child.stderr[-3000:]
    state_dir = next(line.split("=", 1)[1] for line in child.stdout.splitlines() if line.startswith("STATE_DIR="))
    killed = stack.load(state_dir)
    assert killed is not None and killed.state["services"], "the child's stack never started"

    leaders = killed._leaders()
    deadline = time.monotonic() + 60
    while killed.processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert killed.processes() == {}
    # And by name: nothing that looks like a service runs in one of the dead stack's sessions.
    sessions = {pid for pid, _ in leaders}
    left = [(p.pid, _cmdline(p.pid)) for p in procs.all_procs().values()
            if p.sid in sessions and p.state != "Z" and any(n in _cmdline(p.pid) for n in SERVICE_NAMES)]
    assert left == []
    while not stack.load(state_dir).state.get("stopped") and time.monotonic() < deadline + 30:
        time.sleep(0.2)
    assert stack.load(state_dir).state.get("stopped"), "the watchdog did not record the stop"
    # This session's stack was not touched.
    assert ndif_stack.is_running()
    assert ndif_stack.processes()
