import json
import os
import shutil

import pytest
import torch
from conftest import make_model
from safetensors import safe_open

from train_fixtures import base_model_dir, subset, tiny_config, tiny_data  # noqa: F401
from vistune.model.checkpoint import load_model
from vistune.train import run
from vistune.train.features import FeatureCache, cache_features_for_config, ensure_cache, read_index, storage_dtype
from tolerances import assert_reordered, trained_losses


def losses(r):
    return [json.loads(x)["loss"] for x in r.metrics_path.read_text().splitlines()]


def test_training_from_cached_features_equals_training_from_pixels(tiny_data, base_model_dir, tmp_path):
    common = {"model": {"from": str(base_model_dir)}, "train.max_steps": 3}
    plain = run(tiny_config(tiny_data, tmp_path / "pixels", common, stage=1))
    cfg = tiny_config(tiny_data, tmp_path / "cached", {**common, "data.feature_cache": str(tmp_path / "fc")}, stage=1)
    cached = run(cfg)
    # The cached features are the tower's own outputs, batched otherwise: a reordered forward per step.
    assert losses(cached) == pytest.approx(losses(plain), **trained_losses(3))
    index = read_index(tmp_path / "fc")
    assert index["num_records"] == 24 and index["num_images"] == 24 and index["num_tokens"] == 16
    shard = tmp_path / "fc" / index["records"]["0"]
    assert shard.exists() and shard.suffix == ".safetensors"
    # a second run reuses it: the shards are not rewritten
    before = shard.stat().st_mtime_ns
    model, _ = load_model(base_model_dir)
    assert ensure_cache(model, tiny_data["pretrain"], tiny_data["images"], tmp_path / "fc", progress=False)[1]
    assert shard.stat().st_mtime_ns == before


