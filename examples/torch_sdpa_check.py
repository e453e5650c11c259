"""Check PyTorch's scaled_dot_product_attention against kernattn, tensors passed as they are.

PyTorch's `is_causal` is top-left aligned, so the matching kernattn option is
causal="top_left". The float32 result is judged against the float64 oracle with
float32 tolerances. Without PyTorch the example says so and exits.
"""

import numpy as np

import kernattn
from kernattn.testing import assert_attention_close


def main() -> None:
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed; nothing to check")
        return
    rng = np.random.default_rng(0)
    q = torch.tensor(rng.normal(size=(2, 8, 5, 16)), dtype=torch.float32)
    k = torch.tensor(rng.normal(size=(2, 2, 9, 16)), dtype=torch.float32)
    v = torch.tensor(rng.normal(size=(2, 2, 9, 16)), dtype=torch.float32)
    actual = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True
    )
    expected = kernattn.softmax_attention(q, k, v, causal="top_left")
    assert_attention_close(actual, expected)
    print("PyTorch SDPA (is_causal=True, GQA) matches kernattn causal='top_left'")
    wrong = kernattn.softmax_attention(q, k, v, causal="bottom_right")
    try:
        assert_attention_close(actual, wrong)
    except AssertionError as failure:
        print("and differs from causal='bottom_right':", str(failure).splitlines()[0])


if __name__ == "__main__":
    main()
