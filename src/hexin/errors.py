"""hexin's error types: each one is a problem the user can act on, reported without a traceback."""


class HexinError(Exception):
    """Base class: the CLI and server print these as one clear line."""


class ModelFormatError(HexinError):
    """A model file or folder is missing, truncated, malformed or of an unsupported kind."""


class ModelNotFoundError(HexinError):
    """``--model`` names nothing that exists and no registered model of that name."""


class UnsupportedOption(HexinError, ValueError):
    """A device, dtype or quantization choice this machine or model cannot run."""
