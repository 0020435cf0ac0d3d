"""The deployment files in infra/ against the code they deploy. There is no Docker engine and no
Kubernetes here, so nothing is built or applied: these tests parse every file and check it with
the project's own loaders and Prefect's (see infra/README.md, "What was not run here")."""
import inspect
import re
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from braceexpand import braceexpand
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .conftest import ROOT

INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
PIPELINE_CONFIG = INFRA / "config" / "pipeline.yaml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned_version(name: str) -> str:
    """The version pyproject.toml pins `name` to (`name==X`)."""
    for spec in PYPROJECT["project"]["dependencies"]:
        req = Requirement(spec)
        if canonicalize_name(req.name) == name and str(req.specifier).startswith("=="):
            return str(req.specifier).removeprefix("==")
    raise AssertionError(f"pyproject.toml does not pin {name}")


def yaml_docs(path: Path) -> list:
    return list(yaml.safe_load_all(path.read_text()))


def k8s_object(kind: str) -> dict:
    """The one object of `kind` among infra/k8s's manifests."""
    found = [d for p in sorted(K8S.glob("*.yaml")) for d in yaml_docs(p) if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in {K8S}, found {len(found)}"
    return found[0]


def flag(tokens: list[str], name: str) -> str:
    """The value after a command-line flag."""
    assert tokens.count(name) == 1, f"{name} must appear once in {tokens}"
    return tokens[tokens.index(name) + 1]


def expand_k8s_vars(tokens: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' `$(VAR)` expansion of a container command, with every variable required to be known."""
    def sub(match: re.Match) -> str:
        assert match.group(1) in env, f"$({match.group(1)}) is not a variable of the container"
        return env[match.group(1)]

    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, t) for t in tokens]


