"""dgplug: a plugin backend for Google's DiffusionGemma.

    import dgplug
    model = dgplug.load("path/to/checkpoint")          # safetensors directory
    out = model.generate(input_ids)                     # EntropyBound block diffusion
"""

from .errors import CheckpointError, DGPlugError, FormatError, InputError
from .loader import load

__version__ = "0.1.0"
__all__ = ["load", "DGPlugError", "CheckpointError", "FormatError", "InputError", "__version__"]
