"""Ferry's local side: the `launch` CLI and the Python API beneath it (`launcher.api`)."""
