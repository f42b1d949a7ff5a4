"""The training loop and what it owns: state, numerics, run folder, metrics, checkpoints."""
