"""wasmchord: run GGUF language models on any GPU through WebGPU, or on the CPU through NumPy."""

from .errors import (BackendError, ConfigError, ConvertError, GenerationError, GGUFError, PullError, TokenizerError,
                     UnsupportedError, WasmchordError)
from .formats.gguf import GGUFFile
from .hub import KNOWN_MODELS, pull
from .text.tokenizer import Tokenizer
from .model import Model

__version__ = "0.1.0"

__all__ = ["Model", "Tokenizer", "GGUFFile", "pull", "KNOWN_MODELS", "WasmchordError", "GGUFError", "UnsupportedError",
           "ConfigError", "TokenizerError", "PullError", "BackendError", "GenerationError", "ConvertError"]
