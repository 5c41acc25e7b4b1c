"""DINOv2 weights named by a Hugging Face hub name: checked for form on the driver, downloaded by the worker into its
node's Hugging Face cache once, read from that cache alone with HF_HUB_OFFLINE=1.

Nothing comes from the internet: a fake hub on 127.0.0.1 serves a tiny random DINOv2's save_pretrained folder under
the URLs huggingface_hub asks for (HEAD / GET /{repo}/resolve/{revision}/{file}, with the X-Repo-Commit, ETag and
Content-Length headers it checks), and HF_ENDPOINT points at it. huggingface_hub reads HF_ENDPOINT, HF_HOME and
HF_HUB_OFFLINE when it is imported, so every load runs in a fresh process with them set, as on a worker node.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import ray
import torch

from concerto_ray.errors import ConfigError
from concerto_ray.model.configs import get_model_config
from concerto_ray.model.image_encoder import load_image_encoder
from concerto_ray.train.config import load_pretrain_config

REPO_ROOT = Path(__file__).resolve().parents[1]
HUB_NAME = "acme/dinov2-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    endpoint: str
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path), in order

    def downloads(self) -> list[str]:
        """The files whose contents were fetched (GET of a resolve URL; a HEAD only asks for the metadata)."""
        return [path.rsplit("/", 1)[1] for method, path in self.requests if method == "GET" and "/resolve/" in path]


@pytest.fixture
def fake_hub(dinov2_dir):
    """A hub that has one model, HUB_NAME: the files of `dinov2_dir` at commit COMMIT."""
    served = {path.name: path.read_bytes() for path in Path(dinov2_dir).iterdir() if path.is_file()}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.answer(with_body=False)

        def do_GET(self):
            self.answer(with_body=True)

        def answer(self, with_body: bool) -> None:
            hub.requests.append((self.command, self.path))
            prefix = f"/{HUB_NAME}/resolve/"
            if not self.path.startswith(prefix):  # any other repo or API call
                self.reply(404, {"X-Error-Code": "RepoNotFound"})
                return
            _revision, _, filename = self.path[len(prefix) :].partition("/")
            if filename not in served:  # transformers asks for optional files (adapter_config.json) too
                self.reply(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
                return
            body = served[filename]
            etag = f'"{hashlib.sha256(body).hexdigest()}"'
            self.reply(200, {"X-Repo-Commit": COMMIT, "ETag": etag}, body if with_body else b"", len(body))

        def reply(self, status: int, headers: dict[str, str], body: bytes = b"", length: int = 0) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep the test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hub = FakeHub(endpoint=f"http://127.0.0.1:{server.server_port}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield hub
    server.shutdown()
    thread.join()


def hub_env(hub: FakeHub, hf_home: Path, offline: bool = False) -> dict[str, str]:
    """Hugging Face's own variables for a node whose cache is `hf_home`, talking to `hub` only."""
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1"}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


# Loads each name as a pre-training worker does, in a process of its own; prints one JSON line per name.
LOADER = """
import json, sys
import torch
from concerto_ray.errors import ConfigError
from concerto_ray.model.configs import get_model_config
from concerto_ray.model.image_encoder import load_image_encoder

encoder = get_model_config("tiny-concerto").image_encoder
encoder.weights_field = "model.image_encoder_weights"  # as PretrainConfig.model_config() sets it
out = sys.argv[1]
for name in sys.argv[2:]:
    encoder.weights = name
    try:
        torch.save(load_image_encoder(encoder).state_dict(), out)
        print(json.dumps({"name": name, "error": None}))
    except ConfigError as exc:
        print(json.dumps({"name": name, "error": str(exc)}))
"""


