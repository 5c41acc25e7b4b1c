"""cluster.yaml: valid for Ray's cluster launcher, every local path it names exists, and its safety properties hold.

Besides the JSON schema, the config goes through what `ray up` runs before it touches AWS (`prepare_config`,
`validate_config`) and through the autoscaler v2 scheduler, to show which node types Ray really picks. Those are
Ray internals, which is acceptable because ray is pinned (2.60.0) and a break would show here first.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import tomllib
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME, TAG_RAY_NODE_KIND, TAG_RAY_NODE_STATUS
from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
from ray.autoscaler.v2.utils import ResourceRequestUtil
from ray.core.generated.autoscaler_pb2 import ResourceRequestByCount

from concerto_ray.spot_watcher import ON_DEMAND_RESOURCE
from concerto_ray.train.config import RunSettings
from concerto_ray.train.trainer import scaling_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
IAM = REPO / "ops" / "iam"
DASHBOARD_PORT = 8265
GPU_INSTANCE_FAMILIES = ("p", "g", "trn", "inf", "dl")  # AWS families with accelerators


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def node_types(config) -> dict:
    return config["available_node_types"]


def _is_spot(node_type: dict) -> bool:
    return node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"


def _gpu_types(node_types: dict) -> dict:
    return {name: t for name, t in node_types.items() if t["resources"].get("GPU", 0) > 0}


# ------------------------------------------------------------------------------------------------ validity


def test_validates_against_rays_own_schema(config):
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)


def test_passes_the_checks_ray_up_runs_before_launching(config):
    validate_config(prepare_config(config))


# ----------------------------------------------------------------------------------------------- local paths


def test_every_local_path_it_names_exists(config):
    """file_mounts sources, rsync filter files, and every repository path named anywhere in the file, comments
    included (the usage lines there are what people copy)."""
    # Sources in the user's home (Ray's token) are not the repository's: test_token_authentication checks those.
    named = {
        f"file_mounts source for {remote}": source
        for remote, source in config["file_mounts"].items()
        if not source.startswith("~")
    }
    named |= {f"rsync_filter file {name}": name for name in config.get("rsync_filter", [])}
    text = CLUSTER_YAML.read_text()
    named |= {
        f"repository path {m}": m for m in re.findall(r"(?<![\w/])(?:jobs|ops|benchmarks|configs)/[\w./-]*\w", text)
    }
    assert any(label.startswith("repository path jobs/") for label in named), (
        "the usage lines should name the job scripts"
    )
    missing = sorted(f"{label}: {path}" for label, path in named.items() if not (REPO / path).exists())
    assert not missing, "cluster.yaml names paths missing from the repository:\n  " + "\n  ".join(missing)


# ------------------------------------------------------------------------------------------------- safety


def test_no_ingress_from_anywhere_except_ssh(config):
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        ranges = [r["CidrIp"] for r in rule.get("IpRanges", [])] + [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
        ports = range(rule.get("FromPort", 0), rule.get("ToPort", 65535) + 1)
        assert DASHBOARD_PORT not in ports or not ranges, f"rule opens the dashboard port: {rule}"
        if any(ipaddress.ip_network(cidr).prefixlen == 0 for cidr in ranges):
            assert (rule.get("FromPort"), rule.get("ToPort")) == (22, 22), f"rule open to the internet: {rule}"


def test_dashboard_binds_to_localhost_and_no_port_is_published(config):
    start = " ".join(config["head_start_ray_commands"])
    assert re.search(r"--dashboard-host[= ](127\.0\.0\.1|localhost)\b", start), start
    every_command = json.dumps({k: v for k, v in config.items() if k.endswith("commands")})
    assert "0.0.0.0" not in every_command
    for option in config["docker"].get("run_options", []):
        assert not re.match(r"(-p|--publish)\b", option), option


def test_head_is_cpu_only(config, node_types):
    head = node_types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    family = head["node_config"]["InstanceType"].split(".")[0]
    assert not family.startswith(GPU_INSTANCE_FAMILIES), family


def test_each_gpu_kind_has_a_preferred_spot_type_and_an_on_demand_fallback(node_types):
    by_instance: dict[str, dict[str, dict]] = {}
    for name, node_type in _gpu_types(node_types).items():
        market = "spot" if _is_spot(node_type) else "on-demand"
        assert market not in by_instance.get(node_type["node_config"]["InstanceType"], {}), name
        by_instance.setdefault(node_type["node_config"]["InstanceType"], {})[market] = node_type
    assert set(by_instance) == {"p5.48xlarge", "p4d.24xlarge"}
    for instance, markets in by_instance.items():
        assert set(markets) == {"spot", "on-demand"}, instance
        spot, on_demand = markets["spot"], markets["on-demand"]
        assert spot["resources"] == on_demand["resources"] and spot["resources"]["GPU"] == 8
        assert spot.get("priority", 0) > on_demand.get("priority", 0), instance


def _launches(types, max_nodes: int, demand: dict, spot_unavailable: tuple[str, ...] = ()) -> list[str]:
    availability = {name: 0.0 for name in spot_unavailable}
    request = SchedulingRequest(
        disable_launch_config_check=True,
        node_type_configs=types,
        max_num_nodes=max_nodes,
        resource_requests=[ResourceRequestByCount(request=ResourceRequestUtil.make(demand), count=1)],
        cloud_resource_availabilities=availability,
        recoverable_resource_availabilities=availability,
    )
    return [launch.instance_type for launch in ResourceDemandScheduler().schedule(request).to_launch]


def test_autoscaler_takes_spot_first_and_on_demand_when_spot_fails(config):
    autoscaling = AutoscalingConfig(prepare_config(config))
    types, max_nodes = autoscaling.get_node_type_configs(), autoscaling.get_max_num_worker_nodes()
    for kind, spot, on_demand in (
        ("H100", "gpu-h100-spot", "gpu-h100-ondemand"),
        ("A100", "gpu-a100-spot", "gpu-a100-ondemand"),
    ):
        demand = {"GPU": 8, f"accelerator_type:{kind}": 1}
        assert _launches(types, max_nodes, demand) == [spot]
        assert _launches(types, max_nodes, demand, spot_unavailable=(spot,)) == [on_demand]
    cpu_only = _launches(types, max_nodes, {"CPU": 8})
    assert len(cpu_only) == 1 and cpu_only[0] not in _gpu_types(config["available_node_types"])


def test_autoscaling_bounds(config, node_types):
    assert 0 < config["idle_timeout_minutes"] <= 15
    workers = {name: t for name, t in node_types.items() if name != config["head_node_type"]}
    assert all(0 <= t.get("min_workers", 0) <= t["max_workers"] for t in workers.values())
    assert sum(t.get("min_workers", 0) for t in workers.values()) == 0, "GPU nodes should not run while idle"
    assert 0 < config["max_workers"] <= sum(t["max_workers"] for t in workers.values())


def test_no_secrets_in_the_file(config):
    text = CLUSTER_YAML.read_text()
    assert not re.search(
        r"AKIA[0-9A-Z]{16}|aws_secret_access_key|aws_access_key_id|BEGIN [A-Z ]*PRIVATE KEY", text, re.IGNORECASE
    )
    assert "ssh_private_key" not in config["auth"]


# -------------------------------------------------------------------------------------------------- IAM


def test_every_node_has_an_instance_profile_and_only_the_head_may_launch(config, node_types):
    profiles = {name: t["node_config"]["IamInstanceProfile"]["Name"] for name, t in node_types.items()}
    head_profile = profiles.pop(config["head_node_type"])
    assert set(profiles.values()) == {"concerto-ray-worker"} and head_profile == "concerto-ray-head"


def _statements(policy_file: str) -> list[dict]:
    return json.loads((IAM / policy_file).read_text())["Statement"]


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def test_bucket_policy_reaches_exactly_one_bucket():
    buckets = set()
    for statement in _statements("bucket-policy.json"):
        actions, resources = _as_list(statement["Action"]), _as_list(statement["Resource"])
        assert all(a.startswith("s3:") and "*" not in a for a in actions), actions
        for resource in resources:
            assert resource.startswith("arn:aws:s3:::"), resource
            buckets.add(resource.removeprefix("arn:aws:s3:::").split("/")[0])
    assert len(buckets) == 1 and "*" not in next(iter(buckets)), buckets


def test_head_policy_has_no_wildcard_actions_and_no_s3():
    statements = _statements("head-autoscaler-policy.json")
    assert not any(a.startswith("s3:") for s in statements for a in _as_list(s["Action"])), "S3 is bucket-policy's job"
    for statement in statements:
        assert not any(a.endswith(":*") or a == "*" for a in _as_list(statement["Action"])), statement
    pass_role = next(s for s in statements if _as_list(s["Action"]) == ["iam:PassRole"])
    assert pass_role["Resource"].endswith(":role/concerto-ray-worker")


# What the head's policy allows, decided by a small evaluator of exactly the IAM features the policy uses (Allow
# statements, wildcard actions/resources, and the condition operators below); an operator it does not know fails
# the test rather than being ignored. Each request names one resource, as IAM authorizes each resource of a call.


def _condition_holds(operator: str, value, expected: list[str]) -> bool:
    if operator == "StringEquals":  # single-valued keys; a missing key never matches
        return isinstance(value, str) and value in expected
    if operator == "ForAllValues:StringNotEquals":  # multi-valued keys such as aws:TagKeys
        return all(v not in expected for v in value or [])
    raise AssertionError(f"the test's evaluator does not know the condition operator {operator}")


def _allows(action: str, resource: str, context: dict) -> bool:
    context = {"aws:RequestedRegion": resource.split(":")[3], **context}  # a global key, present in every request
    for statement in _statements("head-autoscaler-policy.json"):
        assert statement["Effect"] == "Allow" and "NotAction" not in statement and "NotResource" not in statement
        if not any(fnmatch.fnmatchcase(action, a) for a in _as_list(statement["Action"])):
            continue
        if not any(fnmatch.fnmatchcase(resource, r) for r in _as_list(statement["Resource"])):
            continue
        if all(
            _condition_holds(op, context.get(key), _as_list(expected))
            for op, conditions in statement.get("Condition", {}).items()
            for key, expected in conditions.items()
        ):
            return True
    return False


@pytest.fixture(scope="module")
def cluster(config, node_types):
    """The names the policy must agree with, read from cluster.yaml and from Ray's AWS node provider."""
    workers = {t["node_config"]["InstanceType"] for name, t in node_types.items() if name != config["head_node_type"]}
    region = config["provider"]["region"]
    return {
        "name": config["cluster_name"],
        "region": region,
        "worker_types": workers,
        "instance": f"arn:aws:ec2:{region}:111122223333:instance/i-0123456789abcdef0",
    }


