"""Credentials in a config never reach MLflow: a run is opened on a real MLflow server through a tracking URI that
carries a user and password, with AWS-style secrets in the config, and nothing the server holds for it (params,
tags, run and experiment, every artifact) contains them."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from mlflow.tracking import MlflowClient

from concerto_ray.config import from_dict
from concerto_ray.data.storage import resolve
from concerto_ray.redact import MASK, redact
from concerto_ray.train.config import PretrainConfig
from concerto_ray.train.tracking import open_run

PASSWORD = "pw-9f3c1e77"
KEY_ID = "AKIAIOSFODNN7EXAMPLE"  # AWS's documented example key pair
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SESSION_TOKEN = "FwoGZXIvYXdzEXAMPLETOKEN"


def test_credentials_appear_nowhere_in_mlflow(mlflow_server, tmp_path):
    server = urlparse(mlflow_server)
    tracking_uri = f"http://alice:{PASSWORD}@{server.netloc}"  # the server ignores the credentials; MLflow sends them
    config = from_dict(
        PretrainConfig,
        {
            "model": {
                "name": "tiny-concerto",
                "image_encoder_weights": f"https://hub.example.com/dinov2?token={PASSWORD}",
            },
            "data": {"shards": f"s3://{KEY_ID}:{SECRET_KEY}@bucket/shards", "endpoint_url": "https://s3.example.com"},
            "run": {"name": "secret-run", "storage_path": str(tmp_path / "runs")},
            "mlflow": {"tracking_uri": tracking_uri, "experiment": "redaction"},
        },
    )
    run_dir = resolve(tmp_path / "runs" / "secret-run")
    run_id = open_run(config, "secret-run", "redaction", tracking_uri, run_dir, resume=False)
    open_run(config, "secret-run", "redaction", tracking_uri, run_dir, resume=True)  # a resume logs config.yaml again

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.data.params["mlflow.tracking_uri"] == f"http://alice:{MASK}@{server.netloc}"  # logged, but masked
    assert run.data.params["data.shards"] == f"s3://{MASK}:{MASK}@bucket/shards"
    assert run.data.params["run.name"] == "secret-run"
    artifacts = Path(client.download_artifacts(run_id, "", str(tmp_path / "download")))
    files = [p for p in artifacts.rglob("*") if p.is_file()]
    assert [p.name for p in files] == ["config.yaml"]
    logged = [
        str(run.to_dictionary()),
        str(client.get_experiment(run.info.experiment_id)),
        *(p.read_text() for p in files),
    ]
    for secret in (PASSWORD, KEY_ID, SECRET_KEY, f"alice:{PASSWORD}@"):
        assert not any(secret in text for text in logged), f"{secret!r} reached MLflow"
    assert f"http://alice:{MASK}@" in files[0].read_text()


def test_redact_masks_secret_fields_and_keeps_the_rest():
    config = {
        "aws": {"aws_secret_access_key": SECRET_KEY, "AWS_SESSION_TOKEN": SESSION_TOKEN, "region": "us-west-2"},
        "urls": ["http://bob@host:5000/x", "http://host:5000/a?token=abc&page=2"],
        "note": f"key {KEY_ID} in text",
        "backbone": {"mask_token": True, "passes": 2},
        "lr": 0.1,
    }
    assert redact(config) == {
        "aws": {"aws_secret_access_key": MASK, "AWS_SESSION_TOKEN": MASK, "region": "us-west-2"},
        "urls": ["http://bob@host:5000/x", f"http://host:5000/a?token={MASK}&page=2"],
        "note": f"key {MASK} in text",
        "backbone": {"mask_token": True, "passes": 2},
        "lr": 0.1,
    }
