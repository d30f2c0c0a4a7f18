"""A Flink session cluster on 127.0.0.1 shaped like production's (Flink's Kubernetes
operator, infra/k8s/flink-deployment.yaml): a JobManager and 2 TaskManagers as separate
JVMs, a Beam Python worker pool beside each TaskManager (environment EXTERNAL), and Beam's
Flink job server, which the jobs submit to (`FlinkCluster.beam_args`).

What stands for what:
* a pod's own localhost: each TaskManager runs in a mount namespace whose /etc/hosts maps
  ``localhost`` to an address of its own (127.0.0.2, 127.0.0.3) where its pool listens, so
  ``--environment_config=localhost:<port>`` reaches the TaskManager's own pool, as a
  sidecar's address does in a pod;
* a remote machine's disk: TaskManagers and pools each get a private tmpfs on /tmp
  (tests/isolated.py), so only object-store URIs reach the workers;
* loopback only: Beam's Java gRPC servers (the job server's, and the Fn API servers each
  TaskManager opens for its SDK workers) bind every interface (Beam's ServerFactory calls
  NettyServerBuilder.forPort); the JVMs run with infra/flink/loopback_bind.c preloaded,
  which turns a wildcard bind into a loopback one.

The jars are `make system-deps`'s (infra/flink/fetch.sh), under .tools/. Everything stops
with the context; should the test process be killed, a reaper (mimdex.infra.reaper) kills
what it started, and each pool exits once its parent is gone.

    python tests/flink_cluster.py up      # a cluster for people: prints its Beam flags, Ctrl-C stops it
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Iterator

import psutil

from isolated import in_private_tmp, private_tmp, stop

FLINK, BEAM = "1.19.0", "2.62.0"
TOOLS = os.environ.get("MIMDEX_TOOLS") or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                       ".tools")
FLINK_HOME = os.path.join(TOOLS, f"flink-{FLINK}")
JOB_SERVER_JAR = os.path.join(TOOLS, f"beam-flink-job-server-{BEAM}", f"beam-runners-flink-1.19-job-server-{BEAM}.jar")
SHIM = os.path.join(TOOLS, "loopback_bind.so")
TASKMANAGERS = 2

CONF = """\
jobmanager.rpc.address: 127.0.0.1
jobmanager.bind-host: 127.0.0.1
jobmanager.rpc.port: {rpc}
rest.address: 127.0.0.1
rest.bind-address: 127.0.0.1
rest.port: {rest}
taskmanager.host: 127.0.0.1
taskmanager.bind-host: 127.0.0.1
taskmanager.numberOfTaskSlots: 1
parallelism.default: {tms}
jobmanager.memory.process.size: 700m
taskmanager.memory.process.size: 1200m
io.tmp.dirs: /tmp
"""
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = os.path.join(ROOT, "infra", "k8s", "flink-deployment.yaml")
OPTIONS = os.path.join(ROOT, "infra", "beam", "flink.options")
SIZES = ("taskmanager.numberOfTaskSlots",)   # the manifest's that 2 cores cannot take: ours above win


def manifest_settings() -> dict[str, str]:
    """The FlinkDeployment's flinkConfiguration (restarts, heartbeats, timeouts), but its sizes."""
    import yaml

    with open(MANIFEST) as f:
        deployment = next(d for d in yaml.safe_load_all(f) if d["kind"] == "FlinkDeployment")
    return {k: str(v) for k, v in deployment["spec"]["flinkConfiguration"].items() if k not in SIZES}
LOG4J = """\
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = File
appender.file.name = File
appender.file.type = File
appender.file.fileName = ${sys:log.file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = %d{HH:mm:ss,SSS} %-5p %-50c - %m%n
"""


def options_file_lines() -> list[str]:
    with open(OPTIONS) as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.strip().startswith("#")]


def available() -> str | None:
    """Why no cluster can start here, or None."""
    missing = [p for p in (FLINK_HOME, JOB_SERVER_JAR, SHIM) if not os.path.exists(p)]
    if missing:
        return f"the Flink cluster needs `make system-deps` (missing {', '.join(missing)})"
    if not shutil.which("java"):
        return "the Flink cluster needs Java (17) on PATH"
    if not private_tmp():
        return "TaskManagers and worker pools with their own /tmp and /etc/hosts need root and unshare"
    return None