def _launch_allowed(cluster: dict, instance_type: str, tags: dict[str, str]) -> bool:
    """RunInstances of one worker with Ray's launch tags: every resource the call touches must be allowed."""
    region = cluster["region"]
    instance = _allows(
        "ec2:RunInstances",
        cluster["instance"],
        {"ec2:InstanceType": instance_type, **{f"aws:RequestTag/{k}": v for k, v in tags.items()}},
    )
    tagged = _allows(
        "ec2:CreateTags", cluster["instance"], {"ec2:CreateAction": "RunInstances", "aws:TagKeys": list(tags)}
    )
    others = all(
        _allows("ec2:RunInstances", f"arn:aws:ec2:{region}:111122223333:{kind}/x", {})
        for kind in ("subnet", "network-interface", "security-group", "volume", "spot-instances-request")
    )
    return instance and tagged and others and _allows("ec2:RunInstances", f"arn:aws:ec2:{region}::image/ami-1", {})


def test_head_may_launch_exactly_the_worker_types_of_cluster_yaml_tagged_for_this_cluster(cluster):
    ray_tags = {TAG_RAY_CLUSTER_NAME: cluster["name"], TAG_RAY_NODE_KIND: "worker", TAG_RAY_NODE_STATUS: "pending"}
    for instance_type in cluster["worker_types"]:
        assert _launch_allowed(cluster, instance_type, ray_tags), instance_type
    assert not _launch_allowed(cluster, "x2iedn.32xlarge", ray_tags), "a type cluster.yaml does not name"
    assert not _launch_allowed(cluster, "p5.48xlarge", {TAG_RAY_NODE_KIND: "worker"}), "no cluster tag"
    assert not _launch_allowed(cluster, "p5.48xlarge", {**ray_tags, TAG_RAY_CLUSTER_NAME: "other"}), "other cluster"
    other_region = {
        **cluster,
        "region": "eu-west-1",
        "instance": cluster["instance"].replace(cluster["region"], "eu-west-1"),
    }
    assert not _launch_allowed(other_region, "p5.48xlarge", ray_tags), "another region"
    conditions = [
        s["Condition"]["StringEquals"]["ec2:InstanceType"]
        for s in _statements("head-autoscaler-policy.json")
        if "ec2:InstanceType" in s.get("Condition", {}).get("StringEquals", {})
    ]
    assert [set(c) for c in conditions] == [cluster["worker_types"]], "the policy's types are cluster.yaml's"


