"""Multi-process start-up on JAX's own runtime (no home-made launcher protocol)."""

import os

import jax


def maybe_initialize() -> None:
  """Calls jax.distributed.initialize when launched as one of several processes.

  - MMJAX_COORDINATOR / MMJAX_NUM_PROCESSES / MMJAX_PROCESS_ID: explicit (N local
    processes, `launch/multiprocess_local.sh`);
  - SLURM (SLURM_NTASKS > 1) or a TPU pod: JAX detects the cluster itself.

  MMJAX_HEARTBEAT_TIMEOUT (seconds) bounds how long a process outlives a lost peer.
  """
  timeout = {}
  if os.environ.get("MMJAX_HEARTBEAT_TIMEOUT"):
    # A lost peer is declared dead, and every other process exits naming it,
    # after this many seconds without its heartbeats (JAX's default: 100).
    timeout["heartbeat_timeout_seconds"] = int(os.environ["MMJAX_HEARTBEAT_TIMEOUT"])
  if os.environ.get("MMJAX_COORDINATOR"):
    jax.distributed.initialize(
        coordinator_address=os.environ["MMJAX_COORDINATOR"],
        num_processes=int(os.environ["MMJAX_NUM_PROCESSES"]),
        process_id=int(os.environ["MMJAX_PROCESS_ID"]),
        local_device_ids=None, **timeout)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("TPU_WORKER_HOSTNAMES"):
    jax.distributed.initialize(**timeout)
