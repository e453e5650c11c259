"""A causal linear attention that multiplies by its normaliser, caught by kernattn.

out_i = φ(q_i)ᵀ S_i / φ(q_i)ᵀ z_i with prefix sums S_i = Σ_{j<=i} φ(k_j) v_jᵀ and
z_i = Σ_{j<=i} φ(k_j). The bug multiplies by the denominator where it should divide, a
slip that has shipped in real code. With q = k = 0 and elu+1 every feature is 1, so the
right rows are the running means [0, 0.5, 1, 1.5]; the buggy ones are [0, 2, 9, 24].
"""

import numpy as np

import kernattn
from kernattn import feature_maps
from kernattn.testing import assert_attention_close


def elu_plus_one(x):
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def my_causal_linear_attention(q, k, v):
    """Return causal linear attention for q, k (N, D) and v (N, M) with elu+1 features."""
    phi_q, phi_k = elu_plus_one(q), elu_plus_one(k)
    state = np.cumsum(phi_k[:, :, None] * v[:, None, :], axis=0)  # S_i: (N, F, M)
    normaliser = np.cumsum(phi_k, axis=0)  # z_i: (N, F)
    numerator = np.einsum("nf,nfm->nm", phi_q, state)
    denominator = np.einsum("nf,nf->n", phi_q, normaliser)[:, None]
    return numerator * denominator  # the bug: numerator / denominator is right


def main() -> None:
    q = k = np.zeros((4, 1))
    v = np.arange(4.0)[:, None]
    expected = kernattn.linear_attention(q, k, v, feature_maps.EluPlusOne(), causal=True)
    print("kernattn:", expected.ravel(), " yours:", my_causal_linear_attention(q, k, v).ravel())
    try:
        assert_attention_close(my_causal_linear_attention(q, k, v), expected)
    except AssertionError as failure:
        print(failure)


if __name__ == "__main__":
    main()
