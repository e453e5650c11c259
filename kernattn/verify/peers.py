"""Attention implementations from other libraries, translated to kernattn's conventions.

Shape legend: B batch, Hq query heads, Hkv key/value heads, N queries, S keys, D query/key
head dimension, M value head dimension.

Each peer runs the case's options natively where its API has them with the same meaning,
and as an explicit boolean mask where it does not (bottom-right alignment, for example).
Options it cannot express (soft-capping, a dropout pattern) raise `UnsupportedCase`.
Where a peer's documented behaviour differs from kernattn's conventions, a
`KnownDifference` predicts the peer's result, so those cases are reported apart from
real disagreements.
"""

from __future__ import annotations

import inspect

import numpy as np

from kernattn import _validate as V
from kernattn.verify.cases import Case, keep_set
from kernattn.verify.check import KnownDifference, Output, UnsupportedCase


LENGTHS = ("q_lengths", "kv_lengths")


class PeerNotInstalled(ImportError):
    """Raised when the library of a peer cannot be imported."""


def _clean_excluded(case: Case, reference: Output) -> tuple[Case, Output]:
    """Set non-finite values at excluded positions of k, v and bias to 0.

    The oracle never reads those positions, so the reference stays valid.
    """
    keep = keep_set(case)
    b, hq, n, s = keep.shape
    hkv = case.arrays["k"].shape[1]
    read = keep.reshape(b, hkv, hq // hkv, n, s).any(axis=(2, 3))  # (B, Hkv, S)
    arrays = dict(case.arrays)
    for key in "kv":
        unread_bad = ~read[..., None] & ~np.isfinite(arrays[key])
        arrays[key] = np.where(unread_bad, 0.0, arrays[key]).astype(arrays[key].dtype)
    if "bias" in arrays:
        bias = np.broadcast_to(arrays["bias"], keep.shape)
        arrays["bias"] = np.where(~keep & ~np.isfinite(bias), 0.0, bias).astype(bias.dtype)
    cleaned = Case(case.name, arrays, case.options, case.expected_out, case.expected_lse)
    return cleaned, reference


def _empty_rows(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """Return (rows with no allowed key, padding query rows), both (B, Hq, N) bool."""
    keep = keep_set(case)
    b, hq, n, _ = keep.shape
    empty = ~keep.any(axis=-1)
    q_lengths = case.arrays.get("q_lengths")
    q_lengths = np.full(b, n) if q_lengths is None else np.broadcast_to(q_lengths, (b,))
    padding = np.arange(n)[None, None, :] >= q_lengths[:, None, None]
    return empty, np.broadcast_to(padding, empty.shape)


# -0.7 times the float32 maximum: the value jax.nn.dot_product_attention writes into
# excluded scores (`_get_large_negative` in jax/_src/nn/functions.py, JAX 0.10.2).
JAX_EXCLUDED_SCORE = -0.7 * float(np.finfo(np.float32).max)


def _jax_empty_row_mean(case: Case, reference: Output) -> tuple[Case, Output]:
    empty, padding = _empty_rows(case)
    v = case.arrays["v"].astype(np.float64)
    b, hq, n = empty.shape
    group = hq // v.shape[1]
    # Equal weights on all S keys: the mean of every stored value of the row's head.
    means = np.repeat(v.mean(axis=2), group, axis=1)  # (B, Hq, M)
    out = np.where((empty & ~padding)[..., None], means[:, :, None, :], reference.out)
    lse = reference.lse
    if lse is not None:
        filled = JAX_EXCLUDED_SCORE + np.log(case.arrays["k"].shape[2])
        lse = np.where(empty, filled, lse)
    return case, Output(out, lse)


def _torch_empty_row_nan(case: Case, reference: Output) -> tuple[Case, Output]:
    empty, padding = _empty_rows(case)
    out = np.where(empty[..., None], np.nan, reference.out)
    return case, Output(out, reference.lse)


NAN_AT_EXCLUDED = KnownDifference(
    "non-finite values at excluded positions propagate",
    "NaN or Inf stored at an excluded position of k, v or bias reaches the output: the "
    "peer gives excluded keys probability 0 (or adds -inf to a NaN score) and "
    "0 * NaN = NaN. kernattn leaves excluded keys out of every sum. Verified by "
    "rerunning the peer with those entries set to 0.",
    _clean_excluded,
)
JAX_EMPTY_ROW_MEAN = KnownDifference(
    "row with no allowed key averages all values",
    "A row with no allowed key gets equal weight on all S keys, because excluded scores "
    "are set to -0.7 * float32 max instead of being left out; its lse is that number "
    "plus log S. Padding queries (query_seq_lengths) are still 0. kernattn returns 0 "
    "with lse = -inf.",
    _jax_empty_row_mean,
)
TORCH_EMPTY_ROW_NAN = KnownDifference(
    "row with no allowed key is NaN",
    "A row with no allowed key is NaN (PyTorch before 2.5, and some fused kernels). "
    "kernattn returns 0.",
    _torch_empty_row_nan,
)


def _drop_identity_dropout(case: Case) -> None:
    """Reject a real dropout pattern; an all-True one with dropout_p = 0 is the identity."""
    dropout_mask = case.arrays.get("dropout_mask")
    if dropout_mask is None:
        return
    if np.all(dropout_mask) and case.options.get("dropout_p", 0.0) == 0.0:
        return
    raise UnsupportedCase("dropout_mask: the peer draws its own dropout pattern")


def _structure(case: Case):
    b, _, n, _ = case.arrays["q"].shape
    s = case.arrays["k"].shape[2]
    options = case.options
    return V.resolve_structure(
        options.get("causal"), options.get("alignment"), options.get("window"),
        case.arrays.get("q_lengths"), case.arrays.get("kv_lengths"), b, n, s,
    )


def _is_top_left(structure, batch: int) -> bool:
    """Return whether the causal and window rules sit at offset 0 in every batch row."""
    return all(structure.offset(row) == 0 for row in range(batch))


class JaxTarget:
    """`jax.nn.dot_product_attention` (XLA implementation, float32)."""

    name = "jax.nn.dot_product_attention (float32)"
    differences = (NAN_AT_EXCLUDED, JAX_EMPTY_ROW_MEAN)

    def __init__(self):
        try:
            import jax
            import jax.numpy as jnp
        except ImportError as exc:
            raise PeerNotInstalled(
                f"jax is not installed ({exc}); install it with pip install 'jax[cpu]'"
            ) from exc
        self.jax, self.jnp = jax, jnp
        parameters = inspect.signature(jax.nn.dot_product_attention).parameters
        self.has_lse = "return_residual" in parameters
        static = ("is_causal", "local_window_size", "return_residual", "scale")
        static = [name for name in static if name in parameters]
        # Compiled once per shape: the same XLA computation as an eager call, about ten
        # times faster here because eager mode compiles every operation separately.
        self.function = jax.jit(jax.nn.dot_product_attention, static_argnames=static)
        self.notes: list[str] = [f"jax {jax.__version__}, called through jax.jit"]
        if not self.has_lse:
            self.notes.append("lse not compared: this JAX version has no return_residual")

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def __call__(self, case: Case) -> Output:
        if case.options.get("softcap") is not None:
            raise UnsupportedCase("softcap: jax.nn.dot_product_attention has no soft-capping")
        _drop_identity_dropout(case)
        jnp = self.jnp
        q, k, v = (case.arrays[key].astype(np.float32) for key in "qkv")
        b, hq, n, d = q.shape
        s, m = k.shape[2], v.shape[3]
        scale = case.options.get("scale")
        scale = 1.0 / np.sqrt(d) if scale is None else scale
        if m != d:
            # JAX needs value and key of the same shape; zero columns change no score.
            width = max(d, m)
            q, k, v = (np.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[3])]) for x in (q, k, v))
            self._note("M != D: q, k and v zero-padded to a common head dimension")

        keywords = {"scale": float(scale)}
        structure = _structure(case)
        mask = case.arrays.get("mask")
        if structure.causal or structure.window is not None:
            if _is_top_left(structure, b):
                keywords["is_causal"] = structure.causal
                if structure.window is not None:
                    # JAX takes integers only; max(N, S) reaches every key.
                    left, right = (
                        max(n, s) if side is None else side for side in structure.window
                    )
                    keywords["local_window_size"] = (left, right)
            else:
                mask = keep_set(case)
                self._note(
                    "bottom-right alignment passed as an explicit boolean mask, because "
                    "is_causal and local_window_size are top-left"
                )
        lengths = (("query_seq_lengths", "q_lengths"), ("key_value_seq_lengths", "kv_lengths"))
        for name, key in lengths:
            if key in case.arrays:
                per_row = np.broadcast_to(case.arrays[key], (b,)).astype(np.int32)
                keywords[name] = jnp.asarray(per_row)
        if mask is not None:
            keywords["mask"] = jnp.asarray(np.broadcast_to(mask, (b, hq, n, s)))
        if "bias" in case.arrays:
            bias = np.broadcast_to(case.arrays["bias"], (b, hq, n, s)).astype(np.float32)
            keywords["bias"] = jnp.asarray(bias)
        if self.has_lse:
            keywords["return_residual"] = True

        # (B, H, N, D) -> (B, N, H, D), JAX's BTNH layout
        args = [jnp.asarray(x.transpose(0, 2, 1, 3)) for x in (q, k, v)]
        result = self.function(*args, **keywords)
        out, lse = result if self.has_lse else (result, None)
        out = np.asarray(out).transpose(0, 2, 1, 3)[..., :m]
        if lse is not None:
            lse = np.asarray(lse).transpose(0, 2, 1)  # (B, N, Hq) -> (B, Hq, N)
        return Output(out, lse)


