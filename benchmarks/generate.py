"""Generation throughput: vistune's engine vs transformers' `generate`, and the served API.

    PYTHONPATH=src python benchmarks/generate.py [--new-tokens 32] [--repeats 5] [--threads 1] [--no-serve]

1. A tiny (~6M) vistune model and the equivalent `LlavaForConditionalGeneration`
   carrying the same weights (vision_tower <- vision.model, multi_modal_projector.linear_1/2
   <- projector.0/2, language_model / lm_head <- language_model). Both decode the same
   eight prompts greedily (one image each, KV cache), one call per prompt (batch 1) and
   in one call (batch 8); their tokens must agree. The cases (batch 1 and 8, each system) run round robin, each timed
   warm (after an untimed call of its own) once per round, and the medians are compared,
   so machine-load drift hits every case alike.
   llama.cpp joins batch 1 in the same rounds, when llama-cpp-python is importable (skipped with
   the reason printed otherwise): the same model exported with `vistune export --format gguf` at
   q8_0 and at f16, run by llama.cpp's own libraries (libllama + mtmd, through the bindings
   tests/llama_cpp_runner.py drives) on the same eight prompts and images, `--threads` threads,
   32 greedy tokens each; its time to the first token (image encoding + prefill + token 1)
   beside vistune's first step.
2. `vistune serve` in a subprocess, hit by 1 and then 8 concurrent OpenAI clients:
   completion tokens/s of the server.
3. Two chats taking turns on one engine (five questions each): the median time of turns 2-5
   when the engine stores one turn per conversation (the default) against one turn in all.

Writes benchmarks/results/generate.json, or --out (hf_ratio_batch1, batch8_over_batch1 end to end,
decode_batch8_over_batch1 for the decode steps alone, concurrent8_over_1, interleaved_chat_speedup,
llama_cpp_ratios, plus the raw figures, among them vistune's and llama.cpp's first-step and
per-decode-step times, and the load average) and prints a table.
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vistune import runtime
from vistune.files import write_json
from vistune.infer.chat import Chat
from vistune.infer.engine import Engine, GenerationConfig, Prompt
from vistune.model.build import build_vlm
from vistune.model.checkpoint import LoadedModel, save_model
from vistune.model.tiny import tiny_text_config, tiny_vision_config
from vistune.text.templates import LLAVA_SYSTEM_USER
from vistune.text.tokenizer import train_bpe_tokenizer

RESULTS = Path(__file__).parent / "results" / "generate.json"
LLAMA_CPP_OUTTYPES = ("q8_0", "f16")
WORDS = ("red green blue yellow circle square triangle left right top bottom small large the a is are "
         "there what color shape how many objects image picture describe in of on yes no one two three").split()
QUESTIONS = [
    "What is in the image?",
    "Describe the image in detail, naming every object and its colour.",
    "How many red circles are there?",
    "Is there a square on the left side of the picture, and what colour is it?",
    "What shape is at the top?",
    "Describe the objects at the bottom right of the image and how they relate to the ones above them.",
    "Colour?",
    "Which object is the largest, and where is it?",
]


def build_tiny(seed: int = 0) -> tuple[LoadedModel, object]:
    """The 6M benchmark size of ENVIRONMENT.md: LM 256x4, ViT 128x4, 64 px / patch 8, vocab 4096."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "." for _ in range(2000)]
    # A real tokenizer knows the words of the system prompt and the questions; so should this one,
    # or prompts become twice as long as with a real model (ENVIRONMENT.md measured ~97 tokens).
    texts += [LLAVA_SYSTEM_USER, "USER: ASSISTANT:", *QUESTIONS] * 50
    tok = train_bpe_tokenizer(texts, vocab_size=4096)
    torch.manual_seed(seed)
    vision = tiny_vision_config("clip", image_size=64, patch_size=8, hidden_size=128, layers=4, heads=4)
    text = tiny_text_config("llama", vocab_size=4096, hidden_size=256, layers=4, heads=4)
    model, tok = build_vlm(vision, text, tok, projector_type="mlp2x_gelu")
    return LoadedModel(model.eval(), tok), tok


