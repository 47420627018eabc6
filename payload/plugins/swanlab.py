"""Axolotl's SwanLab plugin, as Ferry reads it: SwanLab reporting is built into Ferry (the
`use_swanlab` / `swanlab_*` keys, payload.config.trackers), so listing the plugin, which
Axolotl needs for those keys, adds nothing; the run says so once."""

from __future__ import annotations

from typing import Any

from payload.plugins import Plugin


class SwanLabPlugin(Plugin):
    name = "swanlab"

    def after_config(self, cfg: Any) -> None:
        from payload.config.trackers import active

        on = any(t.package == "swanlab" for t in active(cfg))
        said = "reports through Ferry's own SwanLab tracker" if on else "SwanLab is off"
        print(f"plugins: swanlab: {said} (the plugin adds nothing in Ferry)", flush=True)
