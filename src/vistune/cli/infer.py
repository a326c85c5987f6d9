"""`vistune chat` (terminal chat) and `vistune predict` (batch answers for a question file)."""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from typing import Iterator

from . import CommandError


def add_generation_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="end the reply where STR appears; STR is not returned (repeatable)")
    g.add_argument("--system", default=None, help="replace the template's system prompt")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="a vistune model directory, or a Hugging Face causal LM directory (text only: config, "
                        "safetensors weights, a tokenizer with a chat_template)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])


def generation_config(args: argparse.Namespace):
    from ..infer.engine import GenerationConfig

    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
                            stop=list(args.stop))


def load_engine(args: argparse.Namespace):
    """The engine over ``--model``; a path that holds no loadable model is a `CommandError`.

    Sets inference's process settings first (`runtime.inference_process`): every command that
    generates (chat, predict, eval, serve, web) comes through here."""
    import torch
    from safetensors import SafetensorError

    from .. import runtime
    from ..infer.engine import Engine

    runtime.inference_process()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        return Engine.from_path(args.model, device=args.device, dtype=dtype)
    # Not a model directory, a missing or truncated weights file, a config that is no JSON or
    # names unknown keys, tokenizer files that do not load: the path, not vistune, is at fault.
    except (OSError, ValueError, SafetensorError) as e:
        raise CommandError(f"cannot load the model at {args.model}: {e}") from e


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("chat", help="chat with a model in the terminal (streaming; /image PATH, /reset, /quit)")
    add_model_args(c)
    c.add_argument("--image", action="append", default=[], help="attach an image to the first message (repeatable)")
    add_generation_args(c, 512)
    c.set_defaults(func=cmd_chat)

    p = sub.add_parser("predict", help="answer a question file (LLaVA eval JSONL) in batches; resumable")
    add_model_args(p)
    p.add_argument("--data", required=True, help='questions JSONL: {"question_id", "image"?, "text"}')
    p.add_argument("--images", default=None, help="folder the questions' image paths are relative to")
    p.add_argument("--out", required=True, help="answers JSONL (appended; ids already there are skipped)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--model-name", default=None, help="the 'model' field of answers (default: directory name)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip a question that cannot be answered (a malformed line, a missing or corrupt image, "
                        "a prompt longer than the context) instead of stopping at it: each one is listed with "
                        "its id and the reason in OUT.errors.jsonl, which every --skip-bad run starts afresh. "
                        "A listed question is not answered, so a rerun tries it again (after you fix its image, say)")
    add_generation_args(p, 128)
    p.set_defaults(func=cmd_predict)


HELP = "commands: /image PATH (attach an image to your next message), /reset, /quit; Ctrl-C stops a reply"


@contextlib.contextmanager
def prompt_wakeups(interval: float = 0.1) -> Iterator[None]:
    """While a line is read at a terminal, a no-op SIGALRM every ``interval`` seconds.

    CPython's readline waits for a key in select() and acts on a Ctrl-C only when it interrupts
    that select: a SIGINT landing after the prompt is drawn but before select() starts is recorded
    and then ignored until the next key (python/cpython#112585), so Ctrl-C at the prompt could
    leave the chat waiting. The alarm interrupts each wait, and the recorded Ctrl-C then raises.
    """
    if (not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread()
            or signal.getitimer(signal.ITIMER_REAL) != (0.0, 0.0)):  # no alarms here, or someone else's timer
        yield
        return
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: None)
    # input() uses readline only when stdout is a terminal too: then readline's reads and writes
    # resume after the alarm (its select() never does); Python's own line read must be interrupted
    # to look at the recorded signals.
    signal.siginterrupt(signal.SIGALRM, not ("readline" in sys.modules and sys.stdout.isatty()))
    signal.setitimer(signal.ITIMER_REAL, interval, interval)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)  # runs an alarm still pending with the no-op handler first


def read_line(interactive: bool) -> str | None:
    """The next line, or None at the end of input; at a terminal, with line editing and history
    (Python's readline) and Ctrl-C quitting."""
    if not interactive:
        line = sys.stdin.readline()
        return line or None
    try:
        with prompt_wakeups():
            return input("USER: ")
    except (EOFError, KeyboardInterrupt):
        print()
        return None


def cmd_chat(args: argparse.Namespace) -> int:
    from ..data.images import ImageError
    from ..infer.chat import Chat
    from ..infer.engine import PromptError

    engine = load_engine(args)
    chat = Chat(engine, system=args.system, config=generation_config(args))
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  # input() then edits lines and keeps a history
        except ImportError:  # not on every platform
            pass
    out = sys.stdout
    told_dropping = False

    def attach(path: str) -> None:
        try:
            chat.attach(path)
            print(f"[attached {path}]", file=out, flush=True)
        except (ImageError, PromptError) as e:  # an unreadable image; any image for a text-only model
            print(f"[error] {e}", file=out, flush=True)

    print(f"vistune chat · {engine.name} · {HELP}", file=out, flush=True)
    for path in args.image:
        attach(path)
    def handle(line: str) -> bool:
        """Act on one line; False for /quit."""
        nonlocal told_dropping
        if not line:
            return True
        if line in ("/quit", "/exit"):
            return False
        if line == "/reset":
            had_image = bool(chat.image_embeds or chat.pending)
            chat.reset()
            told_dropping = False
            print("[conversation cleared" + ("; the image is dropped too: /image PATH attaches one again]"
                                             if had_image else "]"), file=out, flush=True)
            return True
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            if path:
                attach(path)
            else:
                print("[usage] /image PATH", file=out, flush=True)
            return True
        if line.startswith("/"):
            print(f"[unknown command] {HELP}", file=out, flush=True)
            return True
        print("ASSISTANT: ", end="", file=out, flush=True)
        try:
            for piece in chat.stream(line):
                print(piece, end="", file=out, flush=True)
        except PromptError as e:
            print(f"[error] {e}", end="", file=out)
        except KeyboardInterrupt:  # stops this reply only; the chat goes on
            print(" [stopped]", end="", file=out)
        print(file=out, flush=True)
        if chat.dropped_turns and not told_dropping:
            told_dropping = True
            print(f"[the conversation outgrew the model's context of {engine.max_context} tokens: its oldest "
                  "turns are dropped from now on (those holding the image stay); /reset starts afresh]",
                  file=out, flush=True)
        return True

    while (line := read_line(interactive)) is not None:
        try:
            if not handle(line.strip()):
                break
        # Ctrl-C once a line is entered (before its reply streams, while an image loads) stops
        # what that line started; only Ctrl-C at the prompt quits.
        except KeyboardInterrupt:
            print(" [stopped]", file=out, flush=True)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ..infer.predict import PredictError, predict_file

    engine = load_engine(args)
    try:
        stats = predict_file(engine, args.data, args.out, args.images, batch_size=args.batch_size,
                             config=generation_config(args), model_name=args.model_name, system=args.system,
                             skip_bad=args.skip_bad)
    except PredictError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = f"{stats.total} questions: {stats.written} answered now, {stats.skipped} already in {args.out}"
    if args.skip_bad:
        summary += f"; {stats.bad} bad ones skipped" + (f", listed in {stats.errors}" if stats.errors else "")
    print(summary)
    return 0
