"""Tests of the `kernattn` command line."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kernattn import cli

USER_MODULE = textwrap.dedent(
    '''
    import numpy as np

    def _attention(q, k, v, repeat):
        group = q.shape[1] // k.shape[1]
        k, v = repeat(k, group), repeat(v, group)
        scores = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        return weights / weights.sum(axis=-1, keepdims=True) @ v

    def correct(q, k, v):
        return _attention(q, k, v, lambda x, g: np.repeat(x, g, axis=1))

    def tiled(q, k, v):
        return _attention(q, k, v, lambda x, g: np.tile(x, (1, g, 1, 1)))
    '''
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write a module `userattn` with a correct and a tiled-GQA function, importable."""
    (tmp_path / "userattn.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("userattn", None)


def test_verify_backends_pass(capsys):
    assert cli.main(["verify", "--cases", "14", "--seed", "1"]) == cli.EXIT_OK
    output = capsys.readouterr().out
    assert "max abs error" in output
    assert "numpy (float64 input)" in output
    assert "loops (oracle) vs exact values" in output
    assert "OK: no mismatches" in output


def test_verify_help_lists_exit_codes(capsys):
    assert cli.main(["verify", "--help"]) == 0
    output = capsys.readouterr().out
    assert "exit codes:" in output
    assert "not installed" in output


def test_verify_unknown_target(capsys):
    assert cli.main(["verify", "nosuchpeer"]) == cli.EXIT_USAGE
    assert "MODULE:FUNCTION" in capsys.readouterr().err


def test_verify_missing_module(capsys):
    assert cli.main(["verify", "no_such_module_xyz:f"]) == cli.EXIT_USAGE
    assert "no_such_module_xyz" in capsys.readouterr().err


def test_verify_negative_case_count(capsys):
    assert cli.main(["verify", "--cases", "-1"]) == cli.EXIT_USAGE


def test_verify_correct_function(user_module, capsys):
    assert cli.main(["verify", "userattn:correct", "--cases", "14"]) == cli.EXIT_OK
    output = capsys.readouterr().out
    assert "not supported" in output
    assert "MISMATCH" not in output


def test_verify_tiled_gqa_saves_failures(user_module, capsys):
    failures = user_module / "failures"
    code = cli.main(["verify", "userattn:tiled", "--cases", "14", "--save-failures", str(failures)])
    assert code == cli.EXIT_MISMATCH
    output = capsys.readouterr().out
    assert "MISMATCH edge-gqa-head-mapping" in output
    saved = sorted(failures.glob("*.npz"))
    assert saved
    with np.load(saved[0], allow_pickle=False) as data:
        assert {"q", "k", "v", "options", "reference_out", "command"} <= set(data.files)
        command = str(data["command"])
    assert command.startswith("kernattn verify userattn:tiled --variant softmax --replay ")
    assert command in (failures / "reproduce.txt").read_text()
    # The saved command reruns exactly that case, and it still fails.
    replay = command.split()[2:]
    assert cli.main(["verify", *replay]) == cli.EXIT_MISMATCH
    assert "1 cases" in capsys.readouterr().out


def test_verify_peer_not_installed(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    assert cli.main(["verify", "torch"]) == cli.EXIT_PEER_MISSING
    assert "torch is not installed" in capsys.readouterr().err


def test_verify_jax(capsys):
    pytest.importorskip("jax")
    assert cli.main(["verify", "jax", "--cases", "14"]) == cli.EXIT_OK
    output = capsys.readouterr().out
    assert "jax.nn.dot_product_attention" in output
    assert "known difference: row with no allowed key averages all values" in output


def test_verify_torch(capsys):
    pytest.importorskip("torch")
    assert cli.main(["verify", "torch", "--cases", "14"]) == cli.EXIT_OK
    output = capsys.readouterr().out
    assert "scaled_dot_product_attention (float64)" in output
    assert "bottom-right causal passed as an explicit boolean mask" in output


def test_console_script_runs():
    executable = shutil.which("kernattn")
    if executable is None:
        pytest.skip("the kernattn console script is not installed (pip install -e .)")
    completed = subprocess.run(
        [executable, "verify", "--cases", "2"], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "OK: no mismatches" in completed.stdout
