"""alignmamba: AlignMamba (CVPR 2025) multimodal fusion in plain PyTorch.

>>> from alignmamba import AlignMamba, AlignMambaConfig
"""
from .errors import AlignMambaError
from .model import AlignMamba, AlignMambaConfig, ModelOutput, build_model, register_model

__version__ = "0.1.0"
__all__ = ["AlignMamba", "AlignMambaConfig", "AlignMambaError", "ModelOutput", "__version__",
           "build_model", "register_model"]
