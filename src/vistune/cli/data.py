"""`vistune data ...`: data checks and tools."""
from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="data tools: validate, synth, pairs, instruct, curate, stats, scienceqa")
    dsub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    v = dsub.add_parser("validate", help="report every problem of a LLaVA JSON/JSONL file; exit 1 if any")
    v.add_argument("data")
    v.add_argument("--images", default=None, help="image folder the records' paths are relative to")
    v.add_argument("--template", default=None, help="also check the records fit this template")
    v.add_argument("--no-images", action="store_true", help="skip opening images")
    v.add_argument("--model", default=None,
                   help="a vistune model directory: encode every record as training from it would (its tokenizer, "
                        "image tokens and template) and report the records it would skip or cut to max_length")
    v.add_argument("--max-length", type=int, default=None,
                   help="with --model: the data.max_length to check against (default: the model's)")
    v.add_argument("--max-image-tokens", type=int, default=None,
                   help="with --model: the data.max_image_tokens bound to check each sample's images against")
    v.set_defaults(func=cmd_validate)

    s = dsub.add_parser("scienceqa", help="ScienceQA problems -> LLaVA records (QCM -> lecture, solution, answer)")
    s.add_argument("--problems", required=True, help="problems.json")
    s.add_argument("--splits", required=True, help="pid_splits.json")
    s.add_argument("--images", required=True, help="folder holding <split>/<pid>/image.png")
    s.add_argument("--split", default="train")
    s.add_argument("--out", required=True, help="output .jsonl (or .json)")
    s.add_argument("--limit", type=int, default=None)
    s.set_defaults(func=cmd_scienceqa)

    y = dsub.add_parser("synth", help="a synthetic world: coloured shapes, with captions and boxes",
                        description="Writes OUT/images/*.png and OUT/annotations.json (vistune's annotations "
                                    "JSON: captions, and boxes with category and attributes), as `vistune demo` "
                                    "makes its world. The same seed gives the same world.")
    y.add_argument("--out", required=True, help="output folder")
    y.add_argument("--images", type=int, required=True, help="number of scenes")
    y.add_argument("--seed", type=int, default=0)
    y.add_argument("--size", type=int, default=64, help="image side in px (default 64); the objects scale with it")
    y.add_argument("--min-objects", type=int, default=1, help="objects per scene, at least (default 1)")
    y.add_argument("--max-objects", type=int, default=4, help="objects per scene, at most (default 4)")
    y.add_argument("--overwrite", action="store_true", help="replace a world already in OUT")
    y.set_defaults(func=cmd_synth)

    register_instruct(dsub)
    from .curate import register_curate

    register_curate(dsub)


def cmd_validate(args: argparse.Namespace) -> int:
    from ..data.validate import validate_file, validate_lengths

    if (args.max_length is not None or args.max_image_tokens is not None) and not args.model:
        raise SystemExit("error: --max-length and --max-image-tokens need --model (the tokenizer and image tokens "
                         "to count with)")
    n, problems = validate_file(args.data, args.images, template=args.template, check_images=not args.no_images)
    cuts = []
    if args.model:
        text = _text_settings(args.model, args.template, args.max_length)
        text.max_image_tokens = args.max_image_tokens
        problems_, cuts = validate_lengths(args.data, text, args.images)
        problems += problems_
    for pr in problems:
        print(pr, file=sys.stderr)
    shown = 20  # a long list of cuts would bury the problems
    for c in cuts[:shown]:
        print(f"note: {c}", file=sys.stderr)
    if len(cuts) > shown:
        print(f"note: ... and {len(cuts) - shown} more record(s) that would be cut", file=sys.stderr)
    tail = f", {len(cuts)} would be cut to max_length" if args.model else ""
    print(f"{n} records, {len(problems)} problem(s){tail}")
    return 1 if problems else 0