def test_cache_is_invalidated_by_encoder_images_or_data(tiny_data, base_model_dir, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_data["images"], data_dir / "images")
    data = subset(tiny_data["pretrain"], data_dir / "d.jsonl", 6)
    model, _ = load_model(base_model_dir)
    fc = tmp_path / "fc"
    _, reused = ensure_cache(model, data, data_dir / "images", fc, progress=False)
    assert not reused
    assert ensure_cache(model, data, data_dir / "images", fc, progress=False)[1]
    # an image changed on disk
    first, second = [json.loads(x)["image"] for x in data.read_text().splitlines()[:2]]
    img = data_dir / "images" / first
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    assert not ensure_cache(model, data, data_dir / "images", fc, progress=False)[1]
    # the data file changed
    with open(data, "a") as f:
        f.write(json.dumps({"id": "new", "image": second, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x."}]}) + "\n")
    assert not ensure_cache(model, data, data_dir / "images", fc, progress=False)[1]
    assert read_index(fc)["num_records"] == 7
    # the encoder changed
    with __import__("torch").no_grad():
        next(model.vision.parameters()).add_(0.01)
    assert not ensure_cache(model, data, data_dir / "images", fc, progress=False)[1]
    # image settings changed
    model.config.image.aspect = "resize"
    assert not ensure_cache(model, data, data_dir / "images", fc, progress=False)[1]
    assert ensure_cache(model, data, data_dir / "images", fc, progress=False)[1]
    cache = FeatureCache(fc)
    assert tuple(cache.get(6).shape) == (1, 16, 32)


def test_siglip_tower_features_are_cached_and_read_back(tiny_data, tokenizer, tmp_path):
    """SigLIP's features come in a permuted (non-contiguous) layout; the cache stores them all the same."""
    data = subset(tiny_data["pretrain"], tmp_path / "d.jsonl", 5)
    model, _ = make_model(tokenizer, "siglip", "qwen2", vision_feature_layer=-1)
    ensure_cache(model, data, tiny_data["images"], tmp_path / "fc", progress=False)
    cache = FeatureCache(tmp_path / "fc")
    from vistune.data.images import load_pixels, resolve_image_path
    from vistune.data.records import RecordFile

    recs = RecordFile(data)
    pix = torch.stack([load_pixels(resolve_image_path(recs[i].images[0], tiny_data["images"]), model.config.image)
                       for i in range(len(recs))])
    with torch.no_grad():
        want = model.vision(pix)
    assert not want.is_contiguous()  # what made the shard writer fail before
    for i in range(len(recs)):
        assert torch.equal(cache.get(i), want[i:i + 1])


def test_a_cache_split_into_shards_reads_back_as_one(tiny_data, base_model_dir, tmp_path):
    from vistune.data.records import RecordFile
    from vistune.train.features import build_cache, fingerprint

    data = subset(tiny_data["pretrain"], tmp_path / "d.jsonl", 7)
    model, _ = load_model(base_model_dir)
    recs = RecordFile(data)
    fp = fingerprint(model, data, tiny_data["images"], recs)
    whole = FeatureCache(build_cache(model, recs, tiny_data["images"], tmp_path / "one", fp, progress=False))
    split = FeatureCache(build_cache(model, recs, tiny_data["images"], tmp_path / "three", fp, progress=False,
                                     batch_images=2, shard_records=3))
    assert len(set(whole.where.values())) == 1
    assert sorted(set(split.where.values())) == [f"features-0000{k}.safetensors" for k in range(3)]
    assert sorted(split.where) == list(range(7)) and split.index["num_images"] == 7
    for i in range(7):  # the same tower (two CLIP blocks), batched otherwise: a reordered forward
        assert_reordered(split.get(i), whole.get(i), depth=2)


def test_cache_features_command_and_bad_images(tiny_data, base_model_dir, tmp_path):
    data = subset(tiny_data["pretrain"], tmp_path / "d.jsonl", 5)
    with open(data, "a") as f:
        f.write(json.dumps({"id": "gone", "image": "missing.png", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x."}]}) + "\n")
    cfg = tiny_config(tiny_data, tmp_path / "run", {"model": {"from": str(base_model_dir)}, "data.train": str(data),
                                                   "data.feature_cache": "auto", "train.max_steps": 1,
                                                   "train.max_bad_records": 1}, stage=1)
    info = cache_features_for_config(cfg)
    assert info["path"] == tmp_path / "run" / "feature_cache" and not info["reused"]
    assert info["num_records"] == 6 and info["num_images"] == 5
    assert "missing.png" in info["bad"]["5"]
    r = run(cfg)  # reuses the cache; the bad record is skipped by id
    assert [b["id"] for b in r.bad_records] == ["gone"]
    assert cache_features_for_config(cfg)["reused"]


def test_bf16_runs_store_bf16_features_and_train_on_the_same_numbers(tiny_data, base_model_dir, tmp_path,
                                                                     monkeypatch):
    from vistune.train import features

    def config(name):
        return tiny_config(tiny_data, tmp_path / name, {"model": {"from": str(base_model_dir)}, "train.max_steps": 3,
                                                        "train.precision": "bf16",
                                                        "data.feature_cache": str(tmp_path / f"fc-{name}")}, stage=1)

    def run_cached(name):
        return run(config(name)), read_index(tmp_path / f"fc-{name}")

    half, half_index = run_cached("bf16")
    assert cache_features_for_config(config("bf16"))["reused"]  # `vistune cache-features` builds what runs read
    assert half_index["dtype"] == "bfloat16" and half_index["fingerprint"]["features_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "fc-bf16" / half_index["records"]["0"]), "pt") as f:
        assert f.get_tensor("r0").dtype == torch.bfloat16
    monkeypatch.setattr(features, "storage_dtype", lambda model, mp: None)  # the fp32 cache of before
    full, full_index = run_cached("fp32")
    assert full_index["dtype"] == "float32" and "features_dtype" not in full_index["fingerprint"]
    # the projector's first Linear rounds to bf16 under autocast either way: the very same run
    assert losses(half) == losses(full)


def test_storage_dtype_only_rounds_what_a_linear_would_round(tokenizer):
    model, _ = make_model(tokenizer)  # mlp2x_gelu: Linear first
    assert storage_dtype(model, "bf16") == torch.bfloat16 and storage_dtype(model, "fp16") == torch.float16
    assert storage_dtype(model, "no") is None  # fp32 runs keep fp32 features
    model.projector = torch.nn.Linear(32, 64)
    assert storage_dtype(model, "bf16") == torch.bfloat16
    model.projector = torch.nn.Identity()  # features go straight into the LLM: not rounded
    assert storage_dtype(model, "bf16") is None


def test_fingerprint_covers_convolutional_towers_and_their_0_dim_buffers():
    """A ResNet tower (the demo's) holds BatchNorm's 0-dim counters: hashing them failed before."""
    from transformers import ResNetConfig, ResNetModel

    from vistune.train.features import _hash_tensors

    net = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    assert any(t.dim() == 0 for t in net.state_dict().values())
    before = _hash_tensors(net)
    assert _hash_tensors(net) == before
    next(b for n, b in net.named_buffers() if n.endswith("num_batches_tracked")).add_(1)
    assert _hash_tensors(net) != before


def test_cache_tokens_trains_on_the_same_numbers_over_epochs(tiny_data, base_model_dir, tmp_path):
    data = subset(tiny_data["instruct"], tmp_path / "d.jsonl", 8)
    common = {"model": {"from": str(base_model_dir)}, "data.train": str(data), "train.epochs": 3,
              "data.feature_cache": "auto"}
    plain = run(tiny_config(tiny_data, tmp_path / "plain", common))
    kept = run(tiny_config(tiny_data, tmp_path / "kept", {**common, "data.cache_tokens": True}))
    assert len(losses(kept)) == 6 and losses(kept) == losses(plain)
