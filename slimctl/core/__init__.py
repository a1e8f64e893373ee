"""Pruning: plan, compensation, exactness, surgery, BN folding and recalibration, sparsity, FLOPs, targets, sweeps."""