def _text_settings(model_dir: str, template: str | None, max_length: int | None):
    """What training from ``model_dir`` encodes records with, read from its config and
    tokenizer alone (no weights are loaded)."""
    from ..model.checkpoint import read_config
    from ..data.settings import text_settings_for
    from ..text.tokenizer import load_tokenizer

    try:
        cfg = read_config(model_dir)
        tok = load_tokenizer(model_dir)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --model {model_dir}: {e}") from None
    try:
        return text_settings_for(cfg, tok, template=template, max_length=max_length)
    except ValueError as e:  # an unknown template
        raise SystemExit(f"error: {e}") from None


def cmd_scienceqa(args: argparse.Namespace) -> int:
    from ..eval.runner import EvalError
    from ..eval.scienceqa import convert

    try:
        n = convert(args.problems, args.splits, args.images, args.split, args.out, limit=args.limit)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{n} ScienceQA {args.split} records -> {args.out}")
    return 0


# --- instruction data ------------------------------------------------------------------

def _annotations_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--annotations", action="append", required=True, metavar="A",
                   help="vistune annotations JSON, or COCO captions_*.json and instances_*.json "
                        "(repeat the flag or separate with commas)")


def register_instruct(dsub: argparse._SubParsersAction) -> None:
    from ..instruct.llm import DEFAULT_PRICE_IN, DEFAULT_PRICE_OUT

    i = dsub.add_parser("instruct", help="instruction data of three kinds from captions and boxes (LLM or rules)",
                        description="Writes LLaVA records to a JSONL file. The openai backend appends as results "
                                    "arrive and skips ids already in OUT, so rerunning resumes.")
    _annotations_arg(i)
    i.add_argument("--out", required=True, help="output JSONL")
    i.add_argument("--kinds", default="conversation,detail,reasoning",
                   help="comma-separated: conversation, detail, reasoning (default: all three); the rules "
                        "backend also has referring (the object named, then the attribute asked for) and vqa (every "
                        "question kind answered in a word, as LLaVA-1.5's academic VQA data)")
    i.add_argument("--backend", choices=["openai", "rules"], default="openai")
    i.add_argument("--model", default=None, help="model name for the openai backend")
    i.add_argument("--base-url", default=None, help="any OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    i.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    i.add_argument("--concurrency", type=int, default=8, help="requests in flight at most (default 8)")
    i.add_argument("--limit", type=int, default=None, help="only the first N images")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--max-attempts", type=int, default=6, help="tries per request on 429/5xx/timeouts (default 6)")
    i.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds; doubles each retry")
    i.add_argument("--max-connection-failures", type=int, default=20,
                   help="stop the run after this many requests in a row could not reach the server (default 20)")
    i.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    i.add_argument("--temperature", type=float, default=None, help="default: the server's")
    i.add_argument("--max-tokens", type=int, default=None, help="default: the server's")
    i.add_argument("--price-in", type=float, default=DEFAULT_PRICE_IN,
                   help=f"USD per 1M prompt tokens for the cost estimate (default {DEFAULT_PRICE_IN}, gpt-4o-mini)")
    i.add_argument("--price-out", type=float, default=DEFAULT_PRICE_OUT,
                   help=f"USD per 1M completion tokens (default {DEFAULT_PRICE_OUT}, gpt-4o-mini)")
    i.add_argument("-v", "--verbose", action="store_true", help="log every retry")
    i.set_defaults(func=cmd_instruct)

    p = dsub.add_parser("pairs", help="stage-1 records: one brief-description instruction + caption per image")
    _annotations_arg(p)
    p.add_argument("--out", required=True, help="output JSONL (or .json for a JSON list)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--all-captions", action="store_true",
                   help="one record per caption instead of one random caption per image (LLaVA's choice)")
    p.set_defaults(func=cmd_pairs)

    s = dsub.add_parser("stats", help="counts by kind, turns, length percentiles, length histogram PNG")
    s.add_argument("data", help="LLaVA JSON or JSONL")
    s.add_argument("--tokenizer", default=None, help="local tokenizer directory (lengths in tokens; default: words)")
    s.add_argument("--out", default=None, help="folder for stats.md, stats.json, lengths.png (default: DATA_stats/)")
    s.set_defaults(func=cmd_stats)


def _user_errors(fn):
    """Bad input (a missing file, a malformed annotation, an unknown kind) is a message
    naming the culprit, not a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapped


def _setup_logging(verbose: bool) -> None:
    import logging

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@_user_errors
def cmd_instruct(args: argparse.Namespace) -> int:
    from ..instruct.coco import load_any_annotations
    from ..instruct.prompts import check_kinds

    _setup_logging(args.verbose)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if args.backend == "rules":  # it checks its own, longer list of kinds
        return _instruct_rules(args, load_any_annotations(args.annotations), kinds)
    kinds = check_kinds(kinds)
    anns = load_any_annotations(args.annotations)
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ..instruct.llm import LLMConfig, LLMError, generate_with_llm

    if not args.model:
        print("error: --backend openai needs --model", file=sys.stderr)
        return 2
    cfg = LLMConfig(model=args.model, base_url=args.base_url, api_key_env=args.api_key_env,
                    concurrency=args.concurrency, max_attempts=args.max_attempts, backoff_base=args.backoff,
                    timeout=args.timeout, temperature=args.temperature, max_tokens=args.max_tokens,
                    price_in=args.price_in, price_out=args.price_out, seed=args.seed,
                    max_connection_failures=args.max_connection_failures)
    try:
        with logging_redirect_tqdm():
            summary = generate_with_llm(anns, kinds, args.out, cfg, limit=args.limit)
    except LLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary.report(cfg.price_in, cfg.price_out))
    return 1 if summary.failed else 0


def _instruct_rules(args: argparse.Namespace, anns: list, kinds: list[str]) -> int:
    try:
        from ..instruct.rules import generate_records
    except ImportError as e:
        print(f"error: the rules backend is not available in this install (vistune.instruct.rules: {e})",
              file=sys.stderr)
        return 1
    from ..data.records import write_records

    if args.limit is not None:
        anns = anns[: args.limit]
    records = generate_records(anns, kinds, args.seed)
    write_records(records, args.out)
    print(f"{len(records)} records written to {args.out}")
    return 0


@_user_errors
def cmd_synth(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..instruct.synth import WorldConfig, make_world

    if args.images < 1:
        raise ValueError(f"--images {args.images}: at least 1")
    cfg = WorldConfig.sized(args.size, min_objects=args.min_objects, max_objects=args.max_objects)
    out = Path(args.out)
    if (out / "annotations.json").exists():
        if not args.overwrite:
            raise ValueError(f"{out / 'annotations.json'} exists: pass --overwrite to replace that world")
        from ..instruct.annotations import load_annotations

        # Only the old world's own images go, so that none of them is left beside the new one.
        images = (out / "images").resolve()
        for a in load_annotations(out / "annotations.json"):
            old = (out / a.file).resolve()
            if old.parent == images:
                old.unlink(missing_ok=True)
    anns = make_world(out, args.images, seed=args.seed, cfg=cfg, progress=True)
    objects = sum(len(a.boxes) for a in anns)
    print(f"{len(anns)} scenes, {objects} objects -> {out / 'images'}, {out / 'annotations.json'}")
    print(f"next: vistune data instruct --backend rules --annotations {out / 'annotations.json'} --out instruct.jsonl")
    return 0


@_user_errors
def cmd_pairs(args: argparse.Namespace) -> int:
    from ..data.records import write_records
    from ..instruct.coco import load_any_annotations
    from ..instruct.pairs import make_pairs

    _setup_logging(False)
    records = make_pairs(load_any_annotations(args.annotations), seed=args.seed, all_captions=args.all_captions)
    write_records(records, args.out)
    print(f"{len(records)} records written to {args.out}")
    return 0


@_user_errors
def cmd_stats(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..instruct.stats import compute_stats, to_markdown, write_report

    tok = None
    if args.tokenizer:
        from ..text.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
    st = compute_stats(args.data, tok)
    data = Path(args.data)
    out = Path(args.out) if args.out else data.with_name(data.stem + "_stats")
    paths = write_report(st, out)
    print(to_markdown(st), end="")
    print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")
    return 0
