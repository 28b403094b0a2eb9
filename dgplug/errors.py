"""One error type per failure family; each message names the file, tensor or value at fault."""


class DGPlugError(Exception):
    """Base class: the CLI prints these as one line (no traceback unless --debug)."""


class CheckpointError(DGPlugError):
    """A checkpoint (config, index, shard, tensor) is missing, malformed or inconsistent."""


class FormatError(DGPlugError):
    """A GGUF or quantized file violates its format."""


class InputError(DGPlugError):
    """Bad arguments or inputs to generation (ids, images, lengths)."""