def test_head_may_retag_only_this_clusters_nodes_and_never_their_cluster_tag(cluster):
    ours, untagged = {f"ec2:ResourceTag/{TAG_RAY_CLUSTER_NAME}": cluster["name"]}, {}

    def retag(resource_tags: dict, *keys: str) -> bool:  # CreateTags on a running instance, after its launch
        return _allows("ec2:CreateTags", cluster["instance"], {**resource_tags, "aws:TagKeys": list(keys)})

    assert retag(ours, TAG_RAY_NODE_STATUS) and retag(ours, "Name")  # what Ray's node provider updates
    assert not retag(untagged, TAG_RAY_NODE_STATUS), "tagged an instance of someone else"
    assert not retag(untagged, TAG_RAY_CLUSTER_NAME), "claimed an instance for the cluster (then could terminate it)"
    assert not retag(ours, TAG_RAY_CLUSTER_NAME), "changed the cluster tag of a node"
    assert not retag(ours, TAG_RAY_NODE_STATUS, TAG_RAY_CLUSTER_NAME)
    assert not _allows("ec2:DeleteTags", cluster["instance"], ours)


def test_head_may_terminate_only_this_clusters_nodes(config, cluster):
    def terminate(tags: dict, resource: str = cluster["instance"]) -> bool:
        return _allows("ec2:TerminateInstances", resource, tags)

    assert terminate({f"ec2:ResourceTag/{TAG_RAY_CLUSTER_NAME}": cluster["name"]})
    assert not terminate({})
    assert not terminate({f"ec2:ResourceTag/{TAG_RAY_CLUSTER_NAME}": "other"})
    assert not terminate(
        {f"ec2:ResourceTag/{TAG_RAY_CLUSTER_NAME}": cluster["name"]},
        cluster["instance"].replace(cluster["region"], "eu-west-1"),
    )
    # Nodes are terminated, never stopped (cache_stopped_nodes: false), so stopping is not granted either.
    assert config["provider"]["cache_stopped_nodes"] is False
    assert not _allows(
        "ec2:StopInstances", cluster["instance"], {f"ec2:ResourceTag/{TAG_RAY_CLUSTER_NAME}": cluster["name"]}
    )


