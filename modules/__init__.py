"""Plain PyTorch building blocks of Llama-family models (no imports from training/recipes)."""

from tunelab.modules.attention import Attention, KVCache
from tunelab.modules.feed_forward import FeedForward
from tunelab.modules.generation import generate, sample_next_token
from tunelab.modules.rms_norm import RMSNorm
from tunelab.modules.rope import RotaryEmbedding, apply_rope, rope_inv_freq, rotate_half
from tunelab.modules.transformer import TransformerDecoder, TransformerDecoderLayer

__all__ = [
    "Attention",
    "FeedForward",
    "KVCache",
    "RMSNorm",
    "RotaryEmbedding",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "apply_rope",
    "generate",
    "rope_inv_freq",
    "rotate_half",
    "sample_next_token",
]