def to_llava_hf(loaded: LoadedModel):
    """The same network as transformers' LlavaForConditionalGeneration, sharing no tensors."""
    from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration

    m = loaded.model
    cfg = m.config
    vcfg = AutoConfig.for_model(**cfg.vision)
    tcfg = AutoConfig.for_model(**cfg.text)
    hf_cfg = LlavaConfig(
        vision_config=vcfg, text_config=tcfg, image_token_index=cfg.image_token_id,
        image_seq_length=cfg.num_image_tokens, projector_hidden_act="gelu",
        vision_feature_layer=cfg.vision_feature_layer, vision_feature_select_strategy="default",
    )
    hf = LlavaForConditionalGeneration(hf_cfg).eval()
    sd = {}
    for k, v in m.state_dict().items():
        if k.startswith("vision.model."):
            sd["model.vision_tower." + k[len("vision.model."):]] = v
        elif k.startswith("projector."):
            idx, rest = k[len("projector."):].split(".", 1)
            sd[f"model.multi_modal_projector.linear_{int(idx) // 2 + 1}.{rest}"] = v
        elif k.startswith("language_model.model."):
            sd["model.language_model." + k[len("language_model.model."):]] = v
        elif k.startswith("language_model.lm_head."):
            sd["lm_head." + k[len("language_model.lm_head."):]] = v
    missing, unexpected = hf.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf.generation_config.pad_token_id = loaded.tokenizer.pad_token_id
    hf.generation_config.eos_token_id = loaded.tokenizer.eos_token_id
    return hf


def images(n: int, size: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def hf_inputs(engine: Engine, prompts: list[Prompt]) -> dict:
    enc = [engine.encode(p) for p in prompts]
    width = max(len(e.input_ids) for e in enc)
    pad = engine.tokenizer.pad_token_id
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, width - len(e.input_ids):] = torch.tensor(e.input_ids)
        mask[i, width - len(e.input_ids):] = 1
    pixels = torch.stack([engine.loaded.pixels(im) for p in prompts for im in p.images])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def load_llama_cpp() -> tuple[object | None, str]:
    """tests/llama_cpp_runner (llama.cpp through llama-cpp-python), or None and why not."""
    try:
        import gguf  # noqa: F401  (the export writes with it)
        import llama_cpp
    except ImportError as e:
        return None, f"llama.cpp skipped: {e.name} is not importable (`make test-llama-cpp` installs it)"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import llama_cpp_runner

    return llama_cpp_runner, f"llama-cpp-python {llama_cpp.__version__}"