def container_env(container: dict) -> dict[str, str]:
    """Literal env values; a downward-API variable stands for its field path."""
    return {e["name"]: e.get("value", e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath"))
            for e in container["env"]}


def validated_job_config(raw: dict, workspace_mount: str, tmp_path: Path):
    """`distill.config.config_from_dict` on a job config whose paths are under `workspace_mount`:
    they are moved under tmp_path, where empty stand-ins for the selection manifest and eval shards
    are created (the job checks that they exist), since the real
    workspace does not exist here. Returns the checked DistillConfig."""
    from distill.config import config_from_dict
    from distill.losses import LOSSES

    def rebase(path: str) -> Path:
        assert path.startswith(workspace_mount + "/"), f"{path} is not in the shared workspace {workspace_mount}"
        return tmp_path / path.removeprefix(workspace_mount + "/")

    local = dict(raw)
    for key in ("selection", "out"):
        local[key] = str(rebase(raw[key]))
    if raw.get("eval") is not None:  # eval shards are checked for existence too
        patterns = raw["eval"] if isinstance(raw["eval"], list) else [raw["eval"]]
        local["eval"] = [str(rebase(p)) for p in patterns]
    for stand_in in [local["selection"], *(s for p in local.get("eval") or [] for s in braceexpand(p))]:
        Path(stand_in).parent.mkdir(parents=True, exist_ok=True)
        Path(stand_in).write_text("{}")
    cfg = config_from_dict(local, base=tmp_path)
    assert cfg.selection == local["selection"] and cfg.out == local["out"]
    # The loss block is checked by its class, as the job builds it (no model needed for this part).
    loss = dict(raw["loss"])
    cls = LOSSES[loss.pop("method")]
    cls.resolve_params({k: v for k, v in loss.items() if k not in ("weights", "extra")})
    return cfg


# --- every file ------------------------------------------------------------------------------

def test_every_yaml_file_parses_into_mappings():
    files = sorted(INFRA.rglob("*.yaml"))
    names = {str(p.relative_to(INFRA)) for p in files}
    assert {"compose.yaml", "prefect.yaml", "config/pipeline.yaml", "k8s/distill-job.yaml"} <= names
    for path in files:
        docs = yaml_docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


# --- Dockerfile -----------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    lines = [ln for ln in (INFRA / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1].strip()) for ln in joined.splitlines() if ln.strip()]


def test_dockerfile_pins_equal_pyproject_pins():
    def pins(specs) -> dict:
        reqs = [Requirement(s) for s in specs]
        return {canonicalize_name(r.name): (sorted(r.extras), str(r.specifier)) for r in reqs
                if str(r.specifier).startswith("==")}

    runs = " ".join(args for instr, args in dockerfile_instructions() if instr == "RUN")
    docker = pins(re.findall(r'"([A-Za-z0-9_.\-]+(?:\[[a-z,]+\])?==[^"]+)"', runs))
    project = pins(PYPROJECT["project"]["dependencies"])
    assert docker == project
    assert docker["prefect"] == ([], "==3.8.8") and docker["sqlalchemy"] == (["asyncio"], "==2.0.58")


def test_dockerfile_is_an_offline_non_root_webdistill_image():
    steps = dockerfile_instructions()

    def args(instruction: str) -> list[str]:
        return [a for i, a in steps if i == instruction]

    assert args("FROM") == ["python:3.11-slim"]
    assert PYPROJECT["project"]["requires-python"].startswith(">=3.11")
    env = " ".join(args("ENV"))
    for var, value in (("HF_HUB_OFFLINE", "1"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1")):
        assert re.search(rf"\b{var}={value}\b", env), f"ENV {var}={value} is missing"
    # The last USER is not root, and no RUN comes after it that would need root.
    user_at = max(i for i, (instr, _) in enumerate(steps) if instr == "USER")
    assert steps[user_at][1] not in ("root", "0") and all(i != "RUN" for i, _ in steps[user_at:])
    assert args("ENTRYPOINT") == ['["webdistill"]'] and "webdistill" in PYPROJECT["project"]["scripts"]
    # Every package that setuptools installs is copied in, from a path that exists and is not ignored.
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    sources = [a.split()[0] for a in args("COPY")]
    for src in sources:
        assert (ROOT / src).exists() and src.split("/")[0] not in ignored, f"COPY {src}"
    assert {p.split(".")[0] for p in PYPROJECT["tool"]["setuptools"]["packages"]} <= set(sources)
    assert {".venv", "workspace", ".git"} <= ignored


# --- compose --------------------------------------------------------------------------------

def test_compose_runs_a_prefect_server_on_postgres_and_a_serving_worker():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "server", "worker", "deploy", "pool-worker"}

    server = services["server"]
    assert server["image"] == f"prefecthq/prefect:{pinned_version('prefect')}-python3.11"
    db_url = server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db_url.startswith("postgresql+asyncpg://") and "@postgres:5432/" in db_url
    port = flag(server["command"], "--port")

    worker = services["worker"]
    assert (INFRA / worker["build"]["context"] / worker["build"]["dockerfile"]).resolve() == INFRA / "Dockerfile"
    assert worker["command"] == ["serve", "/config/pipeline.yaml"]
    assert "./config:/config:ro" in worker["volumes"] and PIPELINE_CONFIG.is_file()
    for name in ("worker", "deploy", "pool-worker"):
        assert services[name]["environment"]["PREFECT_API_URL"] == f"http://server:{port}/api", name
    assert {services[n]["image"] for n in ("worker", "deploy", "pool-worker")} == {worker["image"]}

    # Every `service_healthy` dependency has a healthcheck; every other condition names a real service.
    for name, service in services.items():
        for dep, cond in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert cond["condition"] in ("service_healthy", "service_completed_successfully")
            if cond["condition"] == "service_healthy":
                assert "test" in services[dep].get("healthcheck", {}), f"{dep} has no healthcheck"
    assert services["server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["server"]["condition"] == "service_healthy"
    # The named volumes the services mount are declared.
    mounted = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith(".")}
    assert mounted == set(compose["volumes"]) == {"postgres", "workspace"}


def test_compose_and_prefect_yaml_name_the_same_work_pool():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())["services"]
    pools = {d["work_pool"]["name"] for d in yaml.safe_load((INFRA / "prefect.yaml").read_text())["deployments"]}
    assert len(pools) == 1
    pool = pools.pop()
    assert flag(compose["pool-worker"]["command"], "--pool") == pool
    deploy_script = " ".join(compose["deploy"]["command"])
    assert f"work-pool create {pool} " in deploy_script and "--prefect-file infra/prefect.yaml" in deploy_script


# --- the pipeline config the compose worker serves -----------------------------------------------

def test_pipeline_config_builds_the_served_deployments(tmp_path):
    from curation.crawl import CrawlConfig
    from curation.index import IndexConfig
    from curation.policies import parse_policy
    from curation.score import ScoreConfig
    from flows.pipeline import load_pipeline_config
    from flows.serve import build_deployments
    from flows.stages import embed_flow

    cfg = load_pipeline_config(PIPELINE_CONFIG)
    s = cfg.sections
    CrawlConfig(**{k: v for k, v in s["crawl"].items() if k not in ("url_list", "out")})
    IndexConfig(**s["index"])
    ScoreConfig(teacher=s["score"]["teacher"], **s["score"].get("options", {}))
    assert set(s["embed"]) <= set(inspect.signature(embed_flow.fn).parameters)
    assert [step.kind for step in parse_policy(s["select"]["policy"])] == ["dedup", "kd3", "balance"]
    # The distill section becomes a job config as flows.stage_runner.run_distill writes it.
    options = {k: v for k, v in s["distill"].items() if k != "nproc"}
    job = {"selection": f"{cfg.workspace}/selections/x/manifest.json", "out": f"{cfg.workspace}/students/x",
           "name": "x", "progress": False, **options}
    validated_job_config(job, cfg.workspace, tmp_path)

    deployments = build_deployments(str(PIPELINE_CONFIG))
    crons = {d.name: d.schedules[0].schedule.cron for d in deployments}
    assert crons == {"nightly-crawl": "0 2 * * *", "nightly-curation": "0 3 * * *", "nightly-distill": "0 5 * * 0"}


# --- prefect.yaml ---------------------------------------------------------------------------

def prefect_deployments() -> list[dict]:
    """infra/prefect.yaml through the model `prefect deploy` validates it with."""
    from prefect.cli.deploy._models import PrefectYamlModel

    raw = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(raw)  # raises on a malformed file (the CLI only warns)
    assert model.prefect_version == pinned_version("prefect") and len(model.deployments) == len(raw["deployments"])
    return [d.model_dump(exclude_unset=True, mode="json") for d in model.deployments]


def test_prefect_yaml_entrypoints_are_flows_with_matching_parameters(monkeypatch):
    import prefect
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)  # entrypoints are relative to where `prefect deploy` runs
    deployments = prefect_deployments()
    assert {d["entrypoint"] for d in deployments} == {
        "flows/crawl_flow.py:crawl_config_flow", "flows/pipeline.py:curation_flow", "flows/pipeline.py:pipeline_flow"}
    for d in deployments:
        flow = load_flow_from_entrypoint(d["entrypoint"])
        assert isinstance(flow, prefect.Flow), d["entrypoint"]
        params = inspect.signature(flow.fn).parameters
        required = {n for n, p in params.items() if p.default is inspect.Parameter.empty}
        assert required <= set(d["parameters"]) <= set(params), d["entrypoint"]
        assert d["parameters"] == {"config_path": "/config/pipeline.yaml"}
        assert d["work_pool"]["name"] == "webdistill"
    pull = yaml.safe_load((INFRA / "prefect.yaml").read_text())["pull"]
    assert pull == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/webdistill"}}]
    assert re.search(r"^WORKDIR /opt/webdistill$", (INFRA / "Dockerfile").read_text(), re.M)


