"""Visual tokenizers behind one interface: kl16 (MAR VAE), vq16 (LlamaGen VQ), patch and pixel."""
from .base import Tokenizer, codes_to_tokens, discrete_storage_dtype, moments_to_tokens, tokens_to_grid
from .checkpoint import TokenizerCheckpointError
from .factory import build_tokenizer
from .kl16 import KL16Tokenizer
from .pixels import PatchTokenizer, PixelTokenizer
from .vq16 import VQ16Tokenizer

__all__ = ["KL16Tokenizer", "PatchTokenizer", "PixelTokenizer", "Tokenizer", "TokenizerCheckpointError",
           "VQ16Tokenizer", "build_tokenizer", "codes_to_tokens", "discrete_storage_dtype", "moments_to_tokens",
           "tokens_to_grid"]