def time_round_robin(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Median seconds of each function, all run in the same rounds, so that a shared machine's
    load drifts hit batch 1 and batch 8, vistune and transformers alike. In each round every
    case first runs once untimed: it is timed warm, as in a steady stream of its own calls,
    not with the caches the previous case left behind."""
    outs = {k: fn() for k, fn in fns.items()}  # warm-up
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            fn()
            t0 = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, outs


def bench_engine_vs_hf(new_tokens: int, repeats: int, llama_cpp=None, gguf_dir: Path | None = None) -> dict:
    loaded, tok = build_tiny()
    # Every run encodes its images and prefills its whole prompt, as HF does: no image cache, and no
    # stored turns (the same eight prompts come round again, and would be served from the store).
    engine = Engine(loaded, image_cache_size=0)
    engine.reuse_turns = False
    hf = to_llava_hf(loaded)
    suppress = engine._suppress
    cfg = GenerationConfig(max_new_tokens=new_tokens)
    out: dict = {"params": sum(p.numel() for p in loaded.model.parameters()), "new_tokens": new_tokens}
    fns, inputs, firsts = {}, {}, {}
    # The same eight requests at both batch sizes: batch 1 answers them one call at a time,
    # batch 8 in one call. (Timing batch 1 on one prompt alone would compare unlike workloads.)
    prompts = [Prompt.ask(QUESTIONS[i % len(QUESTIONS)], [im]) for i, im in enumerate(images(8))]
    for bs in (1, 8):
        groups = [prompts[i:i + bs] for i in range(0, len(prompts), bs)]
        inputs[bs] = [hf_inputs(engine, g) for g in groups]
        # Both sides start from token ids and pixels; both run the vision tower every time.
        encoded = [[engine.encode(Prompt(p.turns, [engine.loaded.pixels(im) for im in p.images])) for p in g]
                   for g in groups]
        firsts[bs] = []

        def run_hf(xs=inputs[bs]):
            with torch.inference_mode():
                return [hf.generate(**x, max_new_tokens=new_tokens, do_sample=False, suppress_tokens=suppress)
                        for x in xs]

        def run_vistune(groups=encoded, firsts=firsts[bs]):
            # engine.generate per call, with each call's first step (vision tower + prefill + first
            # token) timed apart.
            completions, first = [], 0.0
            for enc in groups:
                run = engine.start(enc, cfg)
                steps = iter(run)
                t0 = time.perf_counter()
                next(steps)
                first += time.perf_counter() - t0
                for _ in steps:
                    pass
                completions += run.completions
            firsts.append(first / len(groups))
            return completions

        fns[("hf", bs)], fns[("vistune", bs)] = run_hf, run_vistune
    pairs, lc_chunks, notes = {}, {}, {}
    if llama_cpp is not None:
        from vistune.interop.gguf import export_gguf

        for outtype in LLAMA_CPP_OUTTYPES:
            files = export_gguf(loaded.model, tok, gguf_dir / outtype, outtype=outtype)
            notes[outtype] = files.notes
            pair = pairs[outtype] = llama_cpp.Pair(engine, files, threads=torch.get_num_threads())
            # llama.cpp too starts from prompt tokens and preprocessed images (mtmd's chunks),
            # rendered with the chat template in the file, as llama-server renders it.
            lc_chunks[outtype] = [pair.lc.chunks(pair.text(p), list(p.images)) for p in prompts]
            firsts[outtype] = []

            def run_llama_cpp(lc=pair.lc, chunks=lc_chunks[outtype], firsts=firsts[outtype]):
                runs = [lc.greedy_from(c, new_tokens) for c in chunks]
                firsts.append(statistics.mean(first for _, first in runs))
                return [tokens for tokens, _ in runs]

            fns[("llama.cpp", outtype)] = run_llama_cpp
    try:
        times, outs = time_round_robin(fns, repeats)
    finally:
        for outtype, pair in pairs.items():
            for c in lc_chunks[outtype]:
                pair.lc.free_chunks(c)
    for bs in (1, 8):
        t_hf, t_vt, hf_outs, vt_out = times[("hf", bs)], times[("vistune", bs)], outs[("hf", bs)], outs[("vistune", bs)]
        hf_texts, n_hf = [], 0
        for x, hf_out in zip(inputs[bs], hf_outs):
            width = x["input_ids"].shape[1]
            hf_texts += [tok.decode(row[width:], skip_special_tokens=True).strip() for row in hf_out]
            n_hf += int((hf_out[:, width:] != tok.pad_token_id).sum())
        agree = sum(a == c.text for a, c in zip(hf_texts, vt_out))
        n_vt = sum(c.completion_tokens for c in vt_out)
        calls = len(inputs[bs])
        first = statistics.median(firsts[bs][2::2])  # the timed calls: after the warm-up, every second
        decode_steps = max(c.completion_tokens for c in vt_out) - 1
        out[f"batch{bs}"] = {
            "hf_tokens_per_s": n_hf / t_hf, "vistune_tokens_per_s": n_vt / t_vt,
            "hf_seconds": t_hf, "vistune_seconds": t_vt, "hf_tokens": n_hf, "vistune_tokens": n_vt,
            "calls": calls, "texts_equal": f"{agree}/{len(vt_out)}",
            "vistune_first_step_ms": first * 1e3, "vistune_decode_steps": decode_steps,
            "vistune_decode_step_ms": (t_vt / calls - first) / decode_steps * 1e3,
        }
    vt_out = outs[("vistune", 1)]
    for outtype, pair in pairs.items():
        t_lc, lc_out = times[("llama.cpp", outtype)], outs[("llama.cpp", outtype)]
        n_lc = sum(len(t) for t in lc_out)
        first = statistics.median(firsts[outtype][2::2])
        same = sum(tok.decode(t, skip_special_tokens=True).strip() == c.text for t, c in zip(lc_out, vt_out))
        ids_equal = sum(pair.prompt_ids(p) == engine.encode(p).input_ids for p in prompts)
        out.setdefault("llama_cpp", {})[outtype] = {
            "tokens_per_s": n_lc / t_lc, "seconds": t_lc, "tokens": n_lc, "calls": len(prompts),
            "first_token_ms": first * 1e3, "decode_step_ms": (t_lc / len(prompts) - first) / (new_tokens - 1) * 1e3,
            "texts_equal_vistune": f"{same}/{len(prompts)}", "prompt_ids_equal": f"{ids_equal}/{len(prompts)}",
            "export_notes": notes[outtype],
        }
        pair.close()
    return out


# -- served throughput ------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def bench_serve(new_tokens: int, requests_per_client: int) -> dict:
    from openai import OpenAI

    loaded, tok = build_tiny()
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(loaded.model, tok, Path(tmp) / "tiny")
        port = free_port()
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"),
                   OMP_NUM_THREADS=str(torch.get_num_threads()))
        proc = subprocess.Popen(
            [sys.executable, "-m", "vistune.cli", "serve", "--model", str(path), "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
            deadline = time.time() + 120
            while True:
                try:
                    client.models.list()
                    break
                except Exception:
                    if proc.poll() is not None or time.time() > deadline:
                        raise RuntimeError(f"server did not start: {proc.stderr.read() if proc.stderr else ''}")
                    time.sleep(0.5)
            urls = [data_url(im) for im in images(8)]

            def one_client(i: int, counts: list[int]) -> None:
                for r in range(requests_per_client):
                    q = QUESTIONS[(i + r) % len(QUESTIONS)]
                    resp = client.chat.completions.create(
                        model=path.name, max_tokens=new_tokens, temperature=0,
                        messages=[{"role": "user", "content": [
                            {"type": "image_url", "image_url": {"url": urls[i]}},
                            {"type": "text", "text": q}]}],
                    )
                    counts[i] += resp.usage.completion_tokens

            def run(n_clients: int) -> float:
                counts = [0] * n_clients
                threads = [threading.Thread(target=one_client, args=(i, counts)) for i in range(n_clients)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                return sum(counts) / (time.perf_counter() - t0)

            import httpx

            def batches() -> tuple[int, int]:
                h = httpx.get(f"http://127.0.0.1:{port}/health").json()
                return h["steps"], h["row_steps"]

            run(1)  # warm-up
            tps1 = run(1)
            b0, n0 = batches()
            tps8 = run(8)
            b1, n1 = batches()
            mean8 = (n1 - n0) / max(1, b1 - b0)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return {"clients1_tokens_per_s": tps1, "clients8_tokens_per_s": tps8, "requests_per_client": requests_per_client,
            "mean_batch_size_8_clients": mean8}


def bench_interleaved_chats(repeats: int, new_tokens: int = 10) -> dict:
    """Median turn time (turns 2-5) of two conversations that take turns on one engine."""
    loaded, _ = build_tiny()
    pictures = images(2)
    cfg = GenerationConfig(max_new_tokens=new_tokens)

    def run(stored_turns: int) -> float:
        engine = Engine(loaded, stored_turns=stored_turns)
        chats = [Chat(engine, config=cfg) for _ in pictures]
        for chat, picture in zip(chats, pictures):
            chat.attach(picture)
        times = []
        for i, question in enumerate(QUESTIONS[:5]):
            for chat in chats:
                t0 = time.perf_counter()
                chat.ask(question)
                if i:
                    times.append(time.perf_counter() - t0)
        return statistics.median(times)

    medians: dict[int, list[float]] = {1: [], 8: []}
    for _ in range(repeats):  # alternated, so that load drift hits both alike
        for n in medians:
            medians[n].append(run(n))
    one, per = statistics.median(medians[1]), statistics.median(medians[8])
    return {"turn_ms_one_stored_turn": one * 1e3, "turn_ms_turn_per_conversation": per * 1e3,
            "new_tokens": new_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--requests-per-client", type=int, default=6)
    ap.add_argument("--no-serve", action="store_true", help="skip the served-throughput part")
    ap.add_argument("--no-engine", action="store_true", help="skip the engine-vs-transformers part")
    ap.add_argument("--no-chat", action="store_true", help="skip the interleaved-chats part")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp in the engine part")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default {RESULTS})")
    # One thread by default: on a shared 2-core machine, two OpenMP threads stall whenever another
    # process holds a core (measured: 16 tok/s instead of ~240 at batch 1).
    ap.add_argument("--threads", type=int, default=1, help="torch threads, and llama.cpp's (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runtime.inference_process()  # what `vistune infer` and `serve` set: the engine leaves it to its caller

    # the load average before and after: on a shared machine it says how far to trust the run
    result: dict = {"machine": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                                "loadavg_start": os.getloadavg()}}
    rows = []
    if not args.no_engine:
        llama_cpp, why = (None, "llama.cpp skipped: --no-llama-cpp") if args.no_llama_cpp else load_llama_cpp()
        print(why)
        result["machine"]["llama_cpp"] = why
        with tempfile.TemporaryDirectory() as gguf_dir:
            res = bench_engine_vs_hf(args.new_tokens, args.repeats, llama_cpp, Path(gguf_dir))
        b1, b8 = res["batch1"], res["batch8"]
        result.update({
            "hf_ratio_batch1": b1["vistune_tokens_per_s"] / b1["hf_tokens_per_s"],
            "hf_ratio_batch8": b8["vistune_tokens_per_s"] / b8["hf_tokens_per_s"],
            "batch8_over_batch1": b8["vistune_tokens_per_s"] / b1["vistune_tokens_per_s"],
            # Decode steps only (prefill excluded): what batching buys once the prompts are in the cache.
            "decode_batch8_over_batch1": 8 * b1["vistune_decode_step_ms"] / b8["vistune_decode_step_ms"],
            "engine": res,
        })
        rows += [
            ("vistune batch 1", f"{b1['vistune_tokens_per_s']:.0f} tok/s", f"HF {b1['hf_tokens_per_s']:.0f} tok/s",
             f"{result['hf_ratio_batch1']:.2f}x HF (target >= 1.0)", b1["texts_equal"]),
            ("vistune batch 8", f"{b8['vistune_tokens_per_s']:.0f} tok/s", f"HF {b8['hf_tokens_per_s']:.0f} tok/s",
             f"{result['hf_ratio_batch8']:.2f}x HF; {result['batch8_over_batch1']:.2f}x batch 1 (target >= 4)",
             b8["texts_equal"]),
        ]
        if "llama_cpp" in res:
            # llama.cpp over vistune (tokens/s: above 1 is llama.cpp faster; first token: above 1 is it slower)
            result["llama_cpp_ratios"] = {
                outtype: {"tokens_per_s_over_vistune": lc["tokens_per_s"] / b1["vistune_tokens_per_s"],
                          "tokens_per_s_over_hf": lc["tokens_per_s"] / b1["hf_tokens_per_s"],
                          "first_token_ms_over_vistune": lc["first_token_ms"] / b1["vistune_first_step_ms"]}
                for outtype, lc in res["llama_cpp"].items()}
            for outtype, lc in res["llama_cpp"].items():
                r = result["llama_cpp_ratios"][outtype]
                rows.append((f"llama.cpp {outtype} b1", f"{lc['tokens_per_s']:.0f} tok/s",
                             f"vistune {b1['vistune_tokens_per_s']:.0f} tok/s",
                             f"{r['tokens_per_s_over_vistune']:.2f}x vistune, {r['tokens_per_s_over_hf']:.2f}x HF; "
                             f"first token {r['first_token_ms_over_vistune']:.2f}x",
                             f"{lc['texts_equal_vistune']} (vistune)"))
    if not args.no_serve:
        srv = bench_serve(args.new_tokens, args.requests_per_client)
        result["concurrent8_over_1"] = srv["clients8_tokens_per_s"] / srv["clients1_tokens_per_s"]
        result["serve"] = srv
        rows.append(("served, 8 clients", f"{srv['clients8_tokens_per_s']:.0f} tok/s",
                     f"1 client {srv['clients1_tokens_per_s']:.0f} tok/s",
                     f"{result['concurrent8_over_1']:.2f}x (target >= 3); mean batch {srv['mean_batch_size_8_clients']:.1f}",
                     "-"))
    if not args.no_chat:
        chat = bench_interleaved_chats(args.repeats)
        result["interleaved_chat_speedup"] = chat["turn_ms_one_stored_turn"] / chat["turn_ms_turn_per_conversation"]
        result["chat"] = chat
        rows.append(("2 chats, turns 2-5", f"{chat['turn_ms_turn_per_conversation']:.1f} ms/turn",
                     f"1 stored {chat['turn_ms_one_stored_turn']:.1f} ms",
                     f"{result['interleaved_chat_speedup']:.2f}x faster turns", "-"))
    print(f"\n{'case':<20} {'throughput':<14} {'baseline':<20} {'ratio':<48} same text as HF")
    for r in rows:
        print(f"{r[0]:<20} {r[1]:<14} {r[2]:<20} {r[3]:<48} {r[4]}")
    if "engine" in result:
        print("\nvistune time per batch = first step (vision + prefill + token 1) + later decode steps:")
        for bs in (1, 8):
            b = result["engine"][f"batch{bs}"]
            print(f"  batch {bs}: {b['vistune_first_step_ms']:.1f} ms + {b['vistune_decode_steps']} x "
                  f"{b['vistune_decode_step_ms']:.2f} ms")
        print(f"  decode steps alone: batch 8 = {result['decode_batch8_over_batch1']:.2f}x batch 1 throughput")
        for outtype, lc in result["engine"].get("llama_cpp", {}).items():
            print(f"  llama.cpp {outtype}, batch 1: {lc['first_token_ms']:.1f} ms + {args.new_tokens - 1} x "
                  f"{lc['decode_step_ms']:.2f} ms (prompt ids equal to vistune's: {lc['prompt_ids_equal']})")
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["command"] = " ".join(["benchmarks/generate.py", *sys.argv[1:]])
    write_json(args.out, result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
