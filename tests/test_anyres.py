"""AnyRes (LLaVA-NeXT): grid selection, tiles, token counts against transformers, the model's merge."""
from __future__ import annotations

import pytest
import torch
from conftest import make_model, noise_image
from transformers import LlavaNextProcessor
from transformers.image_processing_utils import select_best_resolution as hf_select
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from vistune.data.anyres import (anyres_max_tokens, anyres_token_count, default_pinpoints, grid_shape, parse_pinpoints,
                                 select_best_resolution, tile_image)
from vistune.data.images import ImageConfig
from vistune.model.anyres import NEWLINE
from vistune.text.encode import encode_conversation

# LLaVA-v1.6's own grids ([width, height], symmetric) and an asymmetric list where the order matters.
V16 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
ASYM = [[336, 672], [1008, 336], [672, 672], [1344, 336]]
SIZES = [(1000, 300), (300, 1000), (336, 336), (640, 480), (480, 640), (1920, 1080), (100, 2000), (2000, 100),
         (672, 672), (337, 673), (50, 60), (1344, 336), (800, 799), (13, 1000)]


def llava_next_rule(size, pinpoints):
    """LLaVA-NeXT's select_best_resolution, restated from its definition (width, height throughout)."""
    ow, oh = size
    best, best_eff, best_waste = None, 0, float("inf")
    for w, h in pinpoints:
        s = min(w / ow, h / oh)
        eff = min(int(ow * s) * int(oh * s), ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (w, h), eff, waste
    return best


@pytest.mark.parametrize("pinpoints", [V16, ASYM])
def test_grid_selection_follows_llava_next_rule(pinpoints):
    for size in SIZES:
        got = select_best_resolution(size, [tuple(p) for p in pinpoints])
        assert got == llava_next_rule(size, pinpoints), size
        # transformers states the same rule in (height, width)
        h, w = hf_select((size[1], size[0]), [[p[1], p[0]] for p in pinpoints])
        assert got == (w, h), size


def test_grid_selection_table():
    pts = [tuple(p) for p in V16]
    assert select_best_resolution((1000, 300), pts) == (1008, 336)  # wide: 3 tiles across
    assert select_best_resolution((300, 1000), pts) == (336, 1008)
    assert select_best_resolution((640, 480), pts) == (672, 672)  # most pixels kept, then least waste
    assert select_best_resolution((336, 336), pts) == (336, 672)  # the first two tie (all kept, same waste): first
    cfg = ImageConfig(size=336, aspect="anyres", grid_pinpoints=V16)
    assert grid_shape((1000, 300), cfg) == (3, 1)
    assert anyres_max_tokens(cfg, 576) == 576 + 48 * 49 == anyres_token_count((672, 672), cfg, 576)


def test_pinpoints_parse_range_and_bound():
    assert parse_pinpoints("(1x1),...,(2x3)", 32) == [(32, 32), (32, 64), (32, 96), (64, 32), (64, 64), (64, 96)]
    with pytest.raises(ValueError, match="multiple of the tile size 32"):
        parse_pinpoints([[32, 40]], 32)
    cfg = ImageConfig(size=32, aspect="anyres", grid_pinpoints="(1x1),...,(3x3)", max_tiles=4)
    assert all((w // 32) * (h // 32) <= 4 for w, h in cfg.pinpoints) and (96, 96) not in cfg.pinpoints
    assert select_best_resolution((960, 960), cfg.pinpoints) == (64, 64)  # the 3x3 grid is out of bounds
    with pytest.raises(ValueError, match="max_tiles 1 leaves none"):
        ImageConfig(size=32, aspect="anyres", grid_pinpoints=[[64, 64]], max_tiles=1)
    assert ImageConfig(size=32, aspect="anyres").grid_pinpoints == [list(p) for p in default_pinpoints(32)]
    assert "grid_pinpoints" not in ImageConfig().to_dict()  # other aspects' configs stay as they were


def _hf_processor(tokenizer, tile: int, patch: int, pinpoints):
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                    image_grid_pinpoints=[[h, w] for w, h in pinpoints])  # transformers: (h, w)
    return LlavaNextProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=patch,
                              vision_feature_select_strategy="default", image_token="<image>",
                              num_additional_image_tokens=1)


@pytest.mark.parametrize("tile,patch,pinpoints", [(336, 14, V16), (336, 14, ASYM), (32, 8, None)])
def test_token_counts_equal_transformers(tokenizer, tile, patch, pinpoints):
    cfg = ImageConfig(size=tile, aspect="anyres", grid_pinpoints=pinpoints)
    proc = _hf_processor(tokenizer, tile, patch, cfg.grid_pinpoints)
    per_tile = (tile // patch) ** 2
    for w, h in SIZES:
        want = proc._get_number_of_features(h, w, tile, tile) - 1  # "default": no CLS
        assert anyres_token_count((w, h), cfg, per_tile) == want, (w, h)
        assert want <= anyres_max_tokens(cfg, per_tile)


def test_tiles_equal_transformers_pixels(tokenizer):
    cfg = ImageConfig(size=32, aspect="anyres")
    proc = _hf_processor(tokenizer, 32, 8, cfg.grid_pinpoints)
    for size in [(40, 30), (100, 20), (20, 100), (64, 64), (33, 97)]:
        img = noise_image(seed=size[0], size=size)
        mine = tile_image(img, cfg)
        theirs = proc.image_processor(img, return_tensors="pt")
        assert mine.size == size and theirs["image_sizes"][0].tolist() == [size[1], size[0]]
        assert torch.equal(mine.pixels, theirs["pixel_values"][0][: mine.pixels.shape[0]])


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_model_merges_tiles_with_newlines(tokenizer, vision):
    model, _ = make_model(tokenizer, vision, image_aspect="anyres")
    cfg = model.config.image
    newline = getattr(model.projector, NEWLINE)
    assert newline.shape == (model.language_model.config.hidden_size,)
    for size in [(100, 20), (20, 100), (64, 64)]:
        t = tile_image(noise_image(size=size), cfg)
        with torch.no_grad():
            (out,) = model.encode_images(t.pixels, torch.tensor([t.size]))
            tiles = model.project(model.vision(t.pixels))
        n = anyres_token_count(size, cfg, model.config.num_image_tokens)
        assert out.shape == (n, newline.shape[0])
        assert torch.equal(out[:16], tiles[0])  # base tile first
        grid = out[16:]
        cols, rows = grid_shape(size, cfg)
        ends = torch.isclose(grid, newline).all(-1).nonzero().flatten().tolist()
        width = ends[0] + 1
        assert ends == list(range(width - 1, len(grid), width))  # a newline closes every row
        if size == (64, 64):  # nothing to unpad: the 2x2 grid's first row is tile 1's then tile 2's first rows
            assert width - 1 == 8 and torch.equal(grid[:4], tiles[1, :4]) and torch.equal(grid[4:8], tiles[2, :4])


def test_encode_expands_each_image_to_its_count(tokenizer):
    model, tok = make_model(tokenizer, image_aspect="anyres")
    iid = model.config.image_token_id
    turns = [{"from": "human", "value": "<image> what <image> is"}, {"from": "gpt", "value": "red"}]
    enc = encode_conversation(tok, "vicuna_v1", turns, image_token_id=iid, num_image_tokens=[44, 52])
    ids = enc.input_ids
    first = ids.index(iid)
    assert ids[first:first + 44] == [iid] * 44 and ids[first + 44] != iid
    assert ids.count(iid) == 96


def test_anyres_refuses_a_cls_token_in_the_map(tokenizer):
    with pytest.raises(ValueError, match="square map of features per tile"):
        make_model(tokenizer, image_aspect="anyres", vision_feature_select="cls_patch")
