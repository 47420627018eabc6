"""The runtime image spec and what it renders to (Dockerfile, modal.Image, SkyPilot setup,
Ray runtime env). Built by the image issue (#6); the local backend runs on this machine's
own Python and needs no image."""
