"""pyengine: run gpt-oss GGUF models with a compiled core and serve them over an OpenAI API."""

__version__ = "0.1.0"

from pyengine._cpu import simd_level
from pyengine.engine import Engine
from pyengine.errors import ModelLoadError
from pyengine.quants import dequantize

__all__ = ["__version__", "Engine", "ModelLoadError", "dequantize", "simd_level"]