def test_prefect_yaml_crons_parse_and_fire_when_expected():
    from prefect._vendor.croniter import croniter
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.client.schemas.schedules import CronSchedule

    start = datetime(2025, 1, 1, tzinfo=UTC)  # a Wednesday, 00:00 UTC
    expected_next = {"flows/crawl_flow.py:crawl_config_flow": datetime(2025, 1, 1, 2, tzinfo=UTC),
                     "flows/pipeline.py:curation_flow": datetime(2025, 1, 1, 3, tzinfo=UTC),
                     "flows/pipeline.py:pipeline_flow": datetime(2025, 1, 5, 5, tzinfo=UTC)}  # Sunday
    for d in prefect_deployments():
        [config] = d["schedules"]
        schedule = _schedule_config_to_deployment_schedule(config)["schedule"]
        assert isinstance(schedule, CronSchedule) and schedule.timezone == "UTC"
        assert croniter(schedule.cron, start).get_next(datetime) == expected_next[d["entrypoint"]]


def test_prefect_yaml_and_serve_schedule_the_same_flows_at_the_same_times():
    """`prefect deploy` (prefect.yaml) and `webdistill serve` (pipeline.yaml) are two routes to one schedule."""
    from flows.serve import build_deployments

    served = {d.entrypoint: d.schedules[0].schedule.cron for d in build_deployments(str(PIPELINE_CONFIG))}
    deployed = {d["entrypoint"]: d["schedules"][0]["cron"] for d in prefect_deployments()}
    assert deployed == served


