"""Explicit-loop twin of linear attention: every form as scalar loops.

Float route: the features φ(q), φ(k) the wrapper evaluated and checked, sums with
`math.fsum` (the recurrent form adds step by step, as its definition specifies). Exact route:
for rational inputs and a rational map, ``φ_f(x) = sqrt(w_f) u_f(x)`` with w and u
Fractions; the query side carries ``w_f u_f(q)`` and the key side ``u_f(k)``, so every
product ``φ_f(q) φ_f(k) = w_f u_f(q) u_f(k)`` and every sum is exact.
"""

from __future__ import annotations

import math

import numpy as np

from kernattn.loops._fsum import fsum
from kernattn.loops.similarity import divide_row, exact_sum, raise_if_flagged
from kernattn.loops.softmax import is_allowed


def linear_attention(
    q, k, v, *, phi_q, phi_k, feature_map, exact_inputs, structure, form, chunk_size,
    initial_state, zero_denominator, rtol,
):
    """Return (out (B, Hq, N, M), S (B, Hkv, F, M), z (B, Hkv, F))."""
    batch, hq, n, _ = q.shape
    hkv, s, m = k.shape[1], k.shape[2], v.shape[3]
    f = phi_q.shape[-1]
    group = hq // hkv
    exact = exact_inputs is not None
    total = exact_sum if exact else fsum
    out = [[[[0.0] * m for _ in range(n)] for _ in range(hq)] for _ in range(batch)]
    final_s = np.zeros((batch, hkv, f, m))
    final_z = np.zeros((batch, hkv, f))
    flagged: list = []
    for b in range(batch):
        for h in range(hq):
            g = h // group
            # 1. Query-side and key-side feature vectors and the values, as lists.
            if exact:
                xq, xk, xv = (a.tolist() for a in exact_inputs)
                weights = feature_map.rational_features(xq[b][h][0])[0] if n else []
                fq = []
                for i in range(n):
                    _, u = feature_map.rational_features(xq[b][h][i])
                    fq.append([w * x for w, x in zip(weights, u)])
                fk = [feature_map.rational_features(xk[b][g][j])[1] for j in range(s)]
                vv = xv[b][g]
            else:
                fq, fk, vv = phi_q[b, h].tolist(), phi_k[b, g].tolist(), v[b, g].tolist()
            if initial_state is None:
                s0, z0 = [[0] * m for _ in range(f)], [0] * f
            else:
                s0, z0 = initial_state[0][b, g].tolist(), initial_state[1][b, g].tolist()
            # 2. The keys each query may see (a prefix when causal).
            allowed = [[j for j in range(s) if is_allowed(structure, b, i, j)] for i in range(n)]
            # 3. Numerator and denominator rows in the requested form.
            form_rows = _FORMS[form]
            rows = form_rows(fq, fk, vv, allowed, s0, z0, chunk_size, total)
            # 4. The reference sum_f |φ_f(q_i)| (sum_j |φ_f(k_j)| + |z0_f|), then the policy.
            for i, (num, den) in enumerate(rows):
                if not allowed[i] and initial_state is None:
                    continue
                abs_z = [total([abs(fk[j][t]) for j in allowed[i]] + [abs(z0[t])]) for t in range(f)]
                reference = total(abs(fq[i][t]) * abs_z[t] for t in range(f))
                out[b][h][i] = divide_row(num, den, reference, zero_denominator, rtol, (b, h, i), flagged)
            # 5. The state after every valid key, per key/value head.
            if h % group == 0:
                valid = [j for j in range(s) if j < int(structure.kv_lengths[b])]
                for t in range(f):
                    root = math.sqrt(weights[t]) if exact else 1.0
                    final_z[b, g, t] = float(total([fk[j][t] for j in valid] + [z0[t]])) * root
                    for c in range(m):
                        state = total([fk[j][t] * vv[j][c] for j in valid] + [s0[t][c]])
                        final_s[b, g, t, c] = float(state) * root
    raise_if_flagged(flagged, zero_denominator, rtol)
    out = np.array(out, dtype=np.float64).reshape(batch, hq, n, m)
    return out, final_s, final_z


def _dot(a, b, total):
    return total(x * y for x, y in zip(a, b))


