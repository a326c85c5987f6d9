from pathlib import Path

import pytest
import yaml

from vistune.train.config import ConfigError, RunConfig, load_run_config, parse_override, preset_names

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, d) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


BASE = {"output_dir": "runs/x", "model": {"from": "some/model"}, "data": {"train": "d.jsonl"}}


def test_stable_user_keys_and_dotted_overrides(tmp_path):
    cfg = load_run_config(write(tmp_path, BASE), [
        "train.lr=1e-3", "train.epochs=2", "train.batch_size=16", "data.images=imgs", "data.template=plain",
        "model.projector_from=p.safetensors", "output_dir=runs/y", "data.packing=true",
        "lora.target_modules=[q_proj,v_proj]", "train.report_to=[]", "train.max_grad_norm=null",
    ])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert cfg.train.epochs == 2 and cfg.train.batch_size == 16
    assert cfg.data.images == "imgs" and cfg.data.template == "plain" and cfg.data.packing is True
    assert cfg.model.from_ == "some/model" and cfg.model.projector_from == "p.safetensors"
    assert cfg.output_dir == "runs/y"
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.max_grad_norm is None
    # round trip through the YAML that runs write next to their outputs
    cfg.save(tmp_path / "resolved.yaml")
    again = load_run_config(tmp_path / "resolved.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["model"]["from"] == "some/model"


def test_inline_model_configs_and_nested_overrides(tmp_path):
    d = {"model": {"vision": {"model_type": "clip_vision_model", "hidden_size": 32}, "llm": {"model_type": "llama"},
                   "tokenizer": "tok"}, "data": {"train": "d.jsonl"}}
    cfg = load_run_config(write(tmp_path, d), ["model.vision.hidden_size=64", "model.llm.num_hidden_layers=3"])
    assert cfg.model.vision == {"model_type": "clip_vision_model", "hidden_size": 64}
    assert cfg.model.llm["num_hidden_layers"] == 3
    with pytest.raises(ConfigError, match="model.tokenizer .* is required when model.llm is an inline config"):
        load_run_config(write(tmp_path, d), ["model.tokenizer=null"])
    with pytest.raises(ConfigError, match="'model.vision' is 'v/path', not a mapping"):
        load_run_config(write(tmp_path, {**d, "model": {**d["model"], "vision": "v/path"}}), ["model.vision.x=1"])


@pytest.mark.parametrize("override,message", [
    (["train.lrr=1"], r"unknown config key 'train.lrr' \(did you mean 'train.lr'\?"),
    (["trian.lr=1"], r"unknown config key 'trian'"),
    (["model.form=x"], r"unknown config key 'model.form' \(did you mean 'model.from'\?"),
    (["model.from_=x"], r"unknown config key 'model.from_'"),
    (["train.epochs=two"], r"train.epochs: expected int, got 'two'"),
    (["train.vision=half"], r"train.vision must be one of frozen, full, lora, got 'half'"),
    (["train.projector=lora"], r"train.projector cannot be lora"),
    (["train.precision=fp8"], r"train.precision must be one of"),
    (["model.projector=mlp2x_relu"], r"model.projector: unknown projector type 'mlp2x_relu'"),
    (["model.vision=v"], r"model.from cannot be combined with model.vision"),
    (["train.projector=frozen", "train.llm=frozen"], r"nothing would learn"),
    (["data.feature_cache=auto", "train.vision=full"], r"data.feature_cache needs a frozen vision tower"),
    (["train.batch_size=0"], r"train.batch_size must be >= 1"),
    (["train.decay_ratio=0"], r"train.decay_ratio must be in \(0, 1\]"),
    (["train.scheduler=wsd", "train.warmup_ratio=0.5", "train.decay_ratio=0.6"], r"leaves no room for the warmup"),
    (["lora.bits=3"], r"lora.bits must be 4, 8 or 16"),
    (["train.report_to=[mlflow]"], r"unknown tracker 'mlflow'"),
    (["train"], r"override 'train' is not key=value"),
    # checked at load, not once the model has loaded (nor accepted by --print-config)
    (["data.template=vicuna"], r"data.template: unknown template 'vicuna'; known templates: .*vicuna_v1"),
    (["model.image_aspect=square"], r"model.image_aspect must be one of pad, resize, crop, anyres, got 'square'"),
    (["model.max_tiles=4"], r"model.image_grid_pinpoints and model.max_tiles need model.image_aspect=anyres"),
    (["model.image_aspect=anyres", "model.max_tiles=0"], r"model.max_tiles must be >= 1, got 0"),
    (["data.max_length=0"], r"data.max_length must be >= 1, got 0"),
    (["lora.dropout=1.5"], r"lora.dropout must be in \[0, 1\)"),
    (["train.max_grad_norm=-1"], r"train.max_grad_norm must be >= 0"),
    (["train.resume=auto", "train.overwrite=true"], r"train.overwrite removes the checkpoints that train.resume"),
])
def test_bad_configs_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(write(tmp_path, BASE), override)


def test_decay_ratio_limits_the_warmup_only_under_wsd(tmp_path):
    # a long warmup stays valid for the other schedules, which have no stable phase to fit in
    cfg = load_run_config(write(tmp_path, BASE), ["train.scheduler=cosine", "train.warmup_ratio=0.9"])
    assert (cfg.train.warmup_ratio, cfg.train.decay_ratio) == (0.9, 0.2)


def test_parse_override_values():
    assert parse_override("a.b=1e-3") == ("a.b", "1e-3")  # typed later, by the field
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=x=y") == ("a", "x=y")
    assert parse_override("a=") == ("a", None)


def test_all_presets_load_and_keep_llava_hyperparameters():
    presets = sorted(CONFIGS.glob("*.yaml"))
    names = {p.name for p in presets}
    for want in ("tiny-cpu-stage1.yaml", "tiny-cpu-stage2.yaml", "llava-v1.5-7b-stage1.yaml",
                 "llava-v1.5-7b-stage2.yaml", "llava-v1.5-7b-lora.yaml"):
        assert want in names
    cfgs = {p.stem: load_run_config(p) for p in presets}
    s1, s2, lora = cfgs["llava-v1.5-7b-stage1"], cfgs["llava-v1.5-7b-stage2"], cfgs["llava-v1.5-7b-lora"]
    assert (s1.train.vision, s1.train.projector, s1.train.llm) == ("frozen", "full", "frozen")
    assert s1.train.lr == 1e-3 and s1.data.template == "plain" and s1.train.epochs == 1
    assert (s2.train.vision, s2.train.projector, s2.train.llm) == ("frozen", "full", "full")
    assert s2.train.lr == 2e-5 and s2.data.group_by_length and s2.model.projector_from
    assert lora.train.llm == "lora" and lora.train.lr == 2e-4 and lora.train.projector_lr == 2e-5
    assert (lora.lora.r, lora.lora.alpha) == (128, 256)
    # global batch (per-device x accum x 8 GPUs): 256 for stage 1, 128 for stage 2
    assert s1.train.batch_size * s1.train.grad_accum * 8 == 256
    assert s2.train.batch_size * s2.train.grad_accum * 8 == 128
    assert lora.train.batch_size * lora.train.grad_accum * 8 == 128


def test_defaults_are_a_valid_config():
    cfg = RunConfig.from_dict({"model": {"from": "m"}})
    assert cfg.train.vision == "frozen" and cfg.train.scheduler == "cosine"
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_shipped_presets_resolve_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: a pip-installed vistune
    by_name = load_run_config("tiny-cpu-stage1", ["data.train=d.jsonl"])
    assert by_name == load_run_config(CONFIGS / "tiny-cpu-stage1.yaml", ["data.train=d.jsonl"])
    assert load_run_config("configs/tiny-cpu-stage2.yaml") == load_run_config(CONFIGS / "tiny-cpu-stage2.yaml")
    assert {"tiny-cpu-stage1", "demo-stage2", "llava-v1.5-7b-lora"} <= set(preset_names())
    with pytest.raises(ConfigError, match=r"config file not found: tiny-cpu-stage9 \(shipped presets: .*tiny-cpu"):
        load_run_config("tiny-cpu-stage9")
    with pytest.raises(ConfigError, match="config file not found: other/x.yaml"):
        load_run_config("other/x.yaml")  # a path elsewhere is never swapped for a preset


def test_every_preset_file_is_packaged():
    """pyproject's package-data globs cover every file under configs/ (a wheel would drop the rest)."""
    import tomllib
    from pathlib import PurePosixPath

    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["vistune"]
    pkg = root / "src" / "vistune"
    files = [p.relative_to(pkg).as_posix() for p in (pkg / "configs").rglob("*") if p.is_file()]

    def packaged(f: str) -> bool:  # setuptools' globs: `*` stays within one folder
        return any(PurePosixPath(f).match(g) and f.count("/") == g.count("/") for g in globs)

    assert files and all(packaged(f) for f in files), [f for f in files if not packaged(f)]
    assert (root / "configs").resolve() == (pkg / "configs").resolve()  # the repository's configs/ is that folder
