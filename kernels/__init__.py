from .attention import flash_attn_func, flash_attn_varlen_func
from .rope import (RopeScaling, RopeTables, apply_rotary_emb, apply_rotary_emb_qk, rope_cos_sin,
                   rope_inv_freq, rotary_emb_ref)
from .cross_entropy import (cross_entropy, cross_entropy_ref, linear_cross_entropy,
                            linear_cross_entropy_ref)
