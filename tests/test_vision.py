"""VisionTower: features from the chosen layer."""
from __future__ import annotations

import pytest
import torch

from vistune.model.tiny import tiny_vision_config
from vistune.model.vision import VisionTower, load_vision_model


def _tower(kind: str, feature_layer: int, layers: int = 4, seed: int = 0) -> VisionTower:
    torch.manual_seed(seed)
    model = load_vision_model(tiny_vision_config(kind, layers=layers)).eval()
    return VisionTower(model, feature_layer=feature_layer)


def _full(tower: VisionTower, pixels: torch.Tensor) -> torch.Tensor:
    """The whole encoder's hidden_states[feature_layer], as transformers' LLaVA reads it."""
    hs = tower.model(pixel_values=pixels, output_hidden_states=True).hidden_states[tower.feature_layer]
    return hs[:, 1:] if tower.select == "patch" and tower.has_cls else hs


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("feature_layer", [-1, -2, -3, 0])
def test_features_bit_identical_to_full_forward(kind, feature_layer):
    tower = _tower(kind, feature_layer)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = tower(pixels)
        want = _full(tower, pixels)
    assert torch.equal(got, want)


def test_full_tower_is_kept_and_saved():
    tower = _tower("clip", -2)
    before = {k: v.clone() for k, v in tower.model.state_dict().items()}
    with torch.no_grad():
        tower(torch.randn(1, 3, 32, 32))
    after = tower.model.state_dict()
    assert after.keys() == before.keys()
    assert any(".layers.3." in k for k in after)  # the layer after the feature layer is still part of the tower
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_towers_without_layer_bookkeeping_run_whole():
    """Convolutional towers (ResNet): the chosen stage's feature map, flattened into tokens."""
    from transformers import ResNetConfig

    torch.manual_seed(0)
    model = load_vision_model(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).eval()
    tower = VisionTower(model, feature_layer=-2, image_size=32)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2].flatten(2).transpose(1, 2)
        assert torch.equal(tower(pixels), want)
