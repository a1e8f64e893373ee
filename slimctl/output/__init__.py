"""What runs show: tables and figures, progress, TensorBoard events, result tables."""
