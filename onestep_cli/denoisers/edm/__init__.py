"""EDM image teachers (Karras et al. 2022): DDPM++, NCSN++ and ADM U-Nets behind EDM/VP/VE preconditioning.

Networks are our own implementation with EDM's parameter layout, so EDM and SiD snapshots load into them; `.pkl`
snapshots are read without running code from the file (`snapshot.py`), and exported as safetensors (`weights.py`).
"""

from .networks import DhariwalUNet, SongUNet
from .precond import EDMLoadError, EDMPrecond, VEPrecond, VPPrecond, build_precond
from .snapshot import load_edm_snapshot
from .weights import convert_snapshot, load_edm_weights, save_edm_weights

__all__ = [
    "DhariwalUNet", "EDMLoadError", "EDMPrecond", "SongUNet", "VEPrecond", "VPPrecond", "build_precond",
    "convert_snapshot", "load_edm_snapshot", "load_edm_weights", "save_edm_weights",
]
