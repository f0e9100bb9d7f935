"""pyengine: run gpt-oss GGUF models with a compiled core and serve them over an OpenAI API.

The public names load on first use, so `import pyengine.cli` starts fast and a Ctrl-C during
start-up reaches the command line's handler (one quiet exit 130) rather than an import."""

__version__ = "0.1.0"

__all__ = ["__version__", "Engine", "EngineState", "ModelLoadError", "dequantize", "simd_level"]

_LAZY = {"Engine": "pyengine.engine", "EngineState": "pyengine.engine_state", "ModelLoadError": "pyengine.errors",
         "dequantize": "pyengine.quants", "simd_level": "pyengine._cpu"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'pyengine' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