def _row(fq_i, state_s, state_z, extra_num, extra_den, total):
    """Return (num (M,), den) = (φ(q)ᵀ S + extra, φ(q)ᵀ z + extra) as one sum each."""
    f, m = len(state_z), len(extra_num)
    num = [total([fq_i[t] * state_s[t][c] for t in range(f)] + extra_num[c]) for c in range(m)]
    den = total([fq_i[t] * state_z[t] for t in range(f)] + extra_den)
    return num, den


def _quadratic(fq, fk, vv, allowed, s0, z0, chunk_size, total):
    """A_ij = φ(q_i) . φ(k_j); num = sum_j A_ij v_j, den = sum_j A_ij (plus the state)."""
    m = len(s0[0]) if s0 else 0
    rows = []
    for i, keys in enumerate(allowed):
        scores = {j: _dot(fq[i], fk[j], total) for j in keys}
        extra_num = [[scores[j] * vv[j][c] for j in keys] for c in range(m)]
        rows.append(_row(fq[i], s0, z0, extra_num, [scores[j] for j in keys], total))
    return rows


def _parallel(fq, fk, vv, allowed, s0, z0, chunk_size, total):
    """S = s0 + sum_j φ(k_j) v_jᵀ and z over the keys of each query, then φ(q)ᵀ S / φ(q)ᵀ z."""
    f, m = len(z0), len(s0[0]) if s0 else 0
    rows = []
    for i, keys in enumerate(allowed):
        state_s = [[total([fk[j][t] * vv[j][c] for j in keys] + [s0[t][c]]) for c in range(m)]
                   for t in range(f)]
        state_z = [total([fk[j][t] for j in keys] + [z0[t]]) for t in range(f)]
        rows.append(_row(fq[i], state_s, state_z, [[] for _ in range(m)], [], total))
    return rows


def _recurrent(fq, fk, vv, allowed, s0, z0, chunk_size, total):
    """S_j = S_{j-1} + φ(k_j) v_jᵀ, z_j = z_{j-1} + φ(k_j), added one key at a time."""
    f, m = len(z0), len(s0[0]) if s0 else 0
    state_s = [list(row) for row in s0]
    state_z = list(z0)
    seen = 0
    rows = []
    for i, keys in enumerate(allowed):
        while seen < len(keys):  # the allowed keys are the prefix 0 .. len(keys) - 1
            j = keys[seen]
            for t in range(f):
                state_z[t] = state_z[t] + fk[j][t]
                for c in range(m):
                    state_s[t][c] = state_s[t][c] + fk[j][t] * vv[j][c]
            seen += 1
        rows.append(_row(fq[i], state_s, state_z, [[] for _ in range(m)], [], total))
    return rows


def _chunked(fq, fk, vv, allowed, s0, z0, chunk_size, total):
    """Carry the state across query chunks and add a quadratic block inside each chunk."""
    f, m = len(z0), len(s0[0]) if s0 else 0
    state_s = [list(row) for row in s0]
    state_z = list(z0)
    absorbed = 0
    rows = []
    for i0 in range(0, len(fq), chunk_size):
        chunk = range(i0, min(i0 + chunk_size, len(fq)))
        start = len(allowed[i0])
        # Move keys [absorbed, start) into the state, chunk_size keys per update.
        while absorbed < start:
            stop = min(absorbed + chunk_size, start)
            for t in range(f):
                state_z[t] = state_z[t] + total(fk[j][t] for j in range(absorbed, stop))
                for c in range(m):
                    state_s[t][c] = state_s[t][c] + total(
                        fk[j][t] * vv[j][c] for j in range(absorbed, stop)
                    )
            absorbed = stop
        for i in chunk:
            inside = allowed[i][start:]
            scores = {j: _dot(fq[i], fk[j], total) for j in inside}
            extra_num = [[scores[j] * vv[j][c] for j in inside] for c in range(m)]
            rows.append(_row(fq[i], state_s, state_z, extra_num, [scores[j] for j in inside], total))
    return rows


_FORMS = {
    "quadratic": _quadratic,
    "parallel": _parallel,
    "recurrent": _recurrent,
    "chunked": _chunked,
}
