"""The command line as a user runs it: a real subprocess, tiny model files written by the test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from tiny_models import TINY_CLIP, tiny_net


def run_ts2(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ts2cli", *args], capture_output=True, text=True, cwd=cwd)


def test_version_and_help():
    result = run_ts2("--version")
    assert result.returncode == 0 and result.stdout.startswith("ts2 ")
    listed = run_ts2("--help").stdout.split("Commands:")[1].splitlines()[1:]
    commands = {line.split()[0]: line for line in listed if line.strip()}
    assert set(commands) == {"model", "index", "forget", "status", "info", "search", "eval", "train"}
    assert not [line for line in commands.values() if line.endswith("...")]  # each says what it does, not cut off


def test_usage_errors_are_plain_lines():
    for args, said in (
        (("index", "--batch-size", "many", "videos"), "Invalid value for '--batch-size'"),
        (("search", "cat", "--top", "3"), "No such option: --top"),
        (("eval", "msrvtt", "--frames", "0"), "Invalid value for '--frames'"),
        (("model", "--compat", "paper"), "'paper' is not one of 'fixed', 'official'"),
        (("model", "--topk", "soft"), "'soft' is not one of 'perturbed', 'hard'"),
        (("index", "--wait", "nan"), "Invalid value for '--wait'"),
        (("forget", "x", "--wait", "-1"), "Invalid value for '--wait'"),
        (("train", "captions", "--head", "mean"), "'mean' is not one of 'ts2', 'meanpool'"),
        (("eval", "msrvtt", "--ties", "loose"), "'loose' is not one of 'strict', 'official'"),
        (("train", "captions", "--lr", "-1"), "Invalid value for '--lr'"),
        (("train", "captions", "--warmup", "2"), "Invalid value for '--warmup'"),
        (("train", "captions", "--csv", "c.csv", "--out", "o", "--eval-videos", "v"), "it goes with --eval-csv"),
    ):
        result = run_ts2(*args)
        assert result.returncode == 2, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and said in errors[0], result.stderr
        assert not set("╭│╰") & set(result.stderr), result.stderr  # no box drawn around the message
    usage = run_ts2("index", "--help").stdout.splitlines()[0]
    assert "index [OPTIONS]" in usage and "FOLDERS" in usage  # typer 0.29 writes {FOLDERS}..., click FOLDERS...
    for command in (("index",), ("search",), ("eval", "captions"), ("train", "msrvtt")):  # values named, not typed
        options = run_ts2(*command, "--help").stdout.split("Options:")[1]
        assert not [kind for kind in ("<str>", "<int", "<float", "<path>") if kind in options], options


def test_command_line_choices_are_the_librarys():
    from typing import get_args

    from ts2cli import cli_options
    from ts2cli.evaluate import HEADS
    from ts2cli.metrics import TieMode
    from ts2cli.model import COMPAT_MODES
    from ts2cli.model.loading import INFERENCE_PRECISIONS
    from ts2cli.train import PRECISIONS

    for choice, library in (
        (cli_options.CompatChoice, COMPAT_MODES),
        (cli_options.InferencePrecisionChoice, INFERENCE_PRECISIONS),
        (cli_options.TrainPrecisionChoice, PRECISIONS),
        (cli_options.HeadChoice, HEADS),
        (cli_options.TiesChoice, get_args(TieMode)),
    ):
        assert set(get_args(choice)) == set(library)


def test_model_report_says_zero_shot(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CLIP))
    weights = tmp_path / "tiny-clip.pt"
    net = tiny_net(zero_shot=True)
    torch.save({k.removeprefix("clip."): v for k, v in net.state_dict().items()}, weights)
    result = run_ts2("model", "--model", str(config), "--pretrained", str(weights), "--device", "cpu", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["mode"] == "zero-shot" and "zero-shot" in report["note"]
    assert report["embed_dim"] == 64 and report["device"] == "cpu" and report["compat"] == "fixed"
    assert report["precision"] == "auto" and report["dtype"] is None  # the first video batch decides
    assert report["trained"] is None  # CLIP weights: nothing trained by ts2
    pinned = run_ts2("model", "--model", str(config), "--pretrained", str(weights), "--precision", "float32", "--json")
    assert json.loads(pinned.stdout)["dtype"] == "float32"  # nothing left to decide
    if Path("/dev/full").exists():  # an answer that cannot be written (stdout to a full disk) is one line too
        with open("/dev/full", "w") as full:
            command = [sys.executable, "-m", "ts2cli", "model", "--model", str(config), "--pretrained", str(weights)]
            unwritten = subprocess.run([*command, "--json"], stdout=full, stderr=subprocess.PIPE, text=True)
        assert unwritten.returncode == 1, unwritten.stderr
        assert unwritten.stderr == "error: No space left on device (writing the output).\n"


def test_missing_weights_is_one_line_and_non_zero(tmp_path):
    result = run_ts2("model", "--pretrained", str(tmp_path / "missing.safetensors"))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--pretrained" in lines[0] and "Traceback" not in result.stderr
    (tmp_path / "videos").mkdir()
    first = run_ts2("index", str(tmp_path / "videos"), "--library", str(tmp_path / "lib"), "--pretrained", "/nope.pt")
    assert first.returncode == 1 and "--pretrained" in first.stderr
    assert not (tmp_path / "lib").exists()  # no empty library left behind for `ts2 status` to report


def test_weights_are_read_by_content_and_other_files_are_named(tmp_path):
    from safetensors.torch import save_file

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CLIP))
    state = {k.removeprefix("clip."): v.contiguous() for k, v in tiny_net(zero_shot=True).state_dict().items()}
    unnamed = tmp_path / "weights-without-suffix"  # safetensors, whatever its name says
    save_file(state, str(unnamed))
    result = run_ts2("model", "--model", str(config), "--pretrained", str(unnamed), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert f"loaded from   {unnamed}" in result.stdout  # where the weights are, not a dict of load options
    for name, content in (("notes.pt", b"not weights"), ("empty.safetensors", b"")):
        (tmp_path / name).write_bytes(content)
        failed = run_ts2("model", "--model", str(config), "--pretrained", str(tmp_path / name), "--device", "cpu")
        assert failed.returncode == 1, failed.stderr
        assert (
            failed.stderr.strip()
            == f"error: {tmp_path / name} is not a weights file (neither safetensors nor a PyTorch file)."
        )


def test_weights_of_the_wrong_kind_say_which_option_takes_them(tmp_path):
    from safetensors.torch import save_file

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CLIP))
    checkpoint = tmp_path / "trained.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_net().state_dict().items()}, str(checkpoint))
    failed = run_ts2("model", "--model", str(config), "--pretrained", str(checkpoint), "--device", "cpu")
    assert failed.returncode == 1 and failed.stderr.strip() == (
        f"error: {checkpoint} is a TS2-Net checkpoint, not CLIP weights: pass it with --checkpoint."
    )
    random = run_ts2("model", "--model", str(config), "--pretrained", "none", "--device", "cpu")
    assert (
        random.returncode == 1 and "--pretrained none (random weights) is for ts2 train and ts2 eval" in random.stderr
    )


CTRL_C_WHILE_LOADING = """
import os, signal, sys


class CtrlCWhileLoading:  # a real SIGINT, delivered while ts2's modules are being imported
    def find_spec(self, name, path=None, target=None):
        if name == "typer":
            os.kill(os.getpid(), signal.SIGINT)
        return None


sys.meta_path.insert(0, CtrlCWhileLoading())
sys.argv = ["ts2", "status"]
from ts2cli.launch import main

main()
"""


def test_ctrl_c_while_the_command_loads_is_one_line():
    run = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_LOADING], capture_output=True, text=True)
    assert run.returncode == 130 and run.stderr == "Interrupted.\n", run.stderr
