"""kernattn: reference attention to check fast attention kernels against.

Importing kernattn compiles nothing and loads no GPU library; fast backends load on
first use.
"""

from kernattn._validate import DTypeError, OptionError, ShapeError
from kernattn.decode import decode_attention
from kernattn.masks import alibi_bias, structural_mask
from kernattn.multihead import (
    AttentionParams,
    KVCache,
    from_torch_multihead_attention,
    multi_head_attention,
)
from kernattn.softmax import merge_attention_states, softmax_attention
from kernattn import feature_maps
from kernattn.linear import linear_attention
from kernattn.similarity import ZeroDenominatorError, similarity_attention

__all__ = [
    "AttentionParams",
    "DTypeError",
    "KVCache",
    "OptionError",
    "ShapeError",
    "ZeroDenominatorError",
    "alibi_bias",
    "decode_attention",
    "feature_maps",
    "from_torch_multihead_attention",
    "linear_attention",
    "merge_attention_states",
    "multi_head_attention",
    "similarity_attention",
    "softmax_attention",
    "structural_mask",
]

__version__ = "0.1.0"
