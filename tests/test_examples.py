"""The examples run and show the failure a user would see."""

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name, capsys):
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def test_buggy_gqa_caught(capsys):
    out = run_example("buggy_gqa.py", capsys)
    assert "48 of 96 elements outside tolerance" in out
    assert "head 1" in out


def test_buggy_causal_linear_caught(capsys):
    out = run_example("buggy_causal_linear.py", capsys)
    assert "yours: [ 0.  2.  9. 24.]" in out
    assert "Worst at (query 3, column 0): actual 24.0, desired 1.5." in out


def test_missing_sqrt2_caught(capsys):
    out = run_example("feature_map_missing_sqrt2.py", capsys)
    assert "φ(x)·φ(y) = 19.0  (x·y)² = 25.0" in out
    assert "FAIL  kernel identity" in out


def test_torch_example(capsys):
    pytest.importorskip("torch")
    out = run_example("torch_sdpa_check.py", capsys)
    assert "matches kernattn causal='top_left'" in out
    assert "differs from causal='bottom_right'" in out
