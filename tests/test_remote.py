"""Remote (NDIF) plumbing, tested offline: key handling, preflight errors, retries, resumable recording, and the
lm-eval adapter under nnsight's remote="local" (the full serialize/deserialize path, in-process)."""

import numpy as np
import pytest

import nslens
from nslens.record import record
from nslens.remote import check_remote, with_retries

SECRET = "ndif-secret-key-123"


def test_missing_key_is_a_clear_error(monkeypatch):
    from nnsight import CONFIG

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    with pytest.raises(ValueError, match="remote runs need an NDIF API key: set NDIF_API_KEY"):
        nslens.load_model("meta-llama/Llama-3.1-70B", remote=True)


def test_unreachable_host_never_shows_the_key(monkeypatch):
    from nnsight import CONFIG

    monkeypatch.setenv("NDIF_API_KEY", SECRET)
    monkeypatch.setattr(CONFIG.API, "HOST", "http://127.0.0.1:9")  # closed port on this machine
    with pytest.raises(ValueError, match=r"cannot reach NDIF at http://127.0.0.1:9") as err:
        check_remote("meta-llama/Llama-3.1-70B", timeout=2.0)
    assert SECRET not in str(err.value)


def test_a_server_that_accepts_but_never_answers_is_not_called_unreachable(monkeypatch):
    """An ndif server computes /status through its Ray controller (up to 60 s on a busy machine): the preflight
    waits for the answer and, when none comes, says the server answered the connection but not the request."""
    import socket
    import threading

    from nnsight import CONFIG

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    held = []
    threading.Thread(target=lambda: held.append(listener.accept()), daemon=True).start()
    monkeypatch.setenv("NDIF_API_KEY", SECRET)
    monkeypatch.setattr(CONFIG.API, "HOST", f"http://127.0.0.1:{listener.getsockname()[1]}")
    try:
        with pytest.raises(ValueError, match=r"accepted the connection but sent no status within 1 s"):
            check_remote("meta-llama/Llama-3.1-70B", timeout=2.0, read_timeout=1.0)
    finally:
        listener.close()


def test_a_status_refresh_the_server_lost_is_asked_for_again(monkeypatch):
    """503/504 from /status (ndif's refresh failed or its lock outlived a restarted API): asked again, then fine."""
    import httpx
    import nnsight.ndif

    import nslens.remote as remote

    answers = [504, 503, None]

    def get(path, timeout):
        code = answers.pop(0)
        if code:
            raise httpx.HTTPStatusError("busy", request=httpx.Request("GET", path),
                                        response=httpx.Response(code))
        return {"deployments": {"a": {"repo_id": "m/x", "application_state": "RUNNING"}}}

    monkeypatch.setenv("NDIF_API_KEY", SECRET)
    monkeypatch.setattr(nnsight.ndif, "_get", get)
    monkeypatch.setattr(remote.time, "sleep", lambda s: None)
    check_remote("m/x")
    assert answers == []
    answers[:] = [504, 504, 504]
    with pytest.raises(ValueError, match=r"answered its status page with HTTP 504; the server is up"):
        check_remote("m/x")


def test_model_not_running(monkeypatch):
    import nnsight.ndif

    monkeypatch.setenv("NDIF_API_KEY", SECRET)
    status = {"deployments": {"a": {"repo_id": "meta-llama/Llama-3.1-8B", "application_state": "RUNNING"},
                              "b": {"repo_id": "meta-llama/Llama-3.1-70B", "application_state": "DEPLOYING"}}}
    monkeypatch.setattr(nnsight.ndif, "_get", lambda *a, **k: status)
    with pytest.raises(ValueError, match=r"'meta-llama/Llama-3.1-70B' is not running on NDIF .* running now: "
                                         r"meta-llama/Llama-3.1-8B"):
        check_remote("meta-llama/Llama-3.1-70B")
    check_remote("meta-llama/Llama-3.1-8B")  # running: no error