class FlinkCluster:
    """The running cluster's addresses and processes; a TaskManager can be killed and
    started again (what the operator does when a TaskManager pod dies)."""

    def __init__(self, state: str, rest: int, job: int, pool_port: int):
        self.state, self.rest, self.job, self.pool_port = state, rest, job, pool_port
        self.processes: dict[str, subprocess.Popen] = {}

    def beam_args(self) -> list[str]:
        """infra/beam/flink.options with this cluster's addresses, and its slots as --parallelism."""
        here = {"--job_endpoint": f"127.0.0.1:{self.job}", "--environment_config": f"localhost:{self.pool_port}",
                "--parallelism": str(TASKMANAGERS)}
        args = [f"{name}={here[name]}" if name in here else line
                for line in options_file_lines() for name in [line.split("=", 1)[0]]]
        missing = set(here) - {a.split("=", 1)[0] for a in args}
        if missing:
            raise RuntimeError(f"{OPTIONS} no longer names {', '.join(sorted(missing))}")
        return args

    def rest_get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.rest}{path}", timeout=10) as resp:
            return json.load(resp)

    def jvm_pid(self, name: str) -> int:
        return self.processes[name].pid   # unshare and sh exec: the launcher's pid is the JVM's

    def sdk_workers(self, pool: int) -> list[psutil.Process]:
        """The SDK harness processes a pool runs now (each TaskManager slot's worker)."""
        try:
            return psutil.Process(self.processes[f"pool{pool}"].pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill_taskmanager(self, i: int) -> None:
        os.kill(self.jvm_pid(f"taskmanager{i}"), signal.SIGKILL)
        self.processes[f"taskmanager{i}"].wait(30)

    def start_taskmanager(self, i: int) -> None:
        self.processes[f"taskmanager{i}"] = _launch(self.state, f"taskmanager{i}", _taskmanager(self.state, i))

    def wait_for_taskmanagers(self, n: int = TASKMANAGERS, timeout: float = 120) -> None:
        _wait(lambda: self.rest_get("/overview")["taskmanagers"] == n, timeout, f"{n} TaskManagers", self)

    def log_tail(self, chars: int = 4000) -> str:
        logs = os.path.join(self.state, "log")
        out = []
        for name in sorted(os.listdir(logs)):
            with open(os.path.join(logs, name), errors="replace") as f:
                text = f.read()
            if "Exception" in text or "Error" in text:
                out.append(f"--- {name}\n{text[-chars:]}")
        return "\n".join(out)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _java(state: str, name: str, main: list[str], heap: str | None = None) -> list[str]:
    return ["java", *([f"-Xmx{heap}"] if heap else []), f"-Dlog.file={state}/log/{name}.log",
            f"-Dlog4j.configurationFile=file:{state}/conf/log4j.properties", "-cp", f"{FLINK_HOME}/lib/*", *main]


def _taskmanager(state: str, i: int) -> list[str]:
    with open(os.path.join(state, "conf", "tm-resources.json")) as f:
        jvm, dynamic = json.load(f)
    argv = _java(state, f"taskmanager{i}", ["org.apache.flink.runtime.taskexecutor.TaskManagerRunner", "--configDir",
                                            f"{state}/conf", *dynamic])
    argv[1:1] = jvm
    return in_private_tmp(argv, os.path.join(state, f"hold-tm{i}"), ((f"{state}/conf/hosts{i}", "/etc/hosts"),))


def _tm_resources(state: str) -> None:
    """The TaskManager's JVM flags and memory settings, as Flink's taskmanager.sh derives them."""
    out = subprocess.run(["java", "-cp", f"{FLINK_HOME}/bin/bash-java-utils.jar:{FLINK_HOME}/lib/*",
                          "org.apache.flink.runtime.util.bash.BashJavaUtils", "GET_TM_RESOURCE_PARAMS",
                          "--configDir", f"{state}/conf"], capture_output=True, text=True, check=True).stdout
    lines = [ln.split(":", 1)[1] for ln in out.splitlines() if ln.startswith("BASH_JAVA_UTILS_EXEC_RESULT:")]
    with open(os.path.join(state, "conf", "tm-resources.json"), "w") as f:
        json.dump([lines[0].split(), lines[1].split()], f)


def _launch(state: str, name: str, argv: list[str]) -> subprocess.Popen:
    log = open(os.path.join(state, "log", f"{name}.out"), "ab")
    with log:   # every process with the shim: Python's gRPC binds what it is told, Beam's Java does not
        return subprocess.Popen(argv, stdout=log, stderr=log, env=dict(os.environ, LD_PRELOAD=SHIM),
                                start_new_session=True)


def _wait(ready, timeout: float, what: str, cluster: FlinkCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            if ready():
                return
        for name, proc in cluster.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"Flink cluster: {name} exited with {proc.returncode}\n{cluster.log_tail()}")
        time.sleep(0.5)
    raise RuntimeError(f"Flink cluster: no {what} after {timeout:g} s\n{cluster.log_tail()}")


def _connects(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        return True


@contextlib.contextmanager
def flink_cluster() -> Iterator[FlinkCluster]:
    """Start the cluster; yield once the TaskManagers, pools and job server are up."""
    why = available()
    if why:
        raise RuntimeError(why)
    from mimdex.infra.reaper import Reaper

    state = tempfile.mkdtemp(prefix="mimdex-flink-", dir="/var/tmp")   # outside /tmp: the pods' shared view
    for sub in ("conf", "log", *(f"hold-{n}" for n in ("tm1", "tm2", "pool1", "pool2", "jobserver"))):
        os.makedirs(os.path.join(state, sub))
    cluster = FlinkCluster(state, _free_port(), _free_port(), _free_port("127.0.0.2"))
    with open(f"{state}/conf/flink-conf.yaml", "w") as f:
        f.write(CONF.format(rpc=_free_port(), rest=cluster.rest, tms=TASKMANAGERS))
        f.writelines(f"{k}: {v}\n" for k, v in manifest_settings().items())
    with open(f"{state}/conf/log4j.properties", "w") as f:
        f.write(LOG4J)
    with open("/etc/hosts") as f:
        others = [ln for ln in f.read().splitlines() if "localhost" not in ln.split()[1:]]
    for i in range(1, TASKMANAGERS + 1):
        with open(f"{state}/conf/hosts{i}", "w") as f:
            f.write("\n".join([f"127.0.0.{i + 1} localhost", *others]) + "\n")
    reaper = Reaper()
    try:
        _tm_resources(state)
        procs = cluster.processes
        procs["jobmanager"] = _launch(state, "jobmanager", _java(
            state, "jobmanager", ["org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint",
                                  "--configDir", f"{state}/conf"], heap="512m"))
        for i in range(1, TASKMANAGERS + 1):
            pool = [sys.executable, os.path.abspath(__file__), "pool", f"127.0.0.{i + 1}:{cluster.pool_port}",
                    f"{state}/log", str(os.getpid())]
            procs[f"pool{i}"] = _launch(state, f"pool{i}", in_private_tmp(pool, f"{state}/hold-pool{i}"))
            cluster.start_taskmanager(i)
        # its own pod too: what it stages (nothing, for our jobs) stays in its private /tmp
        procs["jobserver"] = _launch(state, "jobserver", in_private_tmp([
            "java", "-Xmx512m", "-jar", JOB_SERVER_JAR, f"--flink-master=127.0.0.1:{cluster.rest}",
            "--job-host=127.0.0.1", f"--job-port={cluster.job}", f"--artifact-port={_free_port()}",
            "--expansion-port=0", "--artifacts-dir=/tmp/beam-artifacts"], f"{state}/hold-jobserver"))
        cluster.wait_for_taskmanagers()
        _wait(lambda: _connects(cluster.job), 60, "job server", cluster)
        for i in range(1, TASKMANAGERS + 1):
            _wait(lambda: os.path.exists(f"{state}/log/pool-127.0.0.{i + 1}.ready"), 60, f"worker pool {i}", cluster)
        yield cluster
    finally:
        for proc in reversed(list(cluster.processes.values())):
            stop(proc)
        reaper.done()
        shutil.rmtree(state, ignore_errors=True)


def _pool(address: str, logs: str, parent: int) -> None:
    """A Beam worker pool (what `python -m apache_beam.runners.worker.worker_pool_main`
    runs in a TaskManager pod's sidecar), bound to ``address`` only: Beam's own binds
    [::], and pipes each SDK worker's stdout without reading it; here each worker writes
    to its own log. Exits when ``parent`` is gone."""
    import threading
    from concurrent import futures

    import grpc
    from apache_beam.portability.api import beam_fn_api_pb2, beam_fn_api_pb2_grpc
    from apache_beam.runners.worker.worker_pool_main import BeamFnExternalWorkerPoolServicer

    class Pool(BeamFnExternalWorkerPoolServicer):
        def StartWorker(self, request, context):
            code = ("from apache_beam.runners.worker.sdk_worker import SdkHarness; "
                    f"SdkHarness({request.control_endpoint.url!r}, worker_id={request.worker_id!r}).run()")
            name = f"{logs}/worker-{address}-{request.worker_id}-{time.time_ns()}.log"
            with open(name, "ab") as log:
                self._worker_processes[request.worker_id] = subprocess.Popen(
                    [sys.executable, "-c", code], stdout=log, stderr=log)
            return beam_fn_api_pb2.StartWorkerResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_insecure_port(address)
    beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(Pool(use_process=True), server)
    server.start()
    open(f"{logs}/pool-{address.rsplit(':', 1)[0]}.ready", "w").close()
    while psutil.pid_exists(parent):
        time.sleep(1)
    threading.Thread(target=server.stop, args=(0,), daemon=True).start()
    os._exit(0)


if __name__ == "__main__":
    if sys.argv[1:2] == ["pool"]:
        _pool(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1:2] == ["up"]:
        with flink_cluster() as c:
            print(" ".join(c.beam_args()), f"\nFlink UI: http://127.0.0.1:{c.rest}  (Ctrl-C stops it)", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    else:
        sys.exit(__doc__)