# --- Kubernetes -----------------------------------------------------------------------------

def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(manifests)
    kinds = {d["kind"] for name in manifests for d in yaml_docs(K8S / name)}
    assert kinds == {"Job", "Service", "ConfigMap", "PersistentVolumeClaim"}


def test_job_is_indexed_with_a_headless_rendezvous_service():
    job, service = k8s_object("Job"), k8s_object("Service")
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    command = container["command"]
    nnodes, nproc = int(flag(command, "--nnodes")), int(flag(command, "--nproc-per-node"))
    host, port = flag(command, "--rdzv-endpoint").rsplit(":", 1)

    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["parallelism"] == job["spec"]["completions"] == nnodes >= 2
    # Pod i of an indexed Job is named <job>-<i>; with the subdomain it resolves under the Service.
    assert pod["subdomain"] == service["metadata"]["name"]
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert int(port) == service["spec"]["ports"][0]["port"] == container["ports"][0]["containerPort"]
    # One rank per GPU.
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == nproc
    # The workspace PVC is shared by every node, and the ConfigMap is the job config's folder.
    pvc, configmap = k8s_object("PersistentVolumeClaim"), k8s_object("ConfigMap")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}

    def volume_of(source: str, key: str, name: str) -> str:
        [volume] = [v["name"] for v in pod["volumes"] if v.get(source, {}).get(key) == name]
        return volume

    pvc_volume = volume_of("persistentVolumeClaim", "claimName", pvc["metadata"]["name"])
    config_volume = volume_of("configMap", "name", configmap["metadata"]["name"])
    config_path = Path(command[-1])
    assert str(config_path.parent) == mounts[config_volume] and config_path.name in configmap["data"]
    assert mounts[pvc_volume] == container_env(container)["WEBDISTILL_WORKSPACE"]


def test_job_command_is_torchrun_command_for_each_node():
    from distill.launch import torchrun_command

    job = k8s_object("Job")
    [container] = job["spec"]["template"]["spec"]["containers"]
    command, env = container["command"], container_env(container)
    # The two variables the command takes from the pod, each from the field Kubernetes sets.
    assert env["JOB_COMPLETION_INDEX"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["RDZV_ID"] == "metadata.labels['controller-uid']"
    nnodes, nproc = int(flag(command, "--nnodes")), int(flag(command, "--nproc-per-node"))
    endpoint, config_path = flag(command, "--rdzv-endpoint"), command[-1]
    rdzv_id = "0d6c1f4e-uid-of-this-job"
    for index in range(nnodes):
        pod_values = dict(env, JOB_COMPLETION_INDEX=str(index), RDZV_ID=rdzv_id)
        expected = torchrun_command(config_path, nproc, nnodes, index, endpoint, rdzv_id)
        assert expected[0] == sys.executable
        assert expand_k8s_vars(command, pod_values) == ["python", *expected[1:]], f"node {index}"
    assert flag(command, "--node-rank") == "$(JOB_COMPLETION_INDEX)"


def test_configmap_job_config_passes_the_job_validation(tmp_path):
    from distill.config import ConfigError

    configmap, job = k8s_object("ConfigMap"), k8s_object("Job")
    [container] = job["spec"]["template"]["spec"]["containers"]
    workspace = container_env(container)["WEBDISTILL_WORKSPACE"]
    raw = yaml.safe_load(configmap["data"]["job.yaml"])
    cfg = validated_job_config(raw, workspace, tmp_path / "ok")
    assert (cfg.student, cfg.teacher_mode, cfg.epochs, cfg.loss) == ("torchvision:resnet18", "stored", 30,
                                                                     {"method": "kd", "T": 4.0})
    # The same check refuses a misspelt key: it is not a formality.
    with pytest.raises(ConfigError, match="unknown config key 'epoch'"):
        validated_job_config({**raw, "epoch": 3}, workspace, tmp_path / "bad")
