"""The stages (train, prune, sweep, fine-tune, inspect), inference benchmarks and export."""
