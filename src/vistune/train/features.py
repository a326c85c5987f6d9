"""Feature cache for frozen vision towers.

With the tower frozen (stage 1, and LLaVA's stage 2), its output for an image never
changes, so it can be computed once and read back at every epoch and every run:

    DIR/index.json                     format, fingerprint, which shard holds each record
    DIR/features-00000.safetensors     one tensor per record: "r<index>" (images, tokens, width);
                                       anyres: (all its images' tiles, tokens, width), and
                                       "s<index>" (images, 2), each image's (width, height)

The fingerprint covers the tower's weights and feature settings, the image settings,
the data file's content and every referenced image's size and modification time;
any change rebuilds the cache (the log says which part changed). The cache is written
to a temporary directory and renamed, so an interrupted build leaves no half cache.

Runs under bf16 / fp16 autocast store the features in that dtype (half the disk and
reads of fp32): the projector's first Linear casts its input to it anyway, so training
sees the very same numbers (see ``storage_dtype``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..data.dataset import SampleError, VLDataset, image_pixels
from ..data.images import ImageError, resolve_image_path
from ..data.records import RecordError, RecordFile
from ..files import atomic_directory
from ..model.vlm import VisionLanguageModel
from ..data.settings import TextSettings
from .config import ConfigError, RunConfig

log = logging.getLogger("vistune.train")

CACHE_FORMAT = 1
INDEX = "index.json"


# -- fingerprint ---------------------------------------------------------------------
def _hash_tensors(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        # reshape(-1): a 0-dim buffer (BatchNorm's num_batches_tracked in a ResNet tower) cannot be
        # viewed as bytes as it is.
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(model: VisionLanguageModel, data_file: str | os.PathLike, image_dir: str | os.PathLike | None,
                records: RecordFile, dtype: torch.dtype | None = None) -> dict:
    """What the cached features depend on, part by part."""
    tower = model.vision
    images = hashlib.sha256()
    for i in range(len(records)):
        try:
            rec = records[i]
        except RecordError:
            continue
        for name in rec.images:
            p = resolve_image_path(name, image_dir)
            try:
                st = p.stat()
                images.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                images.update(f"{name}\0missing\n".encode())
    fp = {
        "encoder": _hash_tensors(tower.model),
        "feature_settings": f"layer={tower.feature_layer} select={tower.select}",
        "image_settings": json.dumps(model.config.image.to_dict(), sort_keys=True),
        "data": _hash_file(Path(data_file)),
        "images": images.hexdigest(),
    }
    if dtype is not None:  # absent for features kept as computed: caches built before stay valid
        fp["features_dtype"] = str(dtype).removeprefix("torch.")
    return fp


# What a run's matmuls compute in, by accelerate's mixed-precision name ("no": fp32, absent here).
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def storage_dtype(model: VisionLanguageModel, mixed_precision: str) -> torch.dtype | None:
    """The dtype to store features in for a run at ``mixed_precision`` ("no", "bf16", "fp16").

    Under autocast, the projector's first Linear rounds its input to the autocast dtype
    before anything else reads it, so storing features already rounded changes no
    number of the run. Other projectors (identity) feed the LLM directly: kept as
    computed (None).
    """
    low = AUTOCAST_DTYPES.get(mixed_precision)
    if getattr(model, "connector", None) is not None:
        return None  # a connector reads them first, its LayerNorm in fp32: kept as computed
    proj = model.projector
    first = proj[0] if isinstance(proj, torch.nn.Sequential) and len(proj) else proj
    if low is None or not isinstance(first, torch.nn.Linear):
        return None
    return low


# -- reading ---------------------------------------------------------------------------
class FeatureCache:
    """Read access to a built cache (shards opened lazily, memory-mapped)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.index = json.loads((self.path / INDEX).read_text())
        self.where = {int(k): v for k, v in self.index["records"].items()}
        self.bad = {int(k): v for k, v in self.index["bad"].items()}
        self._open: dict[str, object] = {}

    def get(self, i: int) -> torch.Tensor:
        return self._shard(i).get_tensor(f"r{i}")

    def image_sizes(self, i: int) -> torch.Tensor:
        """Record ``i``'s images' (width, height); only anyres caches hold them."""
        return self._shard(i).get_tensor(f"s{i}")

    def _shard(self, i: int):
        shard = self.where[i]
        f = self._open.get(shard)
        if f is None:
            f = self._open[shard] = safe_open(str(self.path / shard), "pt")
        return f

    def __getstate__(self):  # DataLoader workers reopen the shards themselves
        d = dict(self.__dict__)
        d["_open"] = {}
        return d


