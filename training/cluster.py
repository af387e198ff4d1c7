"""Where training runs: one process, several local GPUs, or a cluster of workers described by ``TF_CONFIG``.

A cluster trains with ``tf.distribute.MultiWorkerMirroredStrategy``. Exactly one task is the chief
(the ``chief`` task when the cluster has one, else worker 0): it alone writes the run directory,
evaluates, exports and publishes. The others write to temporary directories, as TensorFlow's
multi-worker guide prescribes, and wait for the chief before they exit.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_CLUSTER_TIMEOUT = 300.0
TRAINING_JOBS = ("chief", "worker")
ERROR_EXIT = 2
SUPERVISED_ENV = "CONVSERVE_CLUSTER_PIPE"  # set in the child of run_supervised: where it reports
FORMING, FORMED = b"f", b"r"


class ClusterError(Exception):
    """TF_CONFIG is malformed, or the cluster it describes cannot be used."""


@dataclass(frozen=True)
class Cluster:
    """This process's place in a multi-worker cluster (parsed from TF_CONFIG)."""

    jobs: dict[str, list[str]]
    task_type: str
    task_index: int

    @property
    def workers(self) -> int:
        """Tasks that train (chief and workers): each holds one replica of the model."""
        return sum(len(self.jobs.get(job, [])) for job in TRAINING_JOBS)

    @property
    def is_chief(self) -> bool:
        if "chief" in self.jobs:
            return self.task_type == "chief"
        return self.task_type == "worker" and self.task_index == 0

    @property
    def task(self) -> str:
        return f"{self.task_type} {self.task_index}"


def _address_ok(address: Any) -> bool:
    if not isinstance(address, str) or ":" not in address:
        return False
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def parse_tf_config(text: str | None) -> Cluster | None:
    """The cluster described by a TF_CONFIG value; None when it describes none (single process)."""
    if not text or not text.strip():
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ClusterError(f"TF_CONFIG is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ClusterError("TF_CONFIG must be a JSON object with \"cluster\" and \"task\"")
    jobs = config.get("cluster")
    if not jobs:
        return None
    if not isinstance(jobs, dict):
        raise ClusterError("TF_CONFIG's \"cluster\" must map job names to lists of host:port addresses")
    for job, addresses in jobs.items():
        if job not in TRAINING_JOBS:
            raise ClusterError(f"TF_CONFIG's cluster has a {job!r} job; MultiWorkerMirroredStrategy "
                               f"trains with {' and '.join(TRAINING_JOBS)} tasks only")
        if not isinstance(addresses, list) or not addresses or not all(map(_address_ok, addresses)):
            raise ClusterError(f"TF_CONFIG's cluster job {job!r} must be a non-empty list of host:port "
                               f"addresses, got {json.dumps(addresses)}")
    if len(jobs.get("chief", [])) > 1:
        raise ClusterError("TF_CONFIG's cluster may have at most one chief")
    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task:
        raise ClusterError("TF_CONFIG has a cluster but no \"task\": {\"type\": ..., \"index\": ...}")
    task_type, index = task["type"], task.get("index", 0)
    if task_type not in jobs:
        raise ClusterError(f"TF_CONFIG's task type {task_type!r} is not a job of its cluster "
                           f"({', '.join(sorted(jobs))})")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(jobs[task_type]):
        raise ClusterError(f"TF_CONFIG's task index {index!r} is out of range for the {len(jobs[task_type])} "
                           f"{task_type} task(s)")
    return Cluster(jobs={job: list(addresses) for job, addresses in jobs.items()}, task_type=task_type,
                   task_index=index)


def cluster_from_env() -> Cluster | None:
    return parse_tf_config(os.environ.get("TF_CONFIG"))


def run_supervised(argv: list[str], cluster: Cluster, timeout: float) -> int:
    """Run ``python -m training <argv>`` as a child and stop it if its cluster does not form in time.

    While a cluster forms, TensorFlow blocks in native code: it holds the GIL (no Python thread or
    signal handler runs), ignores SIGTERM, and has no timeout of its own. Only another process can
    end that wait cleanly. The child reports through a pipe when it starts forming the cluster
    (after loading its data, which may take long) and when the cluster has formed.
    """
    read_end, write_end = os.pipe()
    child = subprocess.Popen([sys.executable, "-m", "training", *argv], pass_fds=(write_end,),
                             env={**os.environ, SUPERVISED_ENV: str(write_end)})
    os.close(write_end)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, _frame: child.send_signal(number))
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        if pipe.read(1) == FORMING:  # b"" when the child exited first: its own message says why
            ready, _, _ = select.select([pipe], [], [], timeout)
            if not ready:
                child.kill()
                child.wait()
                peers = ", ".join(address for job in TRAINING_JOBS for address in cluster.jobs.get(job, []))
                print(f"error: the training cluster did not form within {timeout:g} s: {cluster.task} could not "
                      f"reach every peer ({peers}); check that every task is started with the same TF_CONFIG "
                      "and that the addresses are reachable", file=sys.stderr, flush=True)
                return ERROR_EXIT
    return child.wait()


def _report(event: bytes) -> None:
    """Tell the supervising parent process (if any) how forming the cluster goes."""
    fd = os.environ.get(SUPERVISED_ENV)
    if fd:
        try:
            os.write(int(fd), event)
        except OSError:
            pass  # no parent listening (a library caller with the variable set): nothing to report


def get_strategy(cluster: Cluster | None = None) -> Any:
    """MultiWorkerMirrored for a cluster, Mirrored over several local GPUs, else the default strategy.

    Forming a cluster blocks until every task has joined; under :func:`run_supervised` (the CLI)
    the parent gives up after its timeout.
    """
    import tensorflow as tf

    if cluster is None:
        if len(tf.config.list_physical_devices("GPU")) > 1:
            return tf.distribute.MirroredStrategy()
        return tf.distribute.get_strategy()
    _report(FORMING)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    _report(FORMED)
    log.info("%s joined a cluster of %d workers", cluster.task, cluster.workers)
    return strategy


def barrier(strategy: Any) -> None:
    """Wait until every worker reaches this point (a one-number all-reduce across the cluster)."""
    import tensorflow as tf

    def add_one() -> Any:
        return tf.distribute.get_replica_context().all_reduce("SUM", tf.constant(1.0))

    tf.function(lambda: strategy.run(add_one))()
