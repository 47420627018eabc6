"""Where a run's files live. Torch-free: the launcher reads run outputs through it."""
