"""VisionTower: features from the chosen layer, without running the layers after it."""
from __future__ import annotations

import pytest
import torch

from vistune.model.tiny import tiny_vision_config
from vistune.model.vision import VisionTower, _hidden_state_layers, load_vision_model


def _tower(kind: str, feature_layer: int, layers: int = 4, seed: int = 0) -> VisionTower:
    torch.manual_seed(seed)
    model = load_vision_model(tiny_vision_config(kind, layers=layers)).eval()
    return VisionTower(model, feature_layer=feature_layer)


def _full(tower: VisionTower, pixels: torch.Tensor) -> torch.Tensor:
    """What the tower returned before skipping: the whole encoder, hidden_states[feature_layer]."""
    hs = tower.model(pixel_values=pixels, output_hidden_states=True).hidden_states[tower.feature_layer]
    return hs[:, 1:] if tower.select == "patch" and tower.has_cls else hs


def _count_layer_calls(tower: VisionTower) -> list[int]:
    layers, _ = _hidden_state_layers(tower.model)
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("feature_layer", [-1, -2, -3, 0])
def test_features_bit_identical_to_full_forward(kind, feature_layer):
    tower = _tower(kind, feature_layer)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = tower(pixels)
        want = _full(tower, pixels)
    assert torch.equal(got, want)
    off = _tower(kind, feature_layer)
    off.skip_unused_layers = False
    with torch.no_grad():
        assert torch.equal(off(pixels), want)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("feature_layer,runs", [(-2, [1, 1, 1, 0]), (-1, [1, 1, 1, 1]), (1, [1, 0, 0, 0]),
                                                (0, [0, 0, 0, 0])])
def test_layers_after_the_feature_layer_do_not_run(kind, feature_layer, runs):
    tower = _tower(kind, feature_layer)
    tower.num_tokens()  # the first probe checks the skip against the full forward: not counted
    layers, _ = _hidden_state_layers(tower.model)
    # the stopping hook lives for one forward only (transformers keeps its own recording hooks)
    hooks = [(len(layer._forward_hooks), len(layer._forward_pre_hooks)) for layer in layers]
    with torch.no_grad():
        tower(torch.randn(1, 3, 32, 32))
    assert [(len(layer._forward_hooks), len(layer._forward_pre_hooks)) for layer in layers] == hooks
    calls = _count_layer_calls(tower)
    with torch.no_grad():
        tower(torch.randn(2, 3, 32, 32))
    assert calls == runs


def test_skip_off_runs_every_layer():
    tower = _tower("clip", -2)
    tower.skip_unused_layers = False
    tower.num_tokens()
    calls = _count_layer_calls(tower)
    with torch.no_grad():
        tower(torch.randn(1, 3, 32, 32))
    assert calls == [1, 1, 1, 1]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainable_tower_gets_the_same_gradients(checkpointing):
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    grads = []
    for skip in (True, False):
        tower = _tower("clip", -2)
        tower.skip_unused_layers = skip
        tower.model.train()
        if checkpointing:
            tower.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        tower(pixels).pow(2).mean().backward()
        grads.append({n: p.grad for n, p in tower.model.named_parameters()})
    skipped, full = grads
    assert skipped.keys() == full.keys()
    for name in full:
        if full[name] is None:  # the unused last layer gets no gradient either way
            assert skipped[name] is None, name
        else:
            assert torch.equal(skipped[name], full[name]), name
    assert any(g is not None for g in skipped.values())


def test_full_tower_is_kept_and_saved():
    tower = _tower("clip", -2)
    before = {k: v.clone() for k, v in tower.model.state_dict().items()}
    with torch.no_grad():
        tower(torch.randn(1, 3, 32, 32))
    after = tower.model.state_dict()
    assert after.keys() == before.keys()
    assert any(".layers.3." in k for k in after)  # the skipped layer is still part of the tower
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_towers_without_layer_bookkeeping_run_whole():
    """Convolutional towers (ResNet) have no per-layer hidden states to stop at: unchanged behaviour."""
    from transformers import ResNetConfig

    torch.manual_seed(0)
    model = load_vision_model(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).eval()
    tower = VisionTower(model, feature_layer=-2, image_size=32)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2].flatten(2).transpose(1, 2)
        assert torch.equal(tower(pixels), want)
