"""kernattn: reference attention to check fast attention kernels against.

Importing kernattn compiles nothing and loads no GPU library; fast backends load on
first use.
"""

from kernattn._validate import DTypeError, OptionError, ShapeError
from kernattn.masks import alibi_bias, structural_mask
from kernattn.softmax import merge_attention_states, softmax_attention

__all__ = [
    "DTypeError",
    "OptionError",
    "ShapeError",
    "alibi_bias",
    "merge_attention_states",
    "softmax_attention",
    "structural_mask",
]

__version__ = "0.1.0"
