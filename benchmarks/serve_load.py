"""The served API under heavy requests: how long a normal request takes while a 4 MiB prompt
and a burst of 4096x4096 images arrive, and the server's memory before, during and after.

    PYTHONPATH=src python benchmarks/serve_load.py [--src DIR] [--out FILE]

`vistune serve` (the 6M benchmark model of generate.py) runs in a subprocess, from ``--src``
(default: this checkout's src; point it at an older checkout to compare). Steps:

1. a normal request (one question, 8 tokens) alone, five times: its median latency;
2. idle RSS (the baseline);
3. at once: a 4 MiB text prompt, one request with eight 4096x4096 PNGs, and eight requests
   with one such PNG each, while the normal request repeats: its latencies meanwhile,
   the time each heavy request took to be answered or refused, and the peak RSS;
4. RSS 10 s after the last heavy request.

Writes benchmarks/results/serve_load.json (or --out) and prints the figures.
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from generate import build_tiny, free_port  # noqa: E402

from vistune.files import write_json  # noqa: E402
from vistune.model.checkpoint import save_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "serve_load.json"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def big_png(seed: int, side: int = 4096) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (seed * 29 % 256, 80, 160)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=str(ROOT / "src"), help="the vistune source the server runs")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    loaded, tok = build_tiny()
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(loaded.model, tok, Path(tmp) / "tiny")
        port = free_port()
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        proc = subprocess.Popen([sys.executable, "-m", "vistune.cli", "serve", "--model", str(path), "--port",
                                 str(port)], env=dict(os.environ, PYTHONPATH=args.src),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        normal = {"model": "tiny", "max_tokens": 8, "temperature": 0,
                  "messages": [{"role": "user", "content": "What is in the image?"}]}

        def post(body: dict, timeout: float = 300) -> tuple[float, int]:
            t = time.monotonic()
            r = httpx.post(url, json=body, timeout=timeout)
            return time.monotonic() - t, r.status_code

        try:
            deadline = time.time() + 120
            while True:
                try:
                    post(normal, 5)
                    break
                except httpx.HTTPError:
                    if proc.poll() is not None or time.time() > deadline:
                        raise RuntimeError(f"server did not start: {proc.stderr.read()}")
                    time.sleep(0.5)
            alone = statistics.median(post(normal)[0] for _ in range(5))
            time.sleep(3)
            before = rss_mb(proc.pid)
            urls = [big_png(i) for i in range(8)]
            heavy = {
                "prompt_4mib": {"model": "tiny", "messages": [{"role": "user", "content": "red " * (1 << 20)}]},
                "eight_images_one_request": {"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": [
                    *({"type": "image_url", "image_url": {"url": u}} for u in urls), {"type": "text", "text": "?"}]}]},
                **{f"one_image_{i}": {"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": u}}, {"type": "text", "text": "What is it?"}]}]}
                   for i, u in enumerate(urls)},
            }
            results: dict = {}
            during: list[float] = []
            peak = [before]
            done = threading.Event()

            def sample() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], rss_mb(proc.pid))
                    time.sleep(0.05)

            def run_heavy(name: str) -> None:
                results[name] = post(heavy[name])

            sampler = threading.Thread(target=sample)
            sampler.start()
            threads = [threading.Thread(target=run_heavy, args=(n,)) for n in heavy]
            for t in threads:
                t.start()
            time.sleep(0.05)
            while any(t.is_alive() for t in threads):
                during.append(post(normal)[0])
            done.set()
            sampler.join()
            time.sleep(10)
            after = rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
    images = [results[f"one_image_{i}"] for i in range(8)]
    out = {
        "src": args.src,
        "machine": "shared 2-core CPU (other jobs running; figures are indicative)",
        "normal_alone_s": round(alone, 3),
        "normal_during_median_s": round(statistics.median(during), 3),
        "normal_during_max_s": round(max(during), 3),
        "normal_during_count": len(during),
        "prompt_4mib": {"s": round(results["prompt_4mib"][0], 3), "status": results["prompt_4mib"][1]},
        "eight_images_one_request": {"s": round(results["eight_images_one_request"][0], 3),
                                     "status": results["eight_images_one_request"][1]},
        "one_image_requests": {"max_s": round(max(s for s, _ in images), 3),
                               "statuses": sorted(c for _, c in images)},
        "rss_mb": {"before": round(before), "peak_during": round(peak[0]), "after_10s": round(after)},
    }
    write_json(args.out, out)
    for k, v in out.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
