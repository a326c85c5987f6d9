"""`vistune eval scienceqa|vqa|pope|bench`: benchmarks on the one inference engine."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model: scienceqa, vqa, pope, bench (GPT-judged)")
    esub = p.add_subparsers(dest="eval_command", metavar="TASK")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    s = esub.add_parser("scienceqa", help="ScienceQA accuracy overall and by subject, context and grade")
    _common(s)
    s.add_argument("--problems", required=True, help="ScienceQA problems.json")
    s.add_argument("--splits", required=True, help="ScienceQA pid_splits.json")
    s.add_argument("--images", default=None, help="folder holding <split>/<pid>/image.png")
    s.add_argument("--split", default="test")
    s.add_argument("--letter-prompt", action="store_true",
                   help="append LLaVA-1.5's 'Answer with the option's letter...' (zero-shot style)")
    s.set_defaults(func=cmd_scienceqa, default_max_new_tokens=1024)

    v = esub.add_parser("vqa", help="short-answer VQA: normalised exact match / VQAv2 soft accuracy")
    _common(v)
    v.add_argument("--data", required=True, help="question JSONL: question_id, image, text, answers")
    v.add_argument("--images", default=None)
    v.add_argument("--no-suffix", action="store_true", help="do not append the single-word-or-phrase prompt")
    v.set_defaults(func=cmd_vqa, default_max_new_tokens=16)

    o = esub.add_parser("pope", help="POPE: accuracy, precision, recall, F1, yes-ratio")
    _common(o)
    o.add_argument("--data", required=True, help="question JSONL: question_id, image, text, label, category")
    o.add_argument("--images", default=None)
    o.add_argument("--no-suffix", action="store_true", help="do not append the single-word-or-phrase prompt")
    o.set_defaults(func=cmd_pope, default_max_new_tokens=16)

    b = esub.add_parser("bench", help="LLaVA-Bench style: an LLM judge scores model vs reference answers")
    _common(b)
    b.add_argument("--questions", required=True, help="question JSONL: question_id, image, text, category")
    b.add_argument("--context", required=True, help="JSONL of captions (+ boxes) per image")
    b.add_argument("--images", default=None)
    b.add_argument("--references", default=None, help="JSONL of given reference answers (question_id, text)")
    b.add_argument("--judge-model", required=True)
    b.add_argument("--reference-model", default=None, help="text-only LLM for missing references (default: judge)")
    b.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint (default: OpenAI)")
    b.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    b.add_argument("--judge-temperature", type=float, default=0.2)
    b.add_argument("--judge-workers", type=int, default=4, help="concurrent judge requests")
    b.set_defaults(func=cmd_bench, default_max_new_tokens=1024)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="vistune model directory")
    p.add_argument("--out", required=True, help="folder for predictions.jsonl, metrics.json, report.md, PNG")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true", help="discard earlier predictions in --out")
    p.add_argument("--no-progress", action="store_true")


def _settings(args: argparse.Namespace):
    from ..eval.runner import RunSettings

    return RunSettings(batch_size=args.batch_size, limit=args.limit,
                       max_new_tokens=args.max_new_tokens or args.default_max_new_tokens,
                       overwrite=args.overwrite, progress=not args.no_progress)


class _LazyEngine:
    """Loads the model on the first batch: the data is checked first, and a run whose
    predictions are all on disk only re-scores, without loading the model at all."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.engine = None

    def generate(self, prompts, config):
        if self.engine is None:
            from .infer import load_engine

            self.engine = load_engine(self.args)
        return self.engine.generate(prompts, config)


def _run(args: argparse.Namespace, task) -> int:
    from ..eval.runner import EvalError

    try:
        settings = _settings(args)
        metrics = task(_LazyEngine(args), settings)
    except (EvalError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    headline = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("accuracy", "f1", "relative_score") if k in metrics)
    print(f"{metrics['task']}: {headline} ({metrics.get('count')} questions) -> {args.out}")
    return 0


def cmd_scienceqa(args: argparse.Namespace) -> int:
    from ..eval import scienceqa

    return _run(args, lambda eng, st: scienceqa.evaluate(
        eng, args.problems, args.splits, args.images, args.out, st, split=args.split,
        letter_prompt=args.letter_prompt, model_name=_model_name(args)))


def cmd_vqa(args: argparse.Namespace) -> int:
    from ..eval import vqa

    return _run(args, lambda eng, st: vqa.evaluate(
        eng, args.data, args.images, args.out, st, suffix=None if args.no_suffix else vqa.SHORT_ANSWER_SUFFIX,
        model_name=_model_name(args)))


def cmd_pope(args: argparse.Namespace) -> int:
    from ..eval import pope, vqa

    return _run(args, lambda eng, st: pope.evaluate(
        eng, args.data, args.images, args.out, st, suffix=None if args.no_suffix else vqa.SHORT_ANSWER_SUFFIX,
        model_name=_model_name(args)))


def cmd_bench(args: argparse.Namespace) -> int:
    from ..eval import judge

    js = judge.JudgeSettings(judge_model=args.judge_model, reference_model=args.reference_model,
                             base_url=args.base_url, api_key_env=args.api_key_env,
                             temperature=args.judge_temperature, workers=args.judge_workers)
    return _run(args, lambda eng, st: judge.evaluate(
        eng, args.questions, args.context, args.images, args.out, st, js,
        references_path=args.references, model_name=_model_name(args)))


def _model_name(args: argparse.Namespace) -> str:
    # Absolute, so a resumed run from another directory is recognised as the same model.
    return str(Path(args.model).resolve())
