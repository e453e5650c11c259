"""A degree-2 polynomial feature map without the √2 on its cross terms, caught by kernattn.

For φ(x)·φ(y) to equal (x·y)², the cross term x_i x_j (i < j) must carry √2, the square
root of its multinomial coefficient 2. Without it, x = (1, 2) and y = (3, 1) give 19
instead of 25. The checker finds such a pair on its own.
"""

import numpy as np

from kernattn.testing import check_feature_map


def my_feature_map(x):
    """Return [x_i², x_i x_j (i < j)] for x of shape (..., D)."""
    x = np.asarray(x, dtype=float)
    i, j = np.triu_indices(x.shape[-1], 1)
    return np.concatenate([x**2, x[..., i] * x[..., j]], axis=-1)  # the bug: no √2


def squared_dot(x, y):
    return float(np.dot(x, y)) ** 2


def main() -> None:
    x, y = np.array([1.0, 2.0]), np.array([3.0, 1.0])
    print("φ(x)·φ(y) =", my_feature_map(x) @ my_feature_map(y), " (x·y)² =", squared_dot(x, y))
    print(check_feature_map(my_feature_map, squared_dot, random_state=0))


if __name__ == "__main__":
    main()