def read_index(path: str | os.PathLike) -> dict | None:
    f = Path(path) / INDEX
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return None


class FeatureDataset(VLDataset):
    """VLDataset that reads the tower's features from the cache instead of opening images."""

    def __init__(self, records: RecordFile, text: TextSettings, cache: FeatureCache, image_config,
                 cache_tokens: bool = False, image_dir: str | os.PathLike | None = None):
        # image_dir: anyres token counts read the images' headers (never their pixels)
        super().__init__(records, text, image_dir, image_config, cache_tokens=cache_tokens)
        self.cache = cache

    def unreadable_records(self) -> list[dict]:
        """Those of VLDataset, and the records whose images the cache could not encode."""
        found = {b["index"]: b for b in super().unreadable_records()}
        for i, reason in self.cache.bad.items():
            if i not in found:
                found[i] = {"id": self.record(i).id, "reason": reason, "index": i}
        return [found[i] for i in sorted(found)]

    def __getitem__(self, i: int) -> dict:
        if i in self.cache.bad:
            raise SampleError(self.record(i).id, self.cache.bad[i])
        t = self.tokens(i)
        sizes = self.cache.image_sizes(i) if t.images and self.image_config.aspect == "anyres" else None
        if sizes is not None and t.image_sizes is not None and tuple(map(tuple, sizes.tolist())) != t.image_sizes:
            raise SampleError(t.id, f"its cached features are of images of sizes {sizes.tolist()}, their headers "
                                    f"say {list(t.image_sizes)}: rebuild the feature cache")
        return {
            "id": t.id, "index": i,
            "input_ids": t.input_ids,
            "labels": t.labels,
            "cut": t.cut,
            "pixel_values": None,
            "vision_features": self.cache.get(i) if t.images else None,
            "image_sizes": sizes,  # anyres: each image's (width, height); its tiles follow from it
            "image_paths": t.images,
        }


# -- building ----------------------------------------------------------------------------
def build_cache(model: VisionLanguageModel, records: RecordFile, image_dir: str | os.PathLike | None,
                out: str | os.PathLike, fp: dict, *, batch_images: int = 32, shard_records: int = 4096,
                progress: bool = True, dtype: torch.dtype | None = None) -> Path:
    """Run the tower over every image of ``records``; write shards + index atomically.

    ``dtype``: store the features in it (None: as the tower computes them).
    """
    out = Path(out)
    tower = model.vision
    tower_was_training = tower.training
    tower.eval()
    device = next(tower.model.parameters()).device
    index = {"format": CACHE_FORMAT, "fingerprint": fp, "records": {}, "bad": {}, "num_records": len(records),
             "num_images": 0,
             "num_tokens": None, "width": None, "dtype": None}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(records), desc="caching features", unit="rec", dynamic_ncols=True)
    with atomic_directory(out) as tmp:
        shard: dict[str, torch.Tensor] = {}
        shard_records_in: list[int] = []  # the records whose tensors `shard` holds
        shard_no = 0
        # (record, each image's (tiles, 3, S, S) pixels and (width, height) or None)
        pending: list[tuple[int, list[tuple[torch.Tensor, tuple[int, int] | None]]]] = []

        def run_pending():
            if not pending:
                return
            pix = torch.cat([px for _, images in pending for px, _ in images]).to(device)
            with torch.no_grad():
                feats = tower(pix).to(device="cpu", dtype=dtype)
            index["dtype"] = str(feats.dtype).removeprefix("torch.")
            at = 0
            for i, images in pending:
                n = sum(px.shape[0] for px, _ in images)
                # own, contiguous storage: safetensors takes nothing else, and some towers (SigLIP)
                # give their features in a permuted layout that a plain clone() would keep
                shard[f"r{i}"] = feats[at:at + n].clone(memory_format=torch.contiguous_format)
                shard_records_in.append(i)
                if images[0][1] is not None:
                    shard[f"s{i}"] = torch.tensor([size for _, size in images], dtype=torch.long)
                at += n
                index["num_images"] += len(images)
            index["num_tokens"], index["width"] = int(feats.shape[1]), int(feats.shape[2])
            pending.clear()

        def flush_shard():
            nonlocal shard, shard_no
            run_pending()
            if shard:
                name = f"features-{shard_no:05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                for i in shard_records_in:
                    index["records"][str(i)] = name
                shard, shard_no = {}, shard_no + 1
                shard_records_in.clear()

        n_pending_images = 0
        for i in range(len(records)):
            try:
                rec = records[i]
                if rec.images:
                    images = [image_pixels(resolve_image_path(p, image_dir), model.config.image) for p in rec.images]
                    pending.append((i, images))
                    n_pending_images += sum(px.shape[0] for px, _ in images)
            except RecordError as e:
                index["bad"][str(i)] = e.reason
            except ImageError as e:
                index["bad"][str(i)] = str(e)
            if n_pending_images >= batch_images:
                run_pending()
                n_pending_images = 0
            if len(shard_records_in) + len(pending) >= shard_records:
                flush_shard()
                n_pending_images = 0
            if bar is not None:
                bar.update(1)
        flush_shard()
        (tmp / INDEX).write_text(json.dumps(index))
    if bar is not None:
        bar.close()
    tower.train(tower_was_training)
    return out


