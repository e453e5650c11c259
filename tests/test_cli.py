"""Tests of the `kernattn` command line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import kernattn
from kernattn import cli, verify

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

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

    def elu_plus_one(x):
        return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))

    def linear_any_causal(q, k, v, causal=False):
        """elu+1 linear attention that ignores `causal`: wrong for causal rows once N >= 2."""
        group = q.shape[1] // k.shape[1]
        scores = elu_plus_one(q) @ elu_plus_one(np.repeat(k, group, axis=1)).swapaxes(-1, -2)
        return scores @ np.repeat(v, group, axis=1) / scores.sum(axis=-1, keepdims=True)

    def dot_similarity(q, k, v, sim, mask=None):
        scores = np.array([[[[sim(x, y) for y in k[b, h]] for x in q[b, h]]
                            for h in range(q.shape[1])] for b in range(q.shape[0])])
        if mask is not None:
            scores = np.where(mask, scores, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):  # no zero-denominator policy
            return scores @ v / scores.sum(axis=-1, keepdims=True)
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
    rows = [line.split()[0] for line in output.splitlines() if "(float32 input)" in line]
    assert {"softmax", "similarity", "linear"} <= set(rows)


def test_verify_help_lists_exit_codes(capsys):
    assert cli.main(["verify", "--help"]) == 0
    output = capsys.readouterr().out
    assert "exit codes:" in output
    assert "not installed" in output
    assert f"{cli.EXIT_BACKEND_IMPORT}  a kernattn backend" in output


def test_version(capsys):
    assert cli.main(["--version"]) == cli.EXIT_OK
    assert capsys.readouterr().out == f"kernattn {kernattn.__version__}\n"


def test_replay_missing_file(tmp_path, capsys):
    missing = tmp_path / "missing.npz"
    assert cli.main(["verify", "--replay", str(missing)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err == f"kernattn verify: {missing} not found; expected a case saved by " \
        "kernattn verify --save-failures (.npz)\n"


def test_replay_not_a_case(tmp_path, capsys):
    script = tmp_path / "attn.py"
    script.write_text("def f(q, k, v):\n    return v\n")
    assert cli.main(["verify", "--replay", str(script)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{script} is not a NumPy .npz file" in err
    assert len(err.splitlines()) == 1


def _save_edge_case(variant_name: str, path: Path, **options) -> Path:
    case = verify.VARIANTS[variant_name].edge_cases()[0]
    return verify.save_case(path, case, **options)


def test_replay_variant_conflict(tmp_path, capsys):
    saved = _save_edge_case("softmax", tmp_path / "softmax-case.npz", variant="softmax")
    code = cli.main(["verify", "--variant", "similarity", "--replay", str(saved)])
    assert code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err == (
        f"kernattn verify: --variant similarity conflicts with {saved}, which contains a "
        f"softmax case; drop --variant or pass --variant softmax\n"
    )


def test_replay_feature_map_needs_linear_case(tmp_path, capsys):
    saved = _save_edge_case("similarity", tmp_path / "sim.npz")
    code = cli.main(["verify", "--feature-map", "relu", "--replay", str(saved)])
    assert code == cli.EXIT_USAGE
    assert "contains a similarity case" in capsys.readouterr().err


@pytest.fixture
def numpy_backends_only(monkeypatch):
    """Check only the numpy backend of each variant, to keep replays fast."""
    for name, variant in verify.VARIANTS.items():
        only_numpy = replace(variant, backends=lambda: {"loops": None, "numpy": None})
        monkeypatch.setitem(verify.VARIANTS, name, only_numpy)


@pytest.mark.parametrize("stored", [True, False], ids=["variant-stored", "variant-inferred"])
def test_replay_uses_saved_variant(tmp_path, capsys, numpy_backends_only, stored):
    variant = {"variant": "linear"} if stored else {}
    saved = _save_edge_case("linear", tmp_path / "linear-case.npz", **variant)
    assert cli.main(["verify", "--replay", str(saved)]) == cli.EXIT_OK
    output = capsys.readouterr().out
    assert "kernattn verify: variant linear, 1 case (replayed)" in output
    assert "linear   numpy (float64 input)" in output
    assert "softmax" not in output


def test_replay_groups_files_by_variant(tmp_path, capsys, numpy_backends_only):
    softmax_file = _save_edge_case("softmax", tmp_path / "a.npz")
    similarity_file = _save_edge_case("similarity", tmp_path / "b.npz")
    argv = ["verify", "--replay", str(similarity_file), "--replay", str(softmax_file),
            "--replay", str(softmax_file)]
    assert cli.main(argv) == cli.EXIT_OK
    output = capsys.readouterr().out
    assert "kernattn verify: variant softmax, 2 cases (replayed)" in output
    assert "kernattn verify: variant similarity, 1 case (replayed)" in output


def test_verify_backend_import_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "kernattn._numba.softmax", None)  # import fails
    numpy_and_numba = replace(
        verify.VARIANTS["softmax"], backends=lambda: {"loops": None, "numpy": None, "numba": None}
    )
    monkeypatch.setitem(verify.VARIANTS, "softmax", numpy_and_numba)
    code = cli.main(["verify", "--variant", "softmax", "--cases", "2"])
    assert code == cli.EXIT_BACKEND_IMPORT
    output = capsys.readouterr().out
    errors = [line for line in output.splitlines() if line.startswith("  error: ")]
    assert len(errors) == 2  # one line per target: float64 and float32 input
    assert errors[0].startswith(
        "  error: backend 'numba' cannot be imported: ModuleNotFoundError: "
    )
    assert "kernattn._numba.softmax" in errors[0]
    assert "MISMATCH" not in output
    assert "shrunk" not in output
    assert "FAIL" not in output
    assert "ERROR: 2 targets could not run because a kernattn backend failed to import" in output
    assert output.splitlines()[-1] == f"  {cli.REINSTALL_HINT}"


def test_verify_backend_registry_import_error(monkeypatch, capsys):
    def missing_registry():
        raise ModuleNotFoundError("No module named 'kernattn.loops'")

    broken = replace(verify.VARIANTS["softmax"], backends=missing_registry)
    monkeypatch.setitem(verify.VARIANTS, "softmax", broken)
    assert cli.main(["verify", "--variant", "softmax"]) == cli.EXIT_BACKEND_IMPORT
    err = capsys.readouterr().err
    assert "No module named 'kernattn.loops'" in err
    assert cli.REINSTALL_HINT in err


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
    lines = capsys.readouterr().out.splitlines()
    assert "kernattn verify: variant softmax, 1 case (replayed)" in lines
    assert lines[-1] == "FAIL: 1 mismatch"


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
    # The script installed next to this interpreter, not whichever `kernattn` comes
    # first on PATH, which may belong to another environment.
    scripts = Path(sys.executable).parent
    candidates = [scripts / "kernattn", scripts / "kernattn.exe"]
    executable = next((path for path in candidates if path.is_file()), None)
    if executable is None:
        pytest.skip(f"no kernattn console script in {scripts} (pip install -e .)")
    completed = subprocess.run(
        [str(executable), "verify", "--cases", "2"], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "OK: no mismatches" in completed.stdout


def test_verify_linear_shrinks_and_saves(user_module, capsys):
    failures = user_module / "failures"
    code = cli.main([
        "verify", "userattn:linear_any_causal", "--variant", "linear", "--feature-map",
        "elu+1", "--cases", "8", "--save-failures", str(failures),
    ])
    assert code == cli.EXIT_MISMATCH
    output = capsys.readouterr().out
    assert "MISMATCH edge-lin-means-causal-normaliser@parallel [B=1 Hq=1 Hkv=1 N=4 S=4" in output
    assert "to [B=1 Hq=1 Hkv=1 N=2 S=2 D=1 M=1; feature_map='elu+1', causal=True" in output
    [saved] = failures.glob("*edge-lin-means-causal-normaliser_parallel.npz")
    with np.load(saved, allow_pickle=False) as data:
        assert data["q"].shape == (1, 1, 2, 1)
        command = str(data["command"])
    assert command == (
        f"kernattn verify userattn:linear_any_causal --variant linear --feature-map elu+1 "
        f"--replay {saved}"
    )
    assert cli.main(command.split()[1:]) == cli.EXIT_MISMATCH
    output = capsys.readouterr().out
    assert "kernattn verify: variant linear, 1 case (replayed)" in output
    assert output.splitlines()[-1] == "FAIL: 1 mismatch"


def test_verify_linear_needs_feature_map(user_module, capsys):
    assert cli.main(["verify", "userattn:linear_any_causal", "--variant", "linear"]) == cli.EXIT_USAGE
    assert "--feature-map NAME" in capsys.readouterr().err


def test_verify_unknown_feature_map(capsys):
    assert cli.main(["verify", "--variant", "linear", "--feature-map", "softmax"]) == cli.EXIT_USAGE
    assert "feature map 'softmax' is unknown" in capsys.readouterr().err


def test_verify_feature_map_needs_linear(capsys):
    assert cli.main(["verify", "--variant", "softmax", "--feature-map", "relu"]) == cli.EXIT_USAGE
    assert "only to --variant linear" in capsys.readouterr().err


def test_verify_linear_backends_with_feature_map(capsys):
    code = cli.main(["verify", "--variant", "linear", "--feature-map", "favor:8", "--cases", "4"])
    assert code == cli.EXIT_OK
    output = capsys.readouterr().out
    assert "variant linear" in output
    assert "numpy (float32 input)" in output
    assert "OK: no mismatches" in output


def test_verify_similarity_user_function(user_module, capsys):
    code = cli.main(["verify", "userattn:dot_similarity", "--variant", "similarity", "--cases", "4",
                     "--no-shrink"])
    output = capsys.readouterr().out
    assert code == cli.EXIT_MISMATCH  # no zero-denominator policy, no causal rule
    assert "MISMATCH edge-sim-poly2-one-26th-exact" not in output
    assert "not supported" in output
    assert "shrunk" not in output


def test_verify_progress_to_stderr(capsys):
    assert cli.main(["verify", "--variant", "similarity", "--cases", "2", "--progress"]) == 0
    err = capsys.readouterr().err
    assert "similarity / numpy (float64 input): " in err


def test_check_feature_map_missing_sqrt2(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    code = cli.main([
        "check-feature-map", "feature_map_missing_sqrt2:my_feature_map",
        "--kernel", "feature_map_missing_sqrt2:squared_dot",
    ])
    output = capsys.readouterr().out
    assert code == cli.EXIT_MISMATCH
    assert "FAIL  kernel identity" in output
    assert "result: FAILED" in output


def test_check_feature_map_builtin_and_class(capsys):
    assert cli.main(["check-feature-map", "polynomial:2"]) == cli.EXIT_OK
    assert "result: passed" in capsys.readouterr().out
    code = cli.main(["check-feature-map", "kernattn.feature_maps:EluPlusOne", "--positive"])
    assert code == cli.EXIT_OK
    assert "ok    positive features" in capsys.readouterr().out


def test_check_feature_map_claimed_positive_fails(capsys):
    assert cli.main(["check-feature-map", "identity", "--positive"]) == cli.EXIT_MISMATCH


def test_check_feature_map_bad_object(capsys):
    assert cli.main(["check-feature-map", "kernattn.feature_maps:Polynomial"]) == cli.EXIT_USAGE
    assert "cannot be called without arguments" in capsys.readouterr().err
    assert cli.main(["check-feature-map", "no_such_module_xyz:phi"]) == cli.EXIT_USAGE


def test_bench_passes_arguments(monkeypatch):
    received = []
    fake = types.ModuleType("kernattn.bench")
    fake.run_bench = lambda argv: received.append(argv) or 7
    monkeypatch.setitem(sys.modules, "kernattn.bench", fake)
    assert cli.main(["bench", "--help", "softmax"]) == 7
    assert received == [["--help", "softmax"]]


def test_bench_missing_module(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "kernattn.bench", None)  # makes the import fail
    assert cli.main(["bench"]) == cli.EXIT_USAGE
    assert "module kernattn.bench is missing" in capsys.readouterr().err


def test_target_module_import_failure(tmp_path, monkeypatch, capsys):
    (tmp_path / "raises_on_import.py").write_text("raise ValueError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code = cli.main(["verify", "raises_on_import:forward"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert "importing module 'raises_on_import' failed: ValueError: boom" in err


def test_target_module_missing(capsys):
    code = cli.main(["verify", "no_such_module_here:forward"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert "importing module 'no_such_module_here' failed" in err
