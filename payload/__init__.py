"""Ferry's training stack: what runs inside the image (`python -m payload train CFG`)."""

import os

# comet_ml, once imported (transformers imports it when installed), records every MLflow
# run as a Comet experiment of its own, and reads this switch when it patches: set here,
# before any import can pull it in. Comet's own run, when the config asks for one, gets
# its metrics from the trainer's integration, which this does not touch.
os.environ.setdefault("COMET_DISABLE_AUTO_LOGGING", "1")
