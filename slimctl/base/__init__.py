"""The vocabulary: leaves that import nothing of slimctl but errors (files, devices, the model registry, channel groups, the modules pruning inserts)."""
