"""Where a run's files live: local output folders (`layout`), and the storage URIs that
checkpoints and artifacts are synced to (`stores`, `sync`). Torch-free: the launcher
reads runs through it; boto3 and modal load only when a store of their kind opens."""

from payload.storage.stores import StorageCheckError, Store, check_uri, open_store
from payload.storage.sync import (
    CHECKPOINTS,
    FINAL,
    MANIFEST,
    Checkpoint,
    Manifest,
    Transfer,
    apply_retention,
    download_folder,
    latest_complete_checkpoint,
    list_checkpoints,
    upload_checkpoint,
    upload_folder,
)

__all__ = [
    "CHECKPOINTS",
    "FINAL",
    "MANIFEST",
    "Checkpoint",
    "Manifest",
    "StorageCheckError",
    "Store",
    "Transfer",
    "apply_retention",
    "check_uri",
    "download_folder",
    "latest_complete_checkpoint",
    "list_checkpoints",
    "open_store",
    "upload_checkpoint",
    "upload_folder",
]
