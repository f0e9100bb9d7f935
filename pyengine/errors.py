"""Errors the user sees: one class per kind of failure, each message one clear sentence."""


class ModelLoadError(ValueError):
    """A model file (or a name that should lead to one) cannot be loaded as it is."""


class DeviceError(ModelLoadError):
    """The device the model should run on is not there (no CUDA backend in this build, no GPU)."""


class OptionError(ModelLoadError):
    """A command-line option has a value this engine does not take (e.g. an unknown KV cache type)."""


class ContextMemoryError(ModelLoadError):
    """The context asked for needs more KV cache memory than the device has available."""
