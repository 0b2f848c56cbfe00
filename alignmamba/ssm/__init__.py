"""Pure-PyTorch selective state-space (Mamba-1) layers; see scan.py and mamba.py."""
from .mamba import Mamba, MambaLayer, MambaStack, RMSNorm
from .scan import selective_scan, selective_scan_chunked, selective_scan_ref

__all__ = [
    "Mamba",
    "MambaLayer",
    "MambaStack",
    "RMSNorm",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
]