# ----------------------------------------------------------------------------------------------- token auth


def test_token_authentication_is_on_with_a_token_from_outside_the_repository(config):
    """Every container runs Ray with RAY_AUTH_MODE=token, reading the token from a file that `ray up` copies from
    the user's home directory; no token is written in the repository."""
    options = config["docker"]["run_options"]
    assert "--env RAY_AUTH_MODE=token" in options
    token_path = next(o.split("=", 1)[1] for o in options if o.startswith("--env RAY_AUTH_TOKEN_PATH="))
    source = config["file_mounts"][token_path]
    assert source.startswith("~/"), source  # `ray up` expands it on the user's machine
    assert REPO not in Path(source).expanduser().resolve().parents
    for name in ("head_run_options", "worker_run_options"):
        assert not any("RAY_AUTH" in o for o in config["docker"].get(name, [])), f"{name} must not override auth"
    every_command = json.dumps({k: v for k, v in config.items() if k.endswith("commands")})
    assert "RAY_AUTH_TOKEN=" not in every_command and "RAY_AUTH_MODE=disabled" not in every_command


def test_the_dashboard_train_view_has_records(config):
    """Ray Train writes the records of the dashboard's Train view only when its driver has state tracking on: every
    container (job drivers run in the head's) gets it."""
    assert "--env RAY_TRAIN_ENABLE_STATE_TRACKING=1" in config["docker"]["run_options"]
    for name in ("head_run_options", "worker_run_options"):
        assert not any("RAY_TRAIN_ENABLE_STATE_TRACKING" in o for o in config["docker"].get(name, [])), name


