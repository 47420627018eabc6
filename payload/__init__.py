"""Ferry's training stack: what runs inside the image (`python -m payload train CFG`)."""
