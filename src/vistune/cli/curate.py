"""`vistune data curate`: MiniGPT-4's curation loop (describe, rewrite by an LLM, filter, write)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def register_curate(dsub: argparse._SubParsersAction) -> None:
    c = dsub.add_parser(
        "curate", help="MiniGPT-4's loop: a model describes images, an LLM rewrites, rules filter -> LLaVA records",
        description="Writes OUT/descriptions.jsonl (the model's descriptions), OUT/rewritten.jsonl (the LLM's "
                    "rewrites), OUT/curated.jsonl (LLaVA records that passed the rules, each with an instruction "
                    "of MiniGPT-4's pool) and OUT/report.md (what was dropped and why). Every step resumes: a "
                    "rerun skips what its file already holds.")
    c.add_argument("--model", required=True, help="vistune model directory that describes the images")
    c.add_argument("--images", required=True, help="folder of images (every image file in it, sorted)")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--limit", type=int, default=None, help="only the first N images")
    c.add_argument("--batch-size", type=int, default=8, help="images described together (default 8)")
    c.add_argument("--min-tokens", type=int, default=80,
                   help="descriptions shorter than this many tokens are asked to 'Continue' (default 80)")
    c.add_argument("--max-continues", type=int, default=1, help="'Continue' requests per image at most (default 1)")
    c.add_argument("--max-new-tokens", type=int, default=256, help="tokens per reply at most (default 256)")
    c.add_argument("--device", default="cpu", help="where the describing model runs (cpu, cuda, ...)")
    c.add_argument("--llm-model", required=True, help="model name at the OpenAI-compatible endpoint")
    c.add_argument("--base-url", default=None, help="any OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    c.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    c.add_argument("--concurrency", type=int, default=8, help="LLM requests in flight at most (default 8)")
    c.add_argument("--max-attempts", type=int, default=6, help="tries per request on 429/5xx/timeouts (default 6)")
    c.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds; doubles each retry")
    c.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    c.add_argument("--min-words", type=int, default=30, help="rewrites shorter are dropped (default 30)")
    c.add_argument("--max-words", type=int, default=400, help="rewrites longer are dropped (default 400)")
    c.add_argument("--seed", type=int, default=0, help="chooses each record's instruction")
    c.set_defaults(func=cmd_curate)


def list_images(folder: Path, limit: int | None) -> list[tuple[str, str]]:
    if not folder.is_dir():
        raise FileNotFoundError(f"--images: folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--images: no image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    files = files[:limit] if limit is not None else files
    return [(p.relative_to(folder).with_suffix("").as_posix(), p.relative_to(folder).as_posix()) for p in files]


def cmd_curate(args: argparse.Namespace) -> int:
    from collections import Counter

    from ..infer.describe import describe_images
    from ..infer.engine import Engine
    from ..instruct.curate import FilterRules, read_jsonl, rewrite_descriptions, write_curated
    from ..instruct.llm import LLMConfig, LLMError, api_key
    from ..model.checkpoint import load

    out = Path(args.out)
    try:
        images = list_images(Path(args.images), args.limit)
        cfg = LLMConfig(model=args.llm_model, base_url=args.base_url, api_key_env=args.api_key_env,
                        concurrency=args.concurrency, max_attempts=args.max_attempts, backoff_base=args.backoff,
                        timeout=args.timeout,
                        seed=args.seed)
        api_key(cfg)  # a missing key fails before the model describes anything
        out.mkdir(parents=True, exist_ok=True)
        engine = Engine(load(args.model, device=args.device))
        d = describe_images(engine, images, out / "descriptions.jsonl", root=args.images, batch_size=args.batch_size,
                            min_tokens=args.min_tokens, max_continues=args.max_continues,
                            max_new_tokens=args.max_new_tokens)
        print(f"described {d.written} image(s) ({d.skipped} already done, {d.continued} continued)")
        wanted = {i for i, _ in images}
        descriptions = [r for r in read_jsonl(out / "descriptions.jsonl") if r["id"] in wanted]
        s = rewrite_descriptions(descriptions, out / "rewritten.jsonl", cfg)
        print(f"rewrote {s.written} ({s.skipped} already done, {s.failed} failed, {s.rejected} rejected)")
        failures = Counter({r: n for r, n in s.reasons.items()})
        result = write_curated(descriptions, read_jsonl(out / "rewritten.jsonl"), out / "curated.jsonl",
                               out / "report.md", FilterRules(min_words=args.min_words, max_words=args.max_words),
                               seed=args.seed, rewrite_failures=failures)
    except LLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"kept {result.kept} of {len(descriptions)}: {result.records_path}; report: {result.report_path}")
    return 1 if s.failed else 0
