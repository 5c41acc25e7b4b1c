"""Drain this Ray node when AWS gives its two-minute spot interruption notice, so that Ray Train sees a preemption.

AWS announces a spot reclaim about two minutes ahead in the instance metadata (``spot/instance-action``, read through
IMDSv2's session token). On that notice the watcher asks the GCS to drain the node with reason PREEMPTION and the
reclaim time as deadline: the same request `ray drain-node` sends. Ray then schedules nothing new there, and Ray
Train treats the lost workers as a preemption (retried under FailureConfig.max_preemption_failures, not counted
against max_failures) and restarts from the latest checkpoint on other nodes.

cluster.yaml starts it on every worker node after `ray start`; on on-demand nodes the notice never comes:

    python -m concerto_ray.spot_watcher            # --interval 5, --imds-url http://169.254.169.254

It drains the one Ray node of its machine. Where several Ray nodes share a machine (a test cluster, several
`ray start` on one host), name the node with `--node-id` (its hex id, as `ray list nodes` shows it).
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

IMDS_URL = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
NOTICE_PATH = "/latest/meta-data/spot/instance-action"
TOKEN_TTL_S = 21600  # IMDSv2's maximum; a token is fetched per poll anyway, so expiry never matters
POLL_INTERVAL_S = 5.0  # AWS suggests polling every 5 s; the notice comes ~120 s ahead

# cluster.yaml gives this custom resource to the head and to the on-demand CPU nodes only, never to a spot node:
# small long-lived processes that must outlive a spot reclaim (sweep trial drivers) ask for a share of it.
ON_DEMAND_RESOURCE = "on_demand"

logger = logging.getLogger(__name__)


def on_demand_placement(cpus: float) -> dict[str, float]:
    """Resources for a small process that must not die with a spot node: a share of ON_DEMAND_RESOURCE and no CPU
    (the head offers none) on a cluster that has it, else `cpus` (a local Ray)."""
    import ray

    if ray.cluster_resources().get(ON_DEMAND_RESOURCE, 0) > 0:
        return {"CPU": 0, ON_DEMAND_RESOURCE: 0.01}
    return {"CPU": cpus}


@dataclass(frozen=True)
class Notice:
    action: str  # "terminate", "stop" or "hibernate"
    deadline_ms: int  # when AWS reclaims the instance, in ms since the epoch


def read_notice(base_url: str = IMDS_URL, timeout_s: float = 2.0) -> Notice | None:
    """The pending spot interruption notice of this instance, or None (IMDS answers 404 until there is one)."""
    token_request = urllib.request.Request(
        f"{base_url}{TOKEN_PATH}", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)}
    )
    with urllib.request.urlopen(token_request, timeout=timeout_s) as response:
        token = response.read().decode()
    notice_request = urllib.request.Request(f"{base_url}{NOTICE_PATH}", headers={"X-aws-ec2-metadata-token": token})
    try:
        with urllib.request.urlopen(notice_request, timeout=timeout_s) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
    reclaim = datetime.fromisoformat(body["time"].replace("Z", "+00:00"))
    return Notice(action=body["action"], deadline_ms=int(reclaim.timestamp() * 1000))


def drain_this_node(notice: Notice, gcs_address: str, node_id: str) -> None:
    """Ask the GCS to drain `node_id` as preempted by `notice.deadline_ms` (what `ray drain-node` sends)."""
    import ray._raylet
    from ray.core.generated import autoscaler_pb2

    accepted, rejection = ray._raylet.GcsClient(address=gcs_address).drain_node(
        node_id,
        autoscaler_pb2.DrainNodeReason.DRAIN_NODE_REASON_PREEMPTION,
        f"spot interruption notice: {notice.action} at {notice.deadline_ms} ms",
        notice.deadline_ms,
    )
    if not accepted:  # preemption drains are not rejectable; say so if it ever happens
        raise RuntimeError(f"the GCS did not accept draining node {node_id}: {rejection}")


def watch(
    read: Callable[[], Notice | None],
    drain: Callable[[Notice], None],
    interval_s: float = POLL_INTERVAL_S,
    stop: threading.Event | None = None,
) -> Notice | None:
    """Poll `read` every `interval_s` until a notice comes, drain once, and return the notice (None if stopped).
    A failed poll (IMDS briefly unreachable) is logged and retried: only a notice ends the watch."""
    stop = stop or threading.Event()
    while not stop.is_set():
        try:
            notice = read()
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("reading the spot notice failed (retrying): %s", exc)
            notice = None
        if notice is not None:
            logger.warning(
                "spot interruption notice: %s at %d ms; draining this node", notice.action, notice.deadline_ms
            )
            drain(notice)
            return notice
        stop.wait(interval_s)
    return None


def _this_node(address: str | None, node_id: str | None) -> tuple[str, str]:
    """(GCS address, id of the node to drain: `node_id`, else the one Ray node of this machine), by joining the
    cluster once as a driver."""
    import ray

    ray.init(address=address or "auto", logging_level=logging.WARNING)
    try:
        alive = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]}
        if node_id is None:
            # A driver joins some Ray node of its machine (the head first, if it is one of them), not necessarily
            # the one this watcher is for: only a machine with a single Ray node identifies it.
            machine = alive[ray.get_runtime_context().get_node_id()]
            here = sorted(node for node, ip in alive.items() if ip == machine)
            if len(here) != 1:
                raise SystemExit(f"{len(here)} Ray nodes run on this machine ({machine}): name one with --node-id")
            node_id = here[0]
        elif node_id not in alive:
            raise SystemExit(f"--node-id {node_id} is not an alive node of this Ray cluster")
        return ray.get_runtime_context().gcs_address, node_id
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m concerto_ray.spot_watcher",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--address", default=None, help="the Ray cluster (default: the one this node belongs to)")
    parser.add_argument("--interval", type=float, default=POLL_INTERVAL_S, help="seconds between polls")
    parser.add_argument("--imds-url", default=IMDS_URL, help="instance metadata endpoint")
    parser.add_argument(
        "--node-id", default=None, help="hex id of the Ray node to drain (default: the one Ray node of this machine)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    gcs_address, node_id = _this_node(args.address, args.node_id)
    logger.info("watching for spot interruption notices for node %s", node_id)
    watch(
        lambda: read_notice(args.imds_url),
        lambda notice: drain_this_node(notice, gcs_address, node_id),
        interval_s=args.interval,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
