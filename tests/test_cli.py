"""The `concerto-ray` command: help texts, a real synth -> prepare run, and clean errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from concerto_ray.cli import build_parser, main

SUBCOMMANDS = [["synth"], ["prepare"], ["stream"], ["finetune"], ["sweep"], ["demo"], ["compare"], ["model", "info"], ["model", "convert"]]


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_has_help(words, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*words, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: concerto-ray {' '.join(words)}" in text and len(text.splitlines()) > 4


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "concerto_ray.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("synth", "prepare", "stream", "demo", "model"):
        assert command in out


def test_synth_then_prepare(tmp_path, capsys):
    scenes, shards = tmp_path / "scenes", tmp_path / "shards"
    assert main(["synth", str(scenes), "--scenes", "2", "--seed", "3", "--points", "1500", "--views", "4",
                 "--image-size", "48x32"]) == 0
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
