"""`vistune train`, `vistune merge-lora`, `vistune cache-features`, `vistune make-tiny-data`."""
from __future__ import annotations

import argparse
import logging
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (stage 1, stage 2, LoRA) from a YAML config",
                       description="Train from a YAML preset plus key=value overrides, e.g. "
                                   "`vistune train configs/tiny-cpu-stage1.yaml train.lr=1e-3 output_dir=runs/x`.")
    p.add_argument("config", help="YAML preset (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides (train.epochs=2 data.packing=true)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from the newest checkpoint of output_dir (or from the given checkpoint)")
    p.add_argument("--overwrite", action="store_true",
                   help="remove the files of an earlier run in output_dir first (without it, such a folder is "
                        "refused); the same as train.overwrite=true")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_train)

    m = sub.add_parser("merge-lora", help="fold a LoRA run's adapters into its base: a plain model directory")
    m.add_argument("run", help="the LoRA run directory (OUTPUT_DIR) or its model/ directory")
    m.add_argument("--out", required=True, help="where to write the merged model directory")
    m.set_defaults(func=cmd_merge)

    c = sub.add_parser("cache-features", help="run the frozen vision tower once over a data set and store its features")
    c.add_argument("config", help="the training YAML preset whose model and data to use")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--out", default=None, help="cache folder (default: data.feature_cache, or OUTPUT_DIR/feature_cache)")
    c.set_defaults(func=cmd_cache)

    d = sub.add_parser("make-tiny-data", help="write the tiny offline data set the tiny-cpu presets train on")
    d.add_argument("out", nargs="?", default="data/tiny")
    d.add_argument("--images", type=int, default=48, help="number of images")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_tiny_data)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("accelerate", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_train(args: argparse.Namespace) -> int:
    import yaml

    from ..train.config import ConfigError, load_run_config

    try:
        cfg = load_run_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    _setup_logging()
    from .. import runtime
    from ..train.loop import TooManyBadRecords, run

    runtime.training_process()

    try:
        r = run(cfg, resume=args.resume, overwrite=args.overwrite or None)
    except (ConfigError, TooManyBadRecords) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not r.main_process:
        return 0
    print(f"trained {r.steps} steps in {r.elapsed_s:.1f} s: loss {r.first_loss:.4f} -> {r.final_loss:.4f}, "
          f"{r.tokens_per_s:.0f} tokens/s, {len(r.bad_records)} bad record(s) skipped")
    print(f"model: {r.model_dir}")
    if r.projector_path:
        print(f"projector: {r.projector_path}")
    print(f"metrics: {r.metrics_path}  curve: {r.loss_curve}  summary: {r.summary_path}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from ..train.lora import merge_lora

    try:
        out = merge_lora(args.run, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged model: {out}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from ..train.config import ConfigError, load_run_config

    _setup_logging()
    try:
        cfg = load_run_config(args.config, args.overrides)
        from ..train.features import cache_features_for_config

        info = cache_features_for_config(cfg, args.out)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{info['num_records']} records, {info['num_images']} images -> {info['path']} "
          f"({'reused' if info['reused'] else 'written'})")
    return 0


def cmd_tiny_data(args: argparse.Namespace) -> int:
    from ..instruct.tiny_data import make_tiny_data

    paths = make_tiny_data(args.out, n_images=args.images, seed=args.seed)
    print(f"tiny data set in {paths['dir']}: {paths['pretrain'].name}, {paths['instruct'].name}, images/, "
          "annotations.json, tokenizer/")
    return 0
