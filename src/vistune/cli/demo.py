"""`vistune demo`: the whole paper in miniature, on a CPU, in minutes."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="reproduce the LLaVA paper in miniature on this CPU (about 10 minutes)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smaller run (about 2 minutes)")
    p.add_argument("--no-ablations", action="store_true", help="skip the ablation runs")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--one-process", action="store_true",
                   help="train the no-stage-1 ablation after stage 2 on all threads, not beside stages 1 and 2 "
                        "in a second process on half of them (and stage 0's vision encoder before the LM, "
                        "not beside it)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                   help="of vision pretraining and stages 1 and 2 (default: auto, bf16 where the CPU has it "
                        "natively; --quick: fp32)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default=None,
                   help="torch.compile stage 2's LM (default: auto, in bf16 where a C++ compiler and "
                        "Python's headers are found; --quick: off)")
    p.add_argument("--stage2-steps", type=int, default=None, metavar="N",
                   help="stage-2 steps (default: 1800 on every machine; --quick: 480); "
                        "more steps buy accuracy with time, the no-stage-1 ablation takes as many")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out (same settings): stage 0's models are kept, "
                        "stage 2 and its ablation go on from their last checkpoints")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo.pipeline import DemoConfig, DemoError, run_demo
    from . import CommandError

    kw = dict(out=args.out, seed=args.seed, ablations=not args.no_ablations, threads=args.threads,
              side_by_side=not args.one_process, resume=args.resume)
    if args.precision is not None:
        kw["precision"] = args.precision
    if args.compile is not None:
        kw["compile"] = args.compile
    if args.stage2_steps is not None:
        if args.stage2_steps < 1:
            raise CommandError(f"--stage2-steps must be at least 1, not {args.stage2_steps}")
        kw["stage2_steps"] = args.stage2_steps
    cfg = DemoConfig.quick(**kw) if args.quick else DemoConfig(**kw)
    try:
        report = run_demo(cfg)
    except DemoError as e:
        raise CommandError(str(e)) from None
    acc = report["accuracy"]
    print("\nHeld-out accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))
    judged = {k: t for k, t in report["targets"].items() if t["met"] is not None}
    missed = [f"{k} {t['value']:g} (target {t['target']})" for k, t in judged.items() if not t["met"]]
    print(f"Targets met: {len(judged) - len(missed)} of {len(judged)}"
          + (f"; not met: {'; '.join(missed)}" if missed else "")
          + (f"; the time is not judged: {skip}" if (skip := report["targets"].get("total_s", {}).get("not_judged"))
             else ""))
    print(f"Report: {args.out}/report.md   (total {report['timings']['total_s']:.0f} s)")
    image = min((Path(args.out) / "world/heldout/images").iterdir())
    print("\nTalk to the model:")
    print(f"  vistune chat --model {report['model_dir']} --image {image}")
    print(f"  vistune serve --model {report['model_dir']}")
    return 0
