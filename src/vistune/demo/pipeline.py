"""`vistune demo`: the whole LLaVA paper in miniature, on a laptop CPU.

Phases: a synthetic world -> instruction data (rules backend) and caption pairs ->
stage 0 (tiny CLIP-style vision encoder, tiny Llama) -> stage 1 (projector only,
`plain`) -> stage 2 (projector + LLM, `v0`) -> evaluation on held-out scenes with
ablations (full / no stage 1 / stage 1 only / text only) -> report.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from ..data.records import write_records
from ..eval.vqa import majority_baseline
from ..files import atomic_directory, write_json, write_jsonl
from ..hardware import describe_machine
from ..infer import Engine
from ..instruct.pairs import make_pairs
from ..instruct.rules import generate_mix, short_answer_questions
from ..instruct.synth import make_world
from .. import runtime
from ..text.templates import get_template, render
from ..text.tokenizer import train_bpe_tokenizer
from ..train import load_run_config
from ..train.checkpoints import latest_checkpoint, remove_checkpoints
from ..train.config import PRESETS_DIR
from ..train.features import cache_features_for_config
from ..train.metrics import loss_summary, read_metrics, step_times
from .evaluate import answer_questions, object_recall, vqa_questions, write_blank_questions
from .foundation import LMPretrainConfig, VisionPretrainConfig, pretrain_language_model, pretrain_vision_encoder
from .machine import describe, estimate_run_s, plan, probe_step
from .report import check_targets, write_report
from .side import SideCall, SideRun, train_preset



@dataclass
class DemoConfig:
    out: str = "runs/demo"
    seed: int = 0
    # Enough distinct scenes that stage 2 reads each record a few times, not enough to learn their answers.
    train_images: int = 4000
    heldout_images: int = 200
    vocab_size: int = 1024
    # Stage 2's records per training image, by kind: LLaVA-1.5's recipe in miniature, short-answer
    # VQA with its format prompt beside a share of LLaVA-Instruct's three kinds. Detailed
    # descriptions are long, so a small share of records is a large share of the loss.
    instruct_mix: dict[str, float] = field(default_factory=lambda: {
        "vqa": 1.0, "conversation": 0.1, "detail": 0.1, "reasoning": 0.1})
    vision: VisionPretrainConfig = field(default_factory=VisionPretrainConfig)
    lm: LMPretrainConfig = field(default_factory=LMPretrainConfig)
    stage1_steps: int = 30  # stage 1 barely matters at this scale (no stage 1: as good)
    # Batches of 14: with Muon, larger batches match smaller ones at half the orthogonalisations.
    # The lookups form late: fewer steps cost accuracy. The same count on every machine, so that
    # every CPU trains the same model; a CPU without native bf16 takes longer.
    stage2_steps: int = 1800
    stage2_batch: int = 14
    stage2_lr: float | None = None  # None: the preset's (configs/demo-stage2.yaml)
    stage2_muon_lr: float | None = None  # the rate of the matrices Muon updates; None: the preset's
    recall_images: int = 40
    ablations: bool = True
    threads: int = 0  # 0: torch's default
    # With two threads or more, the no-stage-1 ablation trains in a second process beside stages 1
    # and 2, each on half the threads: a small model's step gains little from a second thread. Stage 0's
    # vision encoder (one thread) trains beside the LM pretraining. Off: one run after the other.
    side_by_side: bool = True
    # Of vision pretraining, stage 1 and stage 2 (auto: bf16 where the CPU has it natively, else fp32:
    # emulated bf16 is many times slower). The stage-0 LM has its own setting (LMPretrainConfig.precision).
    precision: str = "auto"
    # torch.compile of stage 2's LM (and its ablation's): auto = in bf16, where inductor can build
    # CPU kernels (a C++ compiler, Python's headers); an fp32 step of this size gains nothing from it.
    compile: str = "auto"
    time_budget_s: float = 600.0  # judged on CPUs with native bf16 only (demo/machine.py)
    # Stage 2 and its ablation save a checkpoint every so many steps (0: none), so that an interrupted
    # demo continues with `resume` instead of starting again; saving does not change the numbers.
    checkpoint_every: int = 300
    # Continue the run in `out` that was interrupted: stage 0's finished models are kept, stage 2 and
    # its ablation go on from their last checkpoints, the cheap phases are redone (they are deterministic).
    resume: bool = False
    # Time a few stage-2-shaped steps before starting, to print how long the run will take here.
    probe: bool = True

    @classmethod
    def quick(cls, **kw) -> "DemoConfig":
        # Two minutes buy few updates, so the quick LM is narrow and shallow and takes a higher rate.
        # The three LLaVA-Instruct kinds keep a token share.
        base = cls(
            train_images=800, heldout_images=80, vocab_size=768,
            instruct_mix={"vqa": 1.0, "conversation": 0.05, "detail": 0.05, "reasoning": 0.05},
            vision=VisionPretrainConfig(steps=60),
            # transformers' embedding scale: over few steps, louder words let text only come too close to the full run
            lm=LMPretrainConfig(hidden_size=128, layers=2, heads=4, kv_heads=4, intermediate_size=512, steps=60,
                              batch_size=16, embed_std=0.02),
            stage1_steps=20, stage2_steps=480, stage2_batch=8, stage2_lr=1e-3, stage2_muon_lr=1e-3,
            recall_images=16, precision="fp32",
            # A compile with an empty cache costs too much of two minutes.
            compile="off", time_budget_s=120.0,
        )
        return replace(base, **kw)


RUN_SETTINGS = "demo-config.json"


class DemoError(ValueError):
    """A demo that cannot run as asked (a resume of another run's settings, say); says why."""


def _settings(cfg: DemoConfig) -> dict:
    """What decides a run's numbers: its config, less where it writes and whether it resumes."""
    d = asdict(cfg)
    for k in ("out", "resume", "probe"):
        d.pop(k)
    return json.loads(json.dumps(d))  # tuples as lists, as the saved copy reads back


def _check_resumable(out: Path, cfg: DemoConfig) -> None:
    path = out / RUN_SETTINGS
    if not path.exists():
        raise DemoError(f"--resume: {out} holds no demo run to continue ({RUN_SETTINGS} is missing)")
    if (out / "report.json").exists():
        raise DemoError(f"--resume: the run in {out} is complete (report.json): nothing to continue; "
                        "run without --resume to start again")
    saved, now = json.loads(path.read_text()), _settings(cfg)
    diff = [f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]
    if diff:
        raise DemoError(f"--resume: the run in {out} was started with other settings ({'; '.join(diff)}); "
                        "resume it with those, or start afresh without --resume")


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class _Phases:
    """Times each phase and announces it, so every phase shows up in report.json."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        print(f"\n== {name}", flush=True)
        t = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t, 1)
        print(f"   done in {self.timings[name]:.1f} s", flush=True)


def _bar(desc: str, total: int):
    bar = tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if step + 1 >= total:
            bar.close()

    return progress


def _strip_images(turns: list[dict]) -> list[dict]:
    return [{"from": t["from"], "value": t["value"].replace("<image>\n", "").replace("\n<image>", "")} for t in turns]


def _train(preset: str, overrides: dict, out_dir: Path, resume: bool):
    # The stages run through the same shipped presets a user would pass to `vistune train`.
    return train_preset(PRESETS_DIR / preset, {**overrides, "output_dir": str(out_dir),
                                               **_continue_or_restart(out_dir, resume)})


def _continue_or_restart(run_dir: Path, resume: bool) -> dict:
    """A stage continues from its newest checkpoint when the demo resumes and it has one; else it
    starts afresh over what an earlier demo left in its folder (the demo owns OUT)."""
    if resume and latest_checkpoint(run_dir) is not None:
        return {"train.resume": "auto"}
    return {"train.overwrite": True}


def _pretrain_foundation(texts: list[str], tok, foundation: Path, vis_cfg: VisionPretrainConfig,
                         lm_cfg: LMPretrainConfig, side_by_side: bool) -> None:
    """Stage 0's two models. The vision encoder always trains on one thread: its convolutions sum in
    an order that depends on the thread count, and every later number moves with the encoder, so one
    thread gives every machine the same encoder. With a core to spare it trains beside the LM
    pretraining, which gives the same weights on any number of threads and takes the rest: no
    slower than the two one after the other on two threads."""
    threads = torch.get_num_threads()
    vision_args = (tok, foundation / "vision", vis_cfg)
    if side_by_side and threads >= 2:
        side = SideCall(pretrain_vision_encoder, vision_args, 1, "CLIP-style vision pretraining", vis_cfg.steps)
        try:
            with runtime.threads(threads - 1):
                pretrain_language_model(texts, tok, foundation / "llm", lm_cfg, _bar("LM pretraining", lm_cfg.steps))
            side.result()
        finally:
            side.stop()
        return
    with runtime.threads(1):
        pretrain_vision_encoder(*vision_args, progress=_bar("CLIP-style vision pretraining", vis_cfg.steps))
    pretrain_language_model(texts, tok, foundation / "llm", lm_cfg, _bar("LM pretraining", lm_cfg.steps))


def run_demo(cfg: DemoConfig) -> dict:
    """Run every phase; returns the report dict (also written to OUT/report.json)."""
    if cfg.threads:
        runtime.set_threads(cfg.threads)
    runtime.training_memory()  # stage 0 and the evaluation too, not only the training runs
    steps2 = cfg.stage2_steps
    out = Path(cfg.out)
    if cfg.resume:
        _check_resumable(out, cfg)
    machine = plan(cfg.precision, cfg.compile, torch.get_num_threads(), cfg.side_by_side, cfg.ablations)
    precision, compiled = machine.precision, machine.compiled
    if cfg.probe:
        lm = cfg.lm
        machine.probe_step_s = probe_step(lm.hidden_size, lm.layers, lm.heads, lm.kv_heads, lm.intermediate_size,
                                          cfg.vocab_size, cfg.stage2_batch, precision, machine.main_threads)
        machine.estimate_s = estimate_run_s(machine.probe_step_s, steps2)
    print("\n".join("   " + line for line in describe(machine, cfg.time_budget_s)), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        # A report in OUT marks a finished run: an older one goes now that this run replaces it.
        (out / "report.json").unlink(missing_ok=True)
    write_json(out / RUN_SETTINGS, _settings(cfg))
    phase = _Phases()
    t0 = time.perf_counter()
    _seed_all(cfg.seed)

    with phase("world"):
        world = out / "world"
        train_anns = make_world(world / "train", cfg.train_images, seed=cfg.seed, progress=True)
        held_anns = make_world(world / "heldout", cfg.heldout_images, seed=cfg.seed + 100_003, progress=True)

    with phase("data"):
        data = out / "data"
        instruct = generate_mix(train_anns, cfg.instruct_mix, seed=cfg.seed)
        pairs = make_pairs(train_anns, seed=cfg.seed)
        # The held-out questions are a VQA task: one reference answer each, the kind as question type.
        questions = vqa_questions(short_answer_questions(held_anns, seed=cfg.seed))
        write_records(instruct, data / "instruct.jsonl")
        write_records(pairs, data / "pairs.jsonl")
        questions_file = write_jsonl(data / "eval_questions.jsonl", questions)
        print(f"   {len(instruct)} instruction records, {len(pairs)} caption pairs, "
              f"{len(questions)} held-out questions")

    with phase("stage 0: tokenizer, vision encoder, language model"):
        foundation = out / "foundation"
        # Each model directory appears whole or not at all (atomic_directory): one that is there is done.
        if cfg.resume and all((foundation / d / "config.json").exists() for d in ("vision", "llm")):
            print("   kept from the interrupted run", flush=True)
        else:
            v0 = get_template("v0")
            texts = [c for a in train_anns for c in a.captions]
            texts += [render(v0, _strip_images(r["conversations"]), eos="</s>", bos="<s>").text for r in instruct]
            texts += [r["conversations"][0]["value"].replace("<image>", "") for r in pairs]
            tok = train_bpe_tokenizer(texts, vocab_size=cfg.vocab_size)
            vis_cfg = replace(cfg.vision, seed=cfg.seed, precision=precision)
            lm_cfg = replace(cfg.lm, seed=cfg.seed)
            _pretrain_foundation(texts, tok, foundation, vis_cfg, lm_cfg, cfg.side_by_side)

    common1 = {"model.vision": str(foundation / "vision"), "model.llm": str(foundation / "llm"),
               "data.train": str(data / "pairs.jsonl"), "data.images": str(world / "train"),
               "train.max_steps": cfg.stage1_steps, "train.seed": cfg.seed, "train.precision": precision}
    common2 = {"data.train": str(data / "instruct.jsonl"), "data.images": str(world / "train"),
               "train.max_steps": steps2, "train.batch_size": cfg.stage2_batch, "train.seed": cfg.seed,
               "train.precision": precision, "train.compile": compiled,
               # The tower is frozen in stage 2: its features are computed once, and stage 2 and its
               # ablation (the same tower) read them instead of decoding and encoding images each step.
               "data.feature_cache": str(out / "feature_cache"),
               "train.save_every": cfg.checkpoint_every}
    if cfg.stage2_lr is not None:
        common2["train.lr"] = cfg.stage2_lr
    if cfg.stage2_muon_lr is not None:
        common2["train.muon_lr"] = cfg.stage2_muon_lr
    # The ablation: stage 2 from stage 0's models and a fresh projector, built as stage 1 builds it.
    s1_model = load_run_config(PRESETS_DIR / "demo-stage1.yaml", common1).model
    no_stage1 = {**common2, "model.from": None, "model.vision": common1["model.vision"],
                 "model.llm": common1["model.llm"], "model.projector": s1_model.projector,
                 "model.vision_feature_layer": s1_model.vision_feature_layer,
                 "output_dir": str(out / "ablation-no-stage1"),
                 **_continue_or_restart(out / "ablation-no-stage1", cfg.resume)}
    main_threads, side_threads = machine.main_threads, machine.side_threads
    side = None
    if side_threads:
        with phase("feature cache of the frozen tower"):
            # Built once, before the two stage-2 runs start, so that they do not both build it.
            cache_features_for_config(load_run_config(PRESETS_DIR / "demo-stage2.yaml", no_stage1))
        print(f"   the no-stage-1 ablation trains in a second process ({side_threads} of "
              f"{main_threads + side_threads} threads) beside stages 1 and 2", flush=True)
        side = SideRun(PRESETS_DIR / "demo-stage2.yaml", no_stage1, side_threads,
                       "ablation (no stage 1)", steps2)
        runtime.set_threads(main_threads)
    try:
        with phase("stage 1: feature alignment (projector only)"):
            s1 = _train("demo-stage1.yaml", common1, out / "stage1", cfg.resume)
        with phase("stage 2: instruction tuning (projector + LLM)"):
            if compiled:
                # The bar stands still while inductor compiles; say why, so it does not look hung.
                print("   the LM is compiled (torch.compile): the first step takes about a minute", flush=True)
            s2 = _train("demo-stage2.yaml", {**common2, "model.from": str(s1.model_dir)}, out / "stage2", cfg.resume)
        runs = {"stage1": s1, "stage2": s2}
        if cfg.ablations:
            # Side by side, this phase's time is only the wait for the side run to finish.
            with phase("ablation: stage 2 without stage 1" + (" (rest of the side run)" if side else "")):
                runs["no_stage1"] = side.result() if side is not None else train_preset(
                    PRESETS_DIR / "demo-stage2.yaml", no_stage1)
    finally:
        if side is not None:
            side.stop()  # a no-op once its result is in; ends it if the main line failed
        runtime.set_threads(main_threads + side_threads)

    with phase("evaluation on held-out scenes"):
        # eval's VQA task, one folder of predictions, metrics and report per variant in OUT/eval.
        held_root, evals = world / "heldout", out / "eval"
        variants = [("full", s2.model_dir, questions_file, held_root)]
        if cfg.ablations:
            variants += [("no_stage1", runs["no_stage1"].model_dir, questions_file, held_root),
                         ("stage1_only", s1.model_dir, questions_file, held_root),
                         ("text_only", s2.model_dir, None, evals)]
        # Every model is asked in stage 2's template: the stage-1 model was trained on `plain`, and
        # the question is whether alignment alone gives answers.
        runtime.inference_process()  # the allocator setting an engine is tuned for
        engines = {d: Engine.from_path(d, template="v0") for d in dict.fromkeys(d for _, d, _, _ in variants)}
        results: dict[str, dict] = {}
        samples: dict[str, list[dict]] = {}
        for key, model_dir, qfile, image_dir in variants:
            if qfile is None:  # text only: the full model asked about one blank image
                qfile = write_blank_questions(questions, evals, engines[model_dir].loaded.image_config.size)
            results[key], samples[key] = answer_questions(engines[model_dir], qfile, image_dir, evals / key, key)
        recall, recall_samples = object_recall(engines[s2.model_dir], held_anns[: cfg.recall_images], held_root,
                                               evals / "descriptions")

    with phase("final model and report"):
        final = out / "model"
        with atomic_directory(final) as tmp:
            shutil.copytree(s2.model_dir, tmp, dirs_exist_ok=True)
        majority = majority_baseline(questions)
        by_kind = {k: {kind: e["accuracy"] for kind, e in m["by"]["question_type"].items()} for k, m in results.items()}
        report = {
            "seed": cfg.seed,
            "precision": precision,
            "compiled": compiled,
            # Every choice taken from the machine, with its reason and the time estimate.
            "machine_plan": machine.to_dict(),
            "stage2_steps": steps2,
            "config": asdict(cfg),
            "accuracy": {k: round(m["exact_match"], 4) for k, m in results.items()},
            "accuracy_by_kind": {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in by_kind.items()},
            "accuracy_first_word": {k: round(m["prefix_match"], 4) for k, m in results.items()},
            "majority_baseline": {k: round(v, 4) for k, v in majority.items()},
            "object_recall": round(recall, 4),
            "questions": len(questions),
            # From metrics.jsonl, which holds every step of a resumed run too.
            "train_losses": {k: {**loss_summary(read_metrics(r.metrics_path)), "steps": r.steps}
                             for k, r in runs.items()},
            "timings": {**phase.timings},
            "resumed": cfg.resume,  # then the timings are those of the resumed part only
            "resumed_from": {k: str(r.resumed_from) for k, r in runs.items() if r.resumed_from is not None},
            # Machines of one CPU name differ in speed: a time means little without its machine.
            "machine": describe_machine(),
            "step_times": {k: step_times(read_metrics(r.metrics_path)) for k, r in runs.items()},
            "ablation_side_by_side": side is not None,
            "model_dir": str(final),
        }
        report["timings"]["total_s"] = round(time.perf_counter() - t0, 1)
        report["targets"] = check_targets(report, cfg.time_budget_s, machine.time_target_applies,
                                          machine.time_target_why)
        write_report(out, report, runs, samples, recall_samples)
        # The checkpoints were there for a resume; with the report written, nothing is left to resume.
        for r in runs.values():
            remove_checkpoints(r.output_dir)
    return report