def test_workers_of_an_accelerator_type_land_on_that_gpu_kind(config):
    """run.accelerator_type reaches Ray Train's ScalingConfig, whose per-worker demand the autoscaler serves with a
    node type of exactly that GPU."""
    autoscaling = AutoscalingConfig(prepare_config(config))
    types, max_nodes = autoscaling.get_node_type_configs(), autoscaling.get_max_num_worker_nodes()
    for kind, node_type in (("H100", "gpu-h100-spot"), ("A100", "gpu-a100-spot")):
        run = RunSettings(name="r", storage_path="/tmp/r", num_workers=8, use_gpu=True, accelerator_type=kind)
        demand = scaling_config(run)._resources_per_worker_not_none
        assert demand[f"accelerator_type:{kind}"] > 0
        assert _launches(types, max_nodes, demand) == [node_type]
    with pytest.raises(ValueError, match="needs use_gpu"):
        RunSettings(name="r", storage_path="/tmp/r", accelerator_type="H100")


# ------------------------------------------------------------------------------------------------- the image


def _pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name: str(Requirement(d).specifier) for d in deps}


def test_the_cluster_runs_the_image_of_ops_docker_with_everything_pinned(config):
    dockerfile = (REPO / "ops" / "docker" / "Dockerfile").read_text()
    constraints = {
        Requirement(line).name: Requirement(line)
        for line in (REPO / "ops" / "docker" / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    base = re.search(r"^FROM rayproject/ray:([\d.]+)-py3(\d+)-gpu$", dockerfile, re.MULTILINE)
    assert base, "the image builds on Ray's GPU image"
    pins = _pyproject_pins()
    assert f"=={base.group(1)}" == pins["ray"] == str(constraints["ray"].specifier)
    for name, requirement in constraints.items():
        assert str(requirement.specifier).startswith("=="), f"{name} is not pinned exactly"
    python = f"3.{base.group(2)}"
    for dependency in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(dependency)
        if requirement.marker and not requirement.marker.evaluate({"python_version": python}):
            assert requirement.name not in constraints, f"{requirement.name} is not for Python {python}"
            continue
        assert requirement.name in constraints, f"{requirement.name} has no pin for the image"
        pinned = next(iter(constraints[requirement.name].specifier)).version
        assert requirement.specifier.contains(pinned), f"{requirement.name}=={pinned} breaks pyproject's {dependency}"
    assert "torch" in constraints and "pip install" in dockerfile and "/home/ray/concerto-ray" in dockerfile
    assert "torch.version.cuda" in dockerfile, "the build checks that torch is a CUDA build"
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert re.fullmatch(
        rf"[\w.-]+\.dkr\.ecr\.{config['provider']['region']}\.amazonaws\.com/concerto-ray:{version}",
        config["docker"]["image"],
    ), config["docker"]["image"]
    assert "head_image" not in config["docker"] and "worker_image" not in config["docker"]
    assert not config.get("setup_commands"), "nothing is installed at boot: the image carries it"


# --------------------------------------------------------------------------------------------- spot preemption


def test_every_worker_runs_the_spot_watcher_after_joining_the_cluster(config):
    commands = config["worker_start_ray_commands"]
    joins = next(i for i, c in enumerate(commands) if "ray start --address" in c)
    watcher = next(i for i, c in enumerate(commands) if "python -m concerto_ray.spot_watcher" in c)
    assert watcher > joins and commands[watcher].rstrip().endswith("&"), "started after ray start, in the background"
    assert all("worker_start_ray_commands" not in t for t in config["available_node_types"].values()), (
        "no node type may start without the watcher"
    )


def test_trial_drivers_can_only_land_on_capacity_that_is_not_spot(config, node_types):
    offering = {name for name, t in node_types.items() if t["resources"].get(ON_DEMAND_RESOURCE, 0) > 0}
    assert config["head_node_type"] in offering
    assert not any(_is_spot(node_types[name]) for name in offering)
    autoscaling = AutoscalingConfig(prepare_config(config))
    launched = _launches(
        autoscaling.get_node_type_configs(), autoscaling.get_max_num_worker_nodes(), {ON_DEMAND_RESOURCE: 0.01}
    )
    assert launched and all(name in offering and not _gpu_types(node_types).get(name) for name in launched)
