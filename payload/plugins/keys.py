"""The base of a plugin's config keys (`payload.plugins.PluginConfig`), apart so that
importing payload.plugins does not build a pydantic model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class PluginConfig(BaseModel):
    """The keys a plugin adds (subclass it; the fields are top-level config keys)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
