"""Faults of a real NDIF server (tests/ndif_stack), each provoked on purpose: transient ones are retried with
backoff and a progress line and the result equals the local run; the others (and exhausted retries) are one
line naming the problem, never showing the API key; a resumed recording is bit-identical to an uninterrupted one.

Every test leaves the stack as it found it (the API running, the model actors up), so the other remote tests in
the session can use it.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

import numpy as np
import pytest
import torch

import nslens
from nslens.errors import NsLensError
from nslens.remote import RemoteTimeout
from nslens.synthetic import synthetic_concepts


@pytest.fixture(scope="module")
def setup(ndif_stack, embedded):
    ds = synthetic_concepts(6, seed=5)
    prompts = nslens.FewShotPrompter.from_dataset(ds, k=1, seed=0).prompts(ds.texts)
    site = nslens.resolve_site(embedded, -2)
    ref = nslens.record(embedded, site, prompts, ds.labels, ds.label_names, batch_size=4)
    masks = nslens.build_range_masks(ref.stats, fraction=0.5)
    gold = np.asarray(nslens.label_token_ids(embedded.tokenizer, ds.label_names))[ds.labels]
    with ndif_stack.configured():
        remote = nslens.load_model(ndif_stack.models[0], remote=True)
        yield {"ds": ds, "prompts": prompts, "ref": ref, "masks": masks, "gold": gold, "remote": remote,
               "rsite": nslens.resolve_site(remote, -2), "local": embedded, "site": site}


@pytest.fixture(autouse=True)
def same_threads(ndif_stack):
    before = torch.get_num_threads()
    torch.set_num_threads(ndif_stack.state["torch_threads"])
    yield
    torch.set_num_threads(before)


@pytest.fixture
def api_restored(ndif_stack):
    """Whatever a test did to the API, it runs (and answers) afterwards."""
    yield
    ndif_stack.resume_api()
    if ndif_stack._api_dead():
        ndif_stack.start_api()
    ndif_stack.wait_serving()


def record_remote(s, **kw):
    return nslens.record(s["remote"], s["rsite"], s["prompts"], s["ds"].labels, s["ds"].label_names, batch_size=4,
                         remote=True, **kw)


def predict_remote(s):
    iv = nslens.Intervention(s["masks"][0], nslens.zero())
    return nslens.predict(s["remote"], s["rsite"], s["prompts"], s["gold"], interventions=iv, batch_size=8,
                          remote=True)


def assert_same_stats(a, b):
    for name in ("count", "mean", "m2", "abs_sum"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_server_down_then_exhausted_retries_then_resume_bit_identical(ndif_stack, setup, tmp_path, monkeypatch,
                                                                      caplog, api_restored):
    """The API goes down after two batches of a checkpointed recording: the retries are logged, then exhausted
    in one line; the checkpoint holds the finished batches and the ids of jobs already submitted; once the API is
    back the same call resumes, polling those jobs (a job the killed API had still queued is lost and stays
    QUEUED: after NSLENS_REMOTE_STALL seconds it is submitted again), and the statistics equal an uninterrupted
    run bit for bit. With the server down before a request, the preflight says so in one line."""
    monkeypatch.setenv("NSLENS_REMOTE_RETRIES", "2")
    monkeypatch.setenv("NSLENS_REMOTE_BACKOFF", "0.1")
    ck = tmp_path / "rec.ckpt"

    def kill_after_two(desc, done, total):
        if done == 2:
            ndif_stack.kill_api()

    with caplog.at_level(logging.WARNING, logger="nslens.remote"), pytest.raises(NsLensError) as e:
        record_remote(setup, checkpoint=ck, checkpoint_every=1, progress=kill_after_two)
    msg = str(e.value)
    assert "\n" not in msg and "failed after 2 attempts" in msg and "NSLENS_REMOTE_RETRIES" in msg
    assert any("retrying in" in r.getMessage() for r in caplog.records)
    from nslens.stats import ConceptStats

    tag = ConceptStats.load(ck).meta["checkpoint"]
    assert tag["batches_done"] == 2 and tag["jobs"]  # jobs 2.. were submitted before the API went down
    with pytest.raises(ValueError, match=r"cannot reach NDIF at http://127\.0\.0\.1:\d+ \(Connect"):
        nslens.load_model(ndif_stack.models[0], remote=True)
    ndif_stack.start_api()
    ndif_stack.wait_serving()  # the controller has its deployments again (as api_restored waits for)
    monkeypatch.setenv("NSLENS_REMOTE_STALL", "4")
    polled = []
    rec_mod = sys.modules["nslens.record"]  # the module (nslens.record is the function)
    real_poll = rec_mod.poll_job
    monkeypatch.setattr(rec_mod, "poll_job", lambda m, job, **k: polled.append(job) or real_poll(m, job, **k))
    res = record_remote(setup, checkpoint=ck, checkpoint_every=1)
    assert polled[:len(tag["jobs"])] == [tag["jobs"][k] for k in sorted(tag["jobs"], key=int)]
    assert_same_stats(res.stats, setup["ref"].stats)
    assert not ck.exists()


def test_api_killed_mid_request_is_retried(ndif_stack, setup, monkeypatch, api_restored):
    """The API is paused (so the request is in flight), killed, and started again while the client backs off:
    the recording completes and equals the local one."""
    monkeypatch.setenv("NSLENS_REMOTE_RETRIES", "7")  # 2 + 4 + ... + 64 s: covers a restart on a busy machine
    ndif_stack.pause_api()
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("res", record_remote(setup)), daemon=True)
    worker.start()
    time.sleep(1.0)
    ndif_stack.kill_api()
    ndif_stack.start_api()
    worker.join(300)
    assert "res" in out, "the recording did not finish after the API came back"
    assert_same_stats(out["res"].stats, setup["ref"].stats)


def test_model_actor_killed_is_retried(ndif_stack, setup, monkeypatch):
    """The model's worker is killed; Ray restarts it and the request (retried if the server reports the worker's
    death) completes with the local result."""
    monkeypatch.setenv("NSLENS_REMOTE_RETRIES", "7")
    model_id = ndif_stack.models[0]
    old = ndif_stack.kill_model_actor(model_id)
    try:
        p = predict_remote(setup)
        ref = nslens.predict(setup["local"], setup["site"], setup["prompts"], setup["gold"],
                             interventions=nslens.Intervention(setup["masks"][0], nslens.zero()), batch_size=8)
        assert np.array_equal(p.pred, ref.pred) and np.array_equal(p.conf, ref.conf)
    finally:
        ndif_stack.wait_model_actor(model_id, old)
        ndif_stack.wait_serving()


def test_dropped_connection_is_retried(ndif_stack, setup, caplog):
    """The websocket of a blocking request is cut after the upgrade: websocket's
    WebSocketConnectionClosedException is retried and the result is the local one."""
    from ndif_stack.proxy import Proxy
    from nnsight import CONFIG

    proxy = Proxy(ndif_stack.host)
    saved = CONFIG.API.HOST
    CONFIG.API.HOST = proxy.url
    try:
        proxy.drop_websockets(1)
        with caplog.at_level(logging.WARNING, logger="nslens.remote"):
            p = predict_remote(setup)
    finally:
        CONFIG.API.HOST = saved
        proxy.close()
    assert proxy.dropped == 1
    assert any("WebSocketConnectionClosedException" in r.getMessage() for r in caplog.records)
    ref = nslens.predict(setup["local"], setup["site"], setup["prompts"], setup["gold"],
                         interventions=nslens.Intervention(setup["masks"][0], nslens.zero()), batch_size=8)
    assert np.array_equal(p.pred, ref.pred) and np.array_equal(p.conf, ref.conf)


@pytest.mark.parametrize("path", ["blocking", "jobs"])
def test_hung_server_times_out_in_one_line(ndif_stack, setup, monkeypatch, api_restored, path):
    """A server that accepts connections but never answers: the client gives up after NSLENS_REMOTE_TIMEOUT
    seconds, blocking traces and non-blocking jobs alike, with one line naming the timeout and how to raise it."""
    monkeypatch.setenv("NSLENS_REMOTE_TIMEOUT", "3")
    with ndif_stack.api_paused():
        t = time.monotonic()
        with pytest.raises(RemoteTimeout) as e:
            predict_remote(setup) if path == "blocking" else record_remote(setup)
        took = time.monotonic() - t
    assert 3 <= took < 30 and "\n" not in str(e.value)
    assert "did not answer within 3 s (client-side timeout)" in str(e.value)
    assert "NSLENS_REMOTE_TIMEOUT=SECONDS" in str(e.value)


def test_bad_api_key_is_one_line_and_never_shown(ndif_stack, setup, monkeypatch, caplog, capsys):
    """The server checks keys and echoes a malformed one in its error: nslens's line names the refusal and
    redacts the key, in the message and in the log."""
    from nnsight import CONFIG

    bad = "not-a-uuid-secret-123"
    monkeypatch.setenv("NDIF_API_KEY", bad)
    monkeypatch.setattr(CONFIG.API, "APIKEY", bad)
    with caplog.at_level(logging.DEBUG), pytest.raises(NsLensError) as e:
        predict_remote(setup)
    msg = str(e.value)
    assert "\n" not in msg and "failed on NDIF" in msg and "Invalid API key" in msg and "<api key>" in msg
    out = capsys.readouterr()
    assert bad not in msg and bad not in caplog.text and bad not in out.out + out.err
    unknown = "00000000-0000-4000-8000-00000000dead"
    monkeypatch.setenv("NDIF_API_KEY", unknown)
    monkeypatch.setattr(CONFIG.API, "APIKEY", unknown)
    with pytest.raises(NsLensError, match=r"Invalid API key\."):
        record_remote(setup)


def test_model_not_served_is_one_line(ndif_stack, setup):
    """The preflight names the served models (test_remote_ndif); a trace sent anyway fails in one line."""
    from ndif_stack.client import remote_model, seed_id_cache

    other = ndif_stack.models[1] + "-not-deployed"
    model = remote_model(ndif_stack.models[1])
    model.repo_id = other  # the key names a checkpoint the server does not serve
    seed_id_cache(other)
    with pytest.raises(NsLensError, match=r"failed on NDIF: RemoteError: .*(Could not deploy|not)") as e:
        nslens.predict(model, nslens.resolve_site(model, -1), setup["prompts"][:2], setup["gold"][:2],
                       remote=True)
    assert "\n" not in str(e.value)


def test_failed_remote_step_keeps_the_finished_artifacts(ndif_stack, setup, tmp_path, monkeypatch, api_restored):
    """The API goes down when the side effects start: the run records the failed step and keeps the statistics,
    masks and erasure tables it had finished; no temporary file is left."""
    pytest.importorskip("lm_eval")
    import json

    from nslens.harness import LOCAL_TASKS, local_tasks_dir
    from nslens.pipeline import RunConfig, run_pipeline

    monkeypatch.setenv("NSLENS_REMOTE_RETRIES", "2")
    monkeypatch.setenv("NSLENS_REMOTE_BACKOFF", "0.1")
    cfg = RunConfig(model=ndif_stack.models[0], remote=True, n_per_class=12, batch_size=16, fraction=0.5,
                    operators=["zero"], analyses=False, side_effects=True, side_effect_limit=4,
                    side_effect_tasks=list(LOCAL_TASKS), lm_eval_include=str(local_tasks_dir()))

    def progress(desc, done, total):
        if desc.startswith("side effects") and ndif_stack._api_dead() is None:
            ndif_stack.kill_api()

    run = run_pipeline(cfg, tmp_path / "run", model=setup["remote"], progress=progress)
    summary = json.loads((run / "summary.json").read_text())
    assert "side_effects" in summary["failed_steps"] and "failed after 2 attempts" in summary["failed_steps"]["side_effects"]
    names = {p.name for p in run.iterdir()}
    assert {"stats.safetensors", "ranges", "erasure_zero.json", "erasure_zero.md", "report.md"} <= names
    assert not [p for p in run.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
