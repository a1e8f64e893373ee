"""slimctl: network slimming (Liu et al., ICCV 2017) as a train → prune → fine-tune pipeline.

Python API:
    load_model(path, device="cpu")           the eval-mode model stored in a checkpoint
    save_checkpoint(path, checkpoint)        atomic write of a checkpoint dict (see make_checkpoint)
    prune_model(model, ratio, ...)           (narrower model, plan, exactness, notes)
    fold_bn(model)                           an eval-mode copy with each BN folded into its conv where exact
"""

from slimctl._version import __version__
from slimctl.fold import fold_bn
from slimctl.checkpoint import load_model, make_checkpoint, save_checkpoint
from slimctl.surgery import prune_model

__all__ = ["__version__", "fold_bn", "load_model", "make_checkpoint", "prune_model", "save_checkpoint"]