def ensure_cache(model: VisionLanguageModel, data_file: str | os.PathLike, image_dir: str | os.PathLike | None,
                 out: str | os.PathLike, *, progress: bool = True, dtype: torch.dtype | None = None) -> tuple[Path, bool]:
    """Build the cache unless a valid one is there; returns (path, reused).

    ``dtype``: store the features in it (None: as the tower computes them); see ``storage_dtype``.
    """
    records = RecordFile(data_file)
    fp = fingerprint(model, data_file, image_dir, records, dtype)
    old = read_index(out)
    if old is not None and old.get("format") == CACHE_FORMAT and old.get("fingerprint") == fp:
        return Path(out), True
    if old is not None:
        changed = [k for k in fp if old.get("fingerprint", {}).get(k) != fp[k]]
        log.info("feature cache %s is stale (%s changed): rebuilding", out, ", ".join(changed) or "format")
    return build_cache(model, records, image_dir, out, fp, progress=progress, dtype=dtype), False


def cache_path(cfg: RunConfig, out: str | os.PathLike | None = None) -> Path:
    if out is not None:
        return Path(out)
    fc = cfg.data.feature_cache
    if fc in (None, "auto"):
        return Path(cfg.output_dir) / "feature_cache"
    return Path(fc)


def cached_dataset(cfg: RunConfig, model: VisionLanguageModel, text: TextSettings, acc) -> FeatureDataset:
    """The training set read through the cache (built first by the main process if needed)."""
    if cfg.train.vision != "frozen":
        raise ConfigError("data.feature_cache needs train.vision=frozen")
    path = cache_path(cfg)
    model.vision.to(acc.device)  # encode on the accelerator; prepare() moves the rest
    if acc.is_main_process:
        _, reused = ensure_cache(model, cfg.data.train, cfg.data.images, path, progress=cfg.train.progress,
                                 dtype=storage_dtype(model, acc.mixed_precision))
        log.info("feature cache: %s (%s)", path, "reused" if reused else "built")
    acc.wait_for_everyone()
    return FeatureDataset(RecordFile(cfg.data.train), text, FeatureCache(path), model.config.image,
                          cache_tokens=cfg.data.cache_tokens, image_dir=cfg.data.images)


def cache_features_for_config(cfg: RunConfig, out: str | os.PathLike | None = None) -> dict:
    """`vistune cache-features`: build (or confirm) the cache for a training config."""
    from .precision import mixed_precision
    from .stages import build_model

    if not cfg.data.train:
        raise ConfigError("data.train is required to cache features")
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)  # the very tower training builds (random towers of tiny from-scratch runs too)
    model, _ = build_model(cfg)
    if torch.cuda.is_available():
        model.vision.to("cuda")
    path = cache_path(cfg, out)
    # the dtype the training run will want, or it would rebuild this cache
    dtype = storage_dtype(model, mixed_precision(cfg.train.precision, "cuda" if torch.cuda.is_available() else "cpu"))
    path, reused = ensure_cache(model, cfg.data.train, cfg.data.images, path, progress=cfg.train.progress,
                                dtype=dtype)
    index = read_index(path)
    return {"path": path, "reused": reused, "num_records": index["num_records"],
            "num_images": index["num_images"], "bad": index["bad"]}