def test_retries_with_exponential_backoff():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("dropped")
        return "ok"

    assert with_retries(flaky, attempts=3, base_delay=2.0, sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and sleeps == [2.0, 4.0]
    with pytest.raises(ValueError, match=r"NDIF request failed after 2 attempts \(TimeoutError"):
        with_retries(lambda: (_ for _ in ()).throw(TimeoutError("slow")), attempts=2, sleep=lambda s: None)
    seen = []
    with pytest.raises(KeyError):  # not transient: no retry
        with_retries(lambda: seen.append(1) or {}["x"], attempts=5, sleep=lambda s: None)
    assert len(seen) == 1


def test_interrupted_record_resumes_from_checkpoint(embedded, site, synth, tmp_path):
    prompts, tr = synth["train_prompts"][:30], synth["train"]
    labels = tr.labels[:30]
    ck = tmp_path / "record.ckpt"
    full = record(embedded, site, prompts, labels, tr.label_names, batch_size=4)

    def stop_after_3(desc, done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        record(embedded, site, prompts, labels, tr.label_names, batch_size=4, checkpoint=ck, checkpoint_every=1,
               progress=stop_after_3)
    assert ck.exists()
    done = []
    res = record(embedded, site, prompts, labels, tr.label_names, batch_size=4, checkpoint=ck, checkpoint_every=1,
                 progress=lambda d, i, t: done.append(i))
    assert done[0] == 4  # batches 1-3 were not recomputed
    np.testing.assert_allclose(res.stats.mean, full.stats.mean, rtol=1e-12)
    np.testing.assert_allclose(res.stats.m2, full.stats.m2, rtol=1e-9)
    assert not ck.exists()
    # a checkpoint from another run is refused
    with pytest.raises(KeyboardInterrupt):
        record(embedded, site, prompts, labels, tr.label_names, batch_size=4, checkpoint=ck, checkpoint_every=1,
               progress=stop_after_3)
    with pytest.raises(ValueError, match="was written for another run"):
        record(embedded, site, prompts[:20], labels[:20], tr.label_names, batch_size=4, checkpoint=ck)


def test_lm_eval_side_effects_under_remote_local(embedded, site, synth, tmp_path):
    """The one-sweep side-effect table (clean pass + replays per batch, one session each) through nnsight's
    serialization path equals the local one."""
    pytest.importorskip("lm_eval")
    from nslens.harness import local_tasks_dir, side_effects

    tasks = ["nslens_synth_mc", "nslens_synth_cont", "nslens_synth_token_ppl"]
    inc = local_tasks_dir(tmp_path / "t", n_mc=12, n_ppl=4)
    rec = record(embedded, site, synth["train_prompts"], synth["train"].labels, synth["train"].label_names,
                 batch_size=32)
    mask = nslens.build_range_masks(rec.stats, fraction=0.5)[0]
    ivs = {"neuron": nslens.Intervention(mask, nslens.zero(), gated=False),
           "range": nslens.Intervention(mask, nslens.zero())}
    out = {r: side_effects(embedded, site, ivs, tasks=tasks, include_path=inc, remote=r, per_pass=1)
           for r in (False, "local")}
    assert dict(out[False]) == dict(out["local"])
    assert out["local"]["neuron"] != out["local"]["clean"]


def test_adapter_accepts_a_meta_remote_style_model(embedded):
    """A remote model is a meta (weightless) model locally: the adapter must keep its inputs on the CPU."""
    pytest.importorskip("lm_eval")
    from nnsight import TransformersModel

    from nslens.embedded import embedded_model_dir
    from nslens.harness import NsLensLM

    meta = TransformersModel(str(embedded_model_dir()), tokenizer=embedded.tokenizer, task="text-generation")
    assert next(meta._module.parameters()).device.type == "meta"
    lm = NsLensLM(meta, remote=True)
    assert lm.device.type == "cpu" and lm.remote is True


def test_a_stuck_job_is_submitted_again(monkeypatch, caplog):
    """A job that stays in one state for NSLENS_REMOTE_STALL seconds (a restarted ndif server keeps the jobs it lost
    QUEUED forever) is replaced by a resubmitted one; a job whose status moves is waited for."""
    import logging

    import nslens.remote as remote

    class Fake:
        def __init__(self, statuses):
            self.statuses, self.status = list(statuses), None

        def __call__(self, tracer):
            self.status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
            return {"part": self.status} if self.status == "COMPLETED" else None

    backends = {"old": Fake(["QUEUED"]), "new": Fake(["QUEUED", "RUNNING", "COMPLETED"])}
    monkeypatch.setattr(remote, "job_backend", lambda model, job_id=None: backends[job_id])
    clock = iter(range(0, 10_000))
    monkeypatch.setattr(remote.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setenv("NSLENS_REMOTE_STALL", "5")
    submitted = []
    with caplog.at_level(logging.WARNING, logger="nslens.remote"):
        out = remote.poll_job(None, "old", what="record batch 3", sleep=lambda s: None,
                              resubmit=lambda: submitted.append(1) or "new")
    assert out == {"part": "COMPLETED"} and submitted == [1]
    assert "record batch 3: job old stayed QUEUED" in caplog.text and "submitted again as new" in caplog.text
    monkeypatch.setenv("NSLENS_REMOTE_STALL", "0")
    with pytest.raises(ValueError, match="NSLENS_REMOTE_STALL must be a positive number"):
        remote.stall_seconds()
