"""Backbones behind one registry; importing this package registers them all."""

from tnet.backbones import bagnet, timm_backbones, tiny  # noqa: F401  (registration)
from tnet.backbones.registry import Backbone, available, create_backbone, register

__all__ = ["Backbone", "available", "create_backbone", "register"]