class TorchTarget:
    """`torch.nn.functional.scaled_dot_product_attention` on CPU in one float dtype.

    PyTorch picks the kernel itself: on CPU, float32 and float64 may take different
    paths (fused flash attention or the composite math version), so both are checked.
    """

    differences = (NAN_AT_EXCLUDED, TORCH_EMPTY_ROW_NAN)

    def __init__(self, dtype=np.float64):
        try:
            import torch
        except ImportError as exc:
            raise PeerNotInstalled(
                f"torch is not installed ({exc}); install it with pip install torch"
            ) from exc
        self.torch = torch
        self.dtype = np.dtype(dtype)
        self.name = f"torch.nn.functional.scaled_dot_product_attention ({self.dtype.name})"
        self.function = torch.nn.functional.scaled_dot_product_attention
        self.notes: list[str] = [
            f"torch {torch.__version__}",
            "lse not compared: scaled_dot_product_attention returns no lse",
        ]

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def __call__(self, case: Case) -> Output:
        if case.options.get("softcap") is not None:
            raise UnsupportedCase("softcap: scaled_dot_product_attention has no soft-capping")
        _drop_identity_dropout(case)
        torch = self.torch
        q, k, v = (torch.from_numpy(case.arrays[key].astype(self.dtype)) for key in "qkv")
        b, hq, n, _ = q.shape
        s = k.shape[2]
        keywords = {"scale": case.options.get("scale"), "enable_gqa": hq != k.shape[1]}

        structure = _structure(case)
        only_causal = (
            structure.causal
            and structure.window is None
            and not any(key in case.arrays for key in ("mask", "bias", *LENGTHS))
        )
        if only_causal and _is_top_left(structure, b):
            keywords["is_causal"] = True  # PyTorch is_causal is top-left: j <= i
        elif structure.causal or structure.window is not None or any(
            key in case.arrays for key in ("mask", *LENGTHS)
        ):
            keep = keep_set(case)
            if structure.causal and not _is_top_left(structure, b):
                self._note(
                    "bottom-right causal passed as an explicit boolean mask, because "
                    "is_causal is top-left"
                )
            if "bias" in case.arrays:
                # One float attn_mask carries both: the bias where kept, -inf elsewhere.
                bias = np.broadcast_to(case.arrays["bias"], keep.shape)
                merged = np.where(keep, bias, -np.inf).astype(self.dtype)
                keywords["attn_mask"] = torch.from_numpy(merged)
                self._note("mask and bias merged into one float attn_mask, -inf where excluded")
            else:
                keywords["attn_mask"] = torch.from_numpy(keep)
        elif "bias" in case.arrays:
            bias = np.broadcast_to(case.arrays["bias"], (b, hq, n, s)).astype(self.dtype)
            keywords["attn_mask"] = torch.from_numpy(bias)
        out = self.function(q, k, v, **keywords)
        return Output(out.numpy())


def jax_targets() -> list:
    """Return the JAX targets; raise `PeerNotInstalled` without JAX."""
    return [JaxTarget()]


def torch_targets() -> list:
    """Return the PyTorch targets (float64, float32); raise `PeerNotInstalled` without it."""
    return [TorchTarget(np.float64), TorchTarget(np.float32)]


# Peer name on the command line to a function returning its targets.
PEERS = {"jax": jax_targets, "torch": torch_targets}
