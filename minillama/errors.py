"""The project's exception types. Each message names the file, key or value at fault."""


class MinillamaError(Exception):
    """Base class: the CLI prints these as one line and exits with status 2."""


class ConfigError(MinillamaError, ValueError):
    """A config.json (or ModelConfig) that minillama cannot build a model from."""


class CheckpointError(MinillamaError):
    """A checkpoint directory or file that is missing, corrupt or does not match the model."""


class GenerationError(MinillamaError, ValueError):
    """Generation settings or inputs that cannot work (empty prompt, top_p outside (0, 1], ...)."""
