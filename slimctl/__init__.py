"""slimctl: network slimming (Liu et al., ICCV 2017) as a train → prune → fine-tune pipeline.

Python API:
    load_model(path, device="cpu")           the eval-mode model stored in a checkpoint
    save_checkpoint(path, checkpoint)        atomic write of a checkpoint dict (see make_checkpoint)
    prune_model(model, ratio, ...)           (narrower model, plan, exactness, notes)
    measure_exactness(model, pruned, plan, mode)  the pruned model against what its mode promises
    fold_bn(model)                           an eval-mode copy with each BN folded into its conv where exact

The package, bottom up (each layer imports only itself and the layers below; tests/test_layering.py):
errors and _version; base (vocabulary); models and trace; core (pruning); io (configs,
checkpoints); data; train; output (tables, figures, progress); pipeline (stages, bench, export);
cli, and this API.
"""

from slimctl._version import __version__
from slimctl.core.exactness import measure_exactness
from slimctl.core.fold import fold_bn
from slimctl.core.surgery import prune_model
from slimctl.io.checkpoint import load_model, make_checkpoint, save_checkpoint

__all__ = ["__version__", "fold_bn", "load_model", "make_checkpoint", "measure_exactness", "prune_model",
           "save_checkpoint"]
