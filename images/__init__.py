"""The runtime image: one spec (`images.spec`) rendered for every backend
(`images.render`). Nothing heavy: the Modal SDK loads only to build a `modal.Image`."""

from images.spec import EXTRAS, ImageSpec, default_spec

__all__ = ["EXTRAS", "ImageSpec", "default_spec"]
