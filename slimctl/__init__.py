"""slimctl: network slimming (Liu et al., ICCV 2017) as a train → prune → fine-tune pipeline.

Python API:
    load_model(path, device="cpu")           the eval-mode model stored in a checkpoint
    save_checkpoint(path, checkpoint)        atomic write of a checkpoint dict (see make_checkpoint)
    prune_model(model, ratio, ...)           (narrower model, channel plan)
"""

from slimctl._version import __version__
from slimctl.checkpoint import load_model, make_checkpoint, save_checkpoint
from slimctl.surgery import prune_model

__all__ = ["__version__", "load_model", "make_checkpoint", "prune_model", "save_checkpoint"]
