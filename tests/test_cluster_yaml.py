"""cluster.yaml: valid for Ray's cluster launcher, every local path it names exists, and its safety properties hold.

Besides the JSON schema, the config goes through what `ray up` runs before it touches AWS (`prepare_config`,
`validate_config`) and through the autoscaler v2 scheduler, to show which node types Ray really picks. Those are
Ray internals, which is acceptable because ray is pinned (2.60.0) and a break would show here first.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
from ray.autoscaler.v2.utils import ResourceRequestUtil
from ray.core.generated.autoscaler_pb2 import ResourceRequestByCount

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


def test_docker_image_is_a_gpu_image_of_the_pinned_ray(config):
    version = re.search(r'"ray\[[\w,]+\]==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    image = config["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{version}-") and image.endswith("-gpu"), image
    assert "head_image" not in config["docker"] and "worker_image" not in config["docker"]


# ----------------------------------------------------------------------------------------------- local paths


def test_every_local_path_it_names_exists(config):
    """file_mounts sources, rsync filter files, and every repository path named anywhere in the file, comments
    included (the usage lines there are what people copy)."""
    named = {f"file_mounts source for {remote}": source for remote, source in config["file_mounts"].items()}
    named |= {"rsync_filter file": name for name in config["rsync_filter"]}
    text = CLUSTER_YAML.read_text()
    named |= {f"repository path {m}": m for m in re.findall(r"(?<![\w/])(?:jobs|ops|benchmarks|configs)/[\w./-]*\w", text)}
    assert any(label.startswith("repository path jobs/") for label in named), "the usage lines should name the job scripts"
    missing = sorted(f"{label}: {path}" for label, path in named.items() if not (REPO / path).exists())
    assert not missing, "cluster.yaml names paths missing from the repository:\n  " + "\n  ".join(missing)


def test_setup_installs_the_mounted_repository(config):
    repo_mounts = [remote for remote, source in config["file_mounts"].items() if (REPO / source).resolve() == REPO]
    assert len(repo_mounts) == 1
    assert f"pip install -q -e {repo_mounts[0]}" in config["setup_commands"]


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
        disable_launch_config_check=True, node_type_configs=types, max_num_nodes=max_nodes,
        resource_requests=[ResourceRequestByCount(request=ResourceRequestUtil.make(demand), count=1)],
        cloud_resource_availabilities=availability, recoverable_resource_availabilities=availability)
    return [launch.instance_type for launch in ResourceDemandScheduler().schedule(request).to_launch]


def test_autoscaler_takes_spot_first_and_on_demand_when_spot_fails(config):
    autoscaling = AutoscalingConfig(prepare_config(config))
    types, max_nodes = autoscaling.get_node_type_configs(), autoscaling.get_max_num_worker_nodes()
    for kind, spot, on_demand in (("H100", "gpu-h100-spot", "gpu-h100-ondemand"),
                                  ("A100", "gpu-a100-spot", "gpu-a100-ondemand")):
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
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|aws_access_key_id|BEGIN [A-Z ]*PRIVATE KEY",
                         text, re.IGNORECASE)
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


def test_head_policy_is_scoped_to_this_cluster_and_region(config):
    statements = _statements("head-autoscaler-policy.json")
    assert not any(a.startswith("s3:") for s in statements for a in _as_list(s["Action"])), "S3 is bucket-policy's job"
    terminate = next(s for s in statements if "ec2:TerminateInstances" in _as_list(s["Action"]))
    assert terminate["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == config["cluster_name"]
    launch = next(s for s in statements if "ec2:RunInstances" in _as_list(s["Action"]))
    assert launch["Condition"]["StringEquals"]["aws:RequestedRegion"] == config["provider"]["region"]
    pass_role = next(s for s in statements if _as_list(s["Action"]) == ["iam:PassRole"])
    assert pass_role["Resource"].endswith(":role/concerto-ray-worker")
    for statement in statements:
        assert not any(a.endswith(":*") or a == "*" for a in _as_list(statement["Action"])), statement
