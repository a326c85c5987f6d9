"""`vistune data ...`: data checks and tools."""
from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="data tools: validate, synth, pairs, instruct, stats, scienceqa")
    dsub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    v = dsub.add_parser("validate", help="report every problem of a LLaVA JSON/JSONL file; exit 1 if any")
    v.add_argument("data")
    v.add_argument("--images", default=None, help="image folder the records' paths are relative to")
    v.add_argument("--template", default=None, help="also check the records fit this template")
    v.add_argument("--no-images", action="store_true", help="skip opening images")
    v.set_defaults(func=cmd_validate)

    s = dsub.add_parser("scienceqa", help="ScienceQA problems -> LLaVA records (QCM -> lecture, solution, answer)")
    s.add_argument("--problems", required=True, help="problems.json")
    s.add_argument("--splits", required=True, help="pid_splits.json")
    s.add_argument("--images", required=True, help="folder holding <split>/<pid>/image.png")
    s.add_argument("--split", default="train")
    s.add_argument("--out", required=True, help="output .jsonl (or .json)")
    s.add_argument("--limit", type=int, default=None)
    s.set_defaults(func=cmd_scienceqa)


def cmd_validate(args: argparse.Namespace) -> int:
    from ..data.validate import validate_file

    n, problems = validate_file(args.data, args.images, template=args.template, check_images=not args.no_images)
    for pr in problems:
        print(pr, file=sys.stderr)
    print(f"{n} records, {len(problems)} problem(s)")
    return 1 if problems else 0


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
