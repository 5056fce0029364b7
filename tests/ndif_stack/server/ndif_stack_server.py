"""Server-side half of the local NDIF test stack: imported only inside the server's own virtual environment.

This directory is the *only* thing put on the server processes' ``PYTHONPATH`` (never the repository root, so the
server cannot import nslens: like the public NDIF, it has never heard of it). Two things live here, each a
workaround for running ndif 0.1.2 on a CPU-only machine; see ``tests/ndif_stack/README.md`` for the full list.

* ``ControllerActor`` (selected with ``NDIF_CONTROLLER_IMPORT_PATH``): ndif's own controller, unchanged, except that
  its two Ray *state API* calls (``ray.util.state.list_nodes`` / ``list_actors``) are answered from the GCS
  (``ray.nodes()`` / ``ray._private.state.actors()``). The state API is served by Ray's dashboard, and the full
  dashboard costs ~10 extra processes (~230 MB PSS, several seconds of start-up on 2 cores); Ray's minimal
  dashboard (``--include-dashboard=false``) does not serve it.
* ``CPUModelActor`` (selected by the deploy file's ``actor_class`` and ``NDIF_MODEL_IMPORT_PATH``): ndif's model
  actor, unchanged, except that it loads the checkpoint with ``device_map="cpu"`` and never calls into CUDA (the
  stock ``ModelActor`` pins a GPU, sets CUDA memory fractions and verifies CUDA placement). It also sets torch's
  thread count to the client's (``NSLENS_NDIF_TORCH_THREADS``; Ray sets ``OMP_NUM_THREADS=1`` in its workers), so
  CPU matmuls reduce in the same order as the local run and remote results are bit-identical to local ones, and
  it writes its pid to ``$NSLENS_NDIF_STATE_DIR/actors/`` so the fault tests can kill it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from types import SimpleNamespace

import ray
from ndif.services.ray.deployments.controller import controller as _controller
from ndif.services.ray.deployments.controller.cluster import cluster as _cluster
from ndif.services.ray.deployments.modeling.base import BaseModelDeployment
from nnsight.modeling.huggingface import HuggingFaceModel


def _list_nodes(address=None, filters=None, detail=False, **_):
    """``ray.util.state.list_nodes(filters=[("state", "=", "ALIVE")])`` from the GCS, without the dashboard."""
    nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        nodes.append(SimpleNamespace(
            node_id=node["NodeID"],
            node_name=node.get("NodeName") or node.get("NodeManagerAddress"),
            resources_total=dict(node.get("Resources") or {}),
            labels=dict(node.get("Labels") or {}),
            state="ALIVE",
        ))
    return nodes


def _list_actors(address=None, **_):
    """``ray.util.state.list_actors()`` from the GCS (name and state are all the controller reads)."""
    from ray._private.state import actors

    return [SimpleNamespace(name=a.get("Name") or "", state=a.get("State"), pid=a.get("Pid"))
            for a in actors().values()]


def apply_patches() -> None:
    """Point ndif's controller at the GCS-backed listings (idempotent)."""
    _cluster.list_nodes = _list_nodes
    _controller.list_actors = _list_actors


class _PatchedController(_controller._ControllerActor):
    # Ray ships actor classes to the worker by value, so the patch is applied here, in the worker, not at import.
    def __init__(self, *args, **kwargs):
        import ndif_stack_server

        ndif_stack_server.apply_patches()
        super().__init__(*args, **kwargs)


ControllerActor = ray.remote(num_cpus=1, num_gpus=0, max_restarts=-1, resources={"head": 1})(_PatchedController)


def actor_pid_file(state_dir: str, model_key: str) -> str:
    """Where the actor serving ``model_key`` records its pid (the client side computes the same name)."""
    digest = hashlib.sha256(model_key.encode()).hexdigest()[:16]
    return os.path.join(state_dir, "actors", f"{digest}.json")


class CPUModelDeployment(BaseModelDeployment):
    """ndif's model actor on CPU: same request path (``run``/``execute``), CPU load and cleanup."""

    # Parking HOT->WARM moves weights GPU->CPU; on CPU there is nothing to park, so the controller evicts instead.
    CACHEABLE = False

    def __init__(self, *args, **kwargs):
        import torch

        threads = os.environ.get("NSLENS_NDIF_TORCH_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
        super().__init__(*args, **kwargs)
        state_dir = os.environ.get("NSLENS_NDIF_STATE_DIR")
        if state_dir:
            path = actor_pid_file(state_dir, self.model_key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({"pid": os.getpid(), "model_key": self.model_key, "loaded_at": time.time()}, f)
            os.replace(tmp, path)

    def load_from_disk(self) -> HuggingFaceModel:
        model = HuggingFaceModel.from_model_key(
            self.model_key, dispatch=True, dtype=self.dtype_name, device_map="cpu", **self.kwargs
        )
        model._module.requires_grad_(False)
        return model

    def cleanup(self) -> None:
        # The stock cleanup, minus torch.cuda.synchronize/empty_cache (which raise on a CPU-only torch).
        self.kill_switch.clear()
        self.kill_reason = None
        self.execution_ident = None
        self.model.interleaver.cancel()
        gc.collect()


CPUModelActor = ray.remote(num_cpus=1, max_restarts=-1)(CPUModelDeployment)
