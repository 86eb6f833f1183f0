"""A write-once registry of feature extractors.

Every backbone returns ``(features, location_map)``: the pooled feature vector (B, D) that TNet
aggregates, and the spatial map (B, C, h, w) the location module scores cells from. It also says
how wide and how strided those are, so ``tnet/model.py`` never hard-codes a backbone's width.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


class Backbone(nn.Module):
    """Contract of a TNet feature extractor."""

    num_features: int  # D of the pooled vector
    loc_channels: int  # C of the location map
    loc_reduction: int  # input pixels per location-map cell

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


BackboneFactory = Callable[..., Backbone]
_REGISTRY: dict[str, BackboneFactory] = {}


def register(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Register a factory once; a second registration of a name is a programming error."""

    def wrap(factory: BackboneFactory) -> BackboneFactory:
        if name in _REGISTRY:
            raise ValueError(f"backbone={name!r}: already registered")
        _REGISTRY[name] = factory
        return factory

    return wrap


def available() -> list[str]:
    return sorted(_REGISTRY)


def create_backbone(
    name: str, *, in_chans: int = 3, drop_path: float = 0.0, weights: str | None = None
) -> Backbone:
    """Build a registered backbone; ``weights`` is an optional local state_dict file.

    Raises:
        ValueError: unknown name.
        FileNotFoundError: ``weights`` given but missing.
    """
    if name not in _REGISTRY:
        raise ValueError(f"backbone={name!r}: unknown (available: {available()})")
    model = _REGISTRY[name](in_chans=in_chans, drop_path=drop_path)
    if weights:
        load_local_weights(model, weights)
    return model


def load_local_weights(model: nn.Module, path: str) -> None:
    """Load pretrained weights from a local file, never from a hub, never unpickling objects.

    Accepts a plain state_dict or one nested under "state_dict"/"model"; keys may carry a
    "model." prefix (our own wrapper) or not (a timm checkpoint of the bare network).
    """
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    for nested in ("state_dict", "model"):
        if isinstance(state, dict) and nested in state and isinstance(state[nested], dict):
            state = state[nested]
    target = model.model if hasattr(model, "model") and isinstance(model.model, nn.Module) else model
    own = target.state_dict()
    cleaned = {k.removeprefix("model."): v for k, v in state.items()}
    usable = {k: v for k, v in cleaned.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"{path}: no tensor matches the backbone's parameters")
    target.load_state_dict(usable, strict=False)
