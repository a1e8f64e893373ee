"""What runs read and write: configs and self-describing checkpoints."""