def load_in_a_new_process(env: dict[str, str], out: Path, *names: str) -> dict[str, str | None]:
    """{name: None if it loaded (its state dict is then in `out`), else the ConfigError's message}."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(out), *names],
        env={**inherited, **env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {line["name"]: line["error"] for line in lines}


def assert_same_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def folder_weights(dinov2_dir) -> dict[str, torch.Tensor]:
    encoder = get_model_config("tiny-concerto").image_encoder
    encoder.weights = str(dinov2_dir)
    return load_image_encoder(encoder).state_dict()


def test_a_hub_name_is_downloaded_once_per_node_and_read_offline_from_its_cache(fake_hub, dinov2_dir, tmp_path):
    hf_home, out = tmp_path / "hf-home", tmp_path / "state.pt"
    expected = folder_weights(dinov2_dir)

    # A fresh node: the worker downloads the model into the node's Hugging Face cache.
    assert load_in_a_new_process(hub_env(fake_hub, hf_home), out, HUB_NAME) == {HUB_NAME: None}
    assert_same_weights(torch.load(out), expected)
    assert sorted(fake_hub.downloads()) == ["config.json", "model.safetensors"]
    snapshot = hf_home / "hub" / "models--acme--dinov2-tiny" / "snapshots" / COMMIT
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors"]

    # Another worker of that node: Hugging Face only checks the revision (HEAD), nothing is fetched again. A name the
    # hub does not have fails naming the field and the name.
    fake_hub.requests.clear()
    errors = load_in_a_new_process(hub_env(fake_hub, hf_home), out, HUB_NAME, "acme/missing")
    assert errors[HUB_NAME] is None and fake_hub.downloads() == []
    assert_same_weights(torch.load(out), expected)
    assert errors["acme/missing"].startswith("model.image_encoder_weights: cannot load DINOv2-with-registers from ")
    assert (
        f"'acme/missing' (not a local directory; downloading it from the Hugging Face hub at {fake_hub.endpoint}"
        in (errors["acme/missing"])
    )

    # Air-gapped: HF_HUB_OFFLINE=1 reads the node's cache and never asks the hub.
    fake_hub.requests.clear()
    errors = load_in_a_new_process(hub_env(fake_hub, hf_home, offline=True), out, HUB_NAME, "acme/uncached")
    assert errors[HUB_NAME] is None and fake_hub.requests == []
    assert_same_weights(torch.load(out), expected)
    assert errors["acme/uncached"].startswith("model.image_encoder_weights: cannot load DINOv2-with-registers from ")
    assert (
        "'acme/uncached' (HF_HUB_OFFLINE is set: only this node's Hugging Face cache was read)"
        in (errors["acme/uncached"])
    )


def test_a_ray_worker_downloads_a_hub_name_into_its_nodes_cache(ray_local, fake_hub, dinov2_dir, tmp_path):
    """The variables reach a worker as on a cluster node (there: set on the node, or in the job's runtime_env)."""
    hf_home = tmp_path / "node-hf-home"

    @ray.remote(runtime_env={"env_vars": hub_env(fake_hub, hf_home)})
    def load_on_a_worker(name: str) -> dict[str, torch.Tensor]:
        encoder = get_model_config("tiny-concerto").image_encoder
        encoder.weights = name
        return load_image_encoder(encoder).state_dict()

    assert_same_weights(ray.get(load_on_a_worker.remote(HUB_NAME), timeout=300), folder_weights(dinov2_dir))
    assert sorted(fake_hub.downloads()) == ["config.json", "model.safetensors"]
    assert (hf_home / "hub" / "models--acme--dinov2-tiny" / "snapshots" / COMMIT / "model.safetensors").is_file()


def test_the_driver_checks_a_hub_name_for_form_only(pretrain_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # nothing cached, and nothing is downloaded

    def load(weights: str):
        overrides = [
            f"data.shards={pretrain_shards}",
            f"run.storage_path={tmp_path / 'runs'}",
            f"model.image_encoder_weights={weights}",
        ]
        return load_pretrain_config(REPO_ROOT / "configs" / "pretrain-tiny.yaml", overrides)

    encoder = load("facebook/dinov2-with-registers-small").model_config().image_encoder
    assert (encoder.weights, encoder.weights_field) == (
        "facebook/dinov2-with-registers-small",
        "model.image_encoder_weights",
    )
    missing = tmp_path / "no-such-dir"
    for path in (str(missing), "./no-such-dir", "../no-such-dir"):
        with pytest.raises(ConfigError, match=rf"^model.image_encoder_weights: '{path}' is neither a local directory"):
            load(path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^model.image_encoder_weights: .*weights.bin' is neither a local directory"):
        load(str(tmp_path / "weights.bin"))
    with pytest.raises(ConfigError, match=r"^model.image_encoder_weights: 'a/b/c' is neither .* nor a valid hub name"):
        load("a/b/c")
