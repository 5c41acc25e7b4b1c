"""The `concerto-ray` command: help texts, a real synth -> prepare run, and clean errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from concerto_ray.cli import build_parser, main
from concerto_ray.model.checkpoint import MODEL_NAME_KEY

REPO = Path(__file__).resolve().parents[1]

SUBCOMMANDS = [
    ["synth"],
    ["prepare"],
    ["ingest"],
    ["stream"],
    ["finetune"],
    ["sweep"],
    ["demo"],
    ["compare"],
    ["model", "info"],
    ["model", "convert"],
]


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_has_help(words, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*words, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: concerto-ray {' '.join(words)}" in text and len(text.splitlines()) > 4


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "concerto_ray.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("synth", "prepare", "stream", "demo", "model"):
        assert command in out


def test_synth_then_prepare(tmp_path, capsys):
    scenes, shards = tmp_path / "scenes", tmp_path / "shards"
    assert (
        main(
            [
                "synth",
                str(scenes),
                "--scenes",
                "2",
                "--seed",
                "3",
                "--points",
                "1500",
                "--views",
                "4",
                "--image-size",
                "48x32",
            ]
        )
        == 0
    )
    assert np.load(scenes / "train" / "scene0000_00" / "coord.npy").shape == (1500, 3)
    assert main(["prepare", str(scenes), str(shards), "--workers", "1"]) == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    assert sum(s["samples"] for s in manifest["splits"].values()) == 2
    assert "2 samples" in capsys.readouterr().out


def test_bad_input_exits_2_with_the_file_named(tmp_path, capsys):
    scenes = tmp_path / "scenes"
    main(["synth", str(scenes), "--scenes", "1", "--points", "1500", "--views", "4", "--image-size", "48x32"])
    coord = scenes / "train" / "scene0000_00" / "coord.npy"
    coord.write_bytes(b"garbage")
    assert main(["prepare", str(scenes), str(tmp_path / "shards")]) == 2
    err = capsys.readouterr().err
    assert "concerto-ray prepare: error:" in err and "train/scene0000_00/coord.npy" in err
    assert "Traceback" not in err


def test_bad_arguments_are_reported_by_argparse(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["synth", "out", "--image-size", "640by480"])
    assert exit_.value.code == 2
    assert "expected WIDTHxHEIGHT" in capsys.readouterr().err


def test_debug_prints_the_traceback_with_its_cause(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("run: [unclosed\n")
    assert main(["pretrain", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "concerto-ray pretrain: error:" in err and "not valid YAML" in err and "Traceback" not in err
    assert main(["--debug", "pretrain", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    # the YAML parser's own error, kept as the cause of the ConfigError
    assert "yaml.parser.ParserError" in err and "The above exception was the direct cause" in err
    assert err.index("concerto-ray pretrain: error:") > err.index("The above exception")  # the message last


@pytest.mark.slow
def test_pretrain_command_shows_a_bar_and_a_summary_and_logs_ray_to_a_file(dinov2_dir, pretrain_shards, tmp_path):
    """The terminal of `concerto-ray pretrain` (as demo, finetune and sweep): the log file's path, one progress
    bar, a summary; nothing of Ray's own logs, its workers' output or library warnings."""
    overrides = [
        f"data.shards={pretrain_shards}",
        f"model.image_encoder_weights={dinov2_dir}",
        f"run.storage_path={tmp_path / 'runs'}",
        "data.pretrain.crop_h=28",
        "data.pretrain.crop_w=28",
        "data.pretrain.max_size=1024",
        "data.pretrain.enc2d_max_size=1024",
    ]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "concerto_ray.cli",
            "pretrain",
            "--config",
            str(REPO / "configs" / "pretrain-tiny.yaml"),
            *[f"--set={o}" for o in overrides],
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.splitlines()
    assert out[0].startswith("logs: ")
    assert re.fullmatch(r"pre-training: 4 steps in \d+m\d\ds, loss \d+\.?\d*", out[1]), out
    assert out[2] == f"finished; latest checkpoint: {tmp_path / 'runs' / 'pretrain-tiny' / 'step-00000004'}"
    assert len(out) == 3
    # The checkpoint names its model config, so `embed` and `viz` need no --model for it.
    saved = torch.load(tmp_path / "runs" / "pretrain-tiny" / "step-00000004" / "model.pt", weights_only=True)
    assert (
        saved[MODEL_NAME_KEY] == yaml.safe_load((REPO / "configs" / "pretrain-tiny.yaml").read_text())["model"]["name"]
    )
    # stderr: the bar only (redrawn with \r on a terminal, a line per minute in a pipe), ending at 4/4 with a loss
    bar = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert bar and all(line.startswith("pre-training: ") for line in bar), done.stderr[-3000:]
    assert re.search(r"4/4 \[.*loss \d", bar[-1]), bar[-1]
    log_file = Path(out[0].removeprefix("logs: ").split(" (Ray's own: ")[0])
    assert "ray" in log_file.read_text()  # Ray's driver-side messages went there


def test_demo_refuses_odd_probe_epochs_before_writing_anything(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path / "demo"), "--probe-epochs", "3"]) == 2
    assert "probe epochs (3) must be a positive multiple of 2" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
