"""The LLM backend against a real HTTP server on loopback, through the real openai client."""
import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai_stub import USAGE, Reply, StubLLM

from vistune.cli import main
from vistune.data.records import parse_record
from vistune.instruct.annotations import Box, ImageAnnotation, save_annotations
from vistune.instruct.instructions import DETAIL_INSTRUCTIONS
from vistune.instruct.llm import (
    LLMConfig, LLMError, OutputLog, backoff_delay, generate_with_llm, to_record,
)

SRC = Path(__file__).resolve().parents[1] / "src"
KINDS = ["conversation", "detail", "reasoning"]


def anns(n: int) -> list[ImageAnnotation]:
    return [ImageAnnotation(str(i), f"{i:06d}.jpg", 640, 480,
                            [f"img{i} a cat sits on a mat.", "A cat near a window."],
                            [Box("cat", (10, 20, 200, 300))]) for i in range(1, n + 1)]


def cfg(stub: StubLLM, **kw) -> LLMConfig:
    base = dict(model="stub-model", base_url=stub.url, api_key_env="VISTUNE_TEST_NO_KEY", concurrency=4,
                max_attempts=4, backoff_base=0.01, backoff_max=0.05, timeout=5.0)
    base.update(kw)
    return LLMConfig(**base)


def read(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def record_sleeps():
    delays: list[float] = []

    async def sleep(d: float) -> None:
        delays.append(d)
        await asyncio.sleep(0)

    return delays, sleep


def test_happy_path_records_usage_and_concurrency_bound(tmp_path):
    out = tmp_path / "out.jsonl"
    with StubLLM(delay=0.1) as stub:
        s = generate_with_llm(anns(4), KINDS, out, cfg(stub, concurrency=3), progress=False)
        assert stub.max_inflight == 3  # in parallel, never more than the bound
    recs = read(out)
    assert sorted(r["id"] for r in recs) == sorted(f"{i}-{k}" for i in range(1, 5) for k in KINDS)
    for r in recs:
        rec = parse_record(r)  # a valid LLaVA record: one <image>, alternating turns
        assert rec.images == [f"{int(r['id'].split('-')[0]):06d}.jpg"] and r["kind"] == r["id"].split("-")[1]
        first = rec.conversations[0]["value"]
        assert first.startswith("<image>\n") or first.endswith("\n<image>")
    by_id = {r["id"]: r for r in recs}
    assert [t["value"] for t in by_id["2-conversation"]["conversations"][1::2]] == [
        "It is cat number 2.", "On a mat near the window."]
    assert len(by_id["3-reasoning"]["conversations"]) == 2
    detail_q = by_id["1-detail"]["conversations"][0]["value"].replace("<image>", "").strip()
    assert detail_q in DETAIL_INSTRUCTIONS
    assert (s.written, s.requests, s.retries, s.failed, s.rejected) == (12, 12, 0, 0, 0)
    assert s.prompt_tokens == 12 * USAGE["prompt_tokens"] and s.completion_tokens == 12 * USAGE["completion_tokens"]
    assert s.cost(1.0, 2.0) == pytest.approx((1200 * 1.0 + 240 * 2.0) / 1e6)
    assert "estimated cost $" in s.report()


def test_429_then_success_honours_retry_after(tmp_path):
    out = tmp_path / "out.jsonl"
    script = {(1, "detail"): [Reply(429, headers={"retry-after": "0.3"}), Reply()]}
    delays, sleep = record_sleeps()
    with StubLLM(script) as stub:
        s = generate_with_llm(anns(2), ["detail", "reasoning"], out, cfg(stub, backoff_max=1.0), progress=False,
                              sleep=sleep)
        assert stub.counts()[(1, "detail")] == 2 and stub.counts()[(2, "detail")] == 1
    assert s.written == 4 and s.retries == 1 and s.failed == 0
    assert delays == [pytest.approx(0.3)]  # the server's Retry-After, not the 0.01 s backoff
    assert "1-detail" in {r["id"] for r in read(out)}


def test_500_gives_up_after_max_attempts_and_rerun_retries(tmp_path, caplog):
    out = tmp_path / "out.jsonl"
    script = {(2, "conversation"): [Reply(500)]}
    delays, sleep = record_sleeps()
    with StubLLM(script) as stub, caplog.at_level(logging.INFO, "vistune.instruct.llm"):
        s = generate_with_llm(anns(3), ["conversation"], out, cfg(stub, max_attempts=3), progress=False, sleep=sleep)
        assert stub.counts()[(2, "conversation")] == 3
    assert (s.written, s.failed, s.retries) == (2, 1, 2)
    assert "image 2 conversation: 500 server error, retry 1/2" in caplog.text
    assert "image 2 conversation: failed" in caplog.text
    # Exponential: the second wait is drawn from twice the step of the first.
    assert 0.005 <= delays[0] <= 0.01 and 0.01 <= delays[1] <= 0.02
    assert {r["id"] for r in read(out)} == {"1-conversation", "3-conversation"}
    with StubLLM() as stub:  # the server recovered: a rerun asks only for what is missing
        s2 = generate_with_llm(anns(3), ["conversation"], out, cfg(stub), progress=False)
        assert stub.requests == [(2, "conversation")]
    assert (s2.skipped, s2.written) == (2, 1)
    assert sorted(r["id"] for r in read(out)) == ["1-conversation", "2-conversation", "3-conversation"]


def test_timeout_is_retried(tmp_path, caplog):
    out = tmp_path / "out.jsonl"
    script = {(1, "reasoning"): [Reply(delay=2.0), Reply()]}
    with StubLLM(script) as stub, caplog.at_level(logging.INFO, "vistune.instruct.llm"):
        t = time.perf_counter()
        s = generate_with_llm(anns(1), ["reasoning"], out, cfg(stub, timeout=0.4), progress=False)
        assert time.perf_counter() - t < 1.8  # it did not wait for the slow reply
        assert stub.counts()[(1, "reasoning")] == 2
    assert s.written == 1 and s.retries == 1
    assert "image 1 reasoning: timeout, retry 1/3" in caplog.text


@pytest.mark.parametrize("reply, reason", [
    (Reply(content="Sure! Here is a lovely conversation about the picture."), "no 'Question:' / 'Answer:' markers"),
    (Reply(content="Question:\nWhat is it?\n===\nQuestion:\nAnd?\n===\nAnswer:\nA cat.\n==="),
     "question 1 is followed by another question"),
    (Reply(content="Question:\nWhere?\n===\nAnswer:\nThe cat is at [0.016, 0.042, 0.312, 0.625].\n==="),
     "answer 1 quotes box coordinates"),
    (Reply(content="I'm sorry, but I can't help with that request."), "refusal"),
    (Reply(content="", refusal="I can't assist with that."), "refusal: I can't assist"),
    (Reply(finish_reason="length"), "truncated"),
])
def test_bad_completions_are_logged_never_written(tmp_path, caplog, reply, reason):
    out = tmp_path / "out.jsonl"
    with StubLLM({(2, "conversation"): [reply]}) as stub, caplog.at_level(logging.WARNING, "vistune.instruct.llm"):
        s = generate_with_llm(anns(2), ["conversation"], out, cfg(stub), progress=False)
        assert stub.counts()[(2, "conversation")] == 1  # a bad completion is not a transport error
    assert (s.written, s.rejected, s.failed) == (1, 1, 0)
    assert f"image 2 conversation: rejected: {reason}" in caplog.text
    assert [r["id"] for r in read(out)] == ["1-conversation"]
    assert s.prompt_tokens == 2 * USAGE["prompt_tokens"]  # rejected completions still cost


def test_client_errors(tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    # A 400 for one request fails that job only.
    with StubLLM({(1, "detail"): [Reply(400)]}) as stub:
        s = generate_with_llm(anns(2), ["detail"], out, cfg(stub), progress=False)
        assert stub.counts()[(1, "detail")] == 1
    assert (s.written, s.failed) == (1, 1)
    # A bad key stops the run at once instead of failing every job.
    with StubLLM({i: [Reply(401)] for i in range(1, 21)}) as stub:
        with pytest.raises(LLMError, match="AuthenticationError.*check --model"):
            generate_with_llm(anns(20), ["detail"], tmp_path / "o2.jsonl", cfg(stub, concurrency=2), progress=False)
        assert len(stub.requests) <= 2
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(LLMError, match="set the environment variable OPENAI_API_KEY"):
        generate_with_llm(anns(1), ["detail"], out, LLMConfig(model="m"), progress=False)


def test_output_log_torn_tail_and_lock(tmp_path, caplog):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "1-detail", "conversations": []}\n{"id": "2-det')
    with caplog.at_level(logging.WARNING):
        log = OutputLog(out)
    assert log.done == {"1-detail"} and log.dropped_tail and "partial last line" in caplog.text
    with pytest.raises(LLMError, match="being written by another process"):
        OutputLog(out)
    log.append({"id": "2-detail"})
    log.close()
    assert read(out) == [{"id": "1-detail", "conversations": []}, {"id": "2-detail"}]
    out.write_text('{"id": "1"}\nnot json\n')
    with pytest.raises(LLMError, match=r"out.jsonl:2: not a record"):
        OutputLog(out)


def test_record_shape_and_seeded_placeholder():
    a = anns(1)[0]
    pairs = [("Q1?", "A1."), ("Q2?", "A2.")]
    sides = {to_record(a, "conversation", pairs, random.Random(s))["conversations"][0]["value"].startswith("<image>")
             for s in range(20)}
    assert sides == {True, False}  # both sides occur
    r1 = to_record(a, "conversation", pairs, random.Random(5))
    assert r1 == to_record(a, "conversation", pairs, random.Random(5))
    assert r1["conversations"][2] == {"from": "human", "value": "Q2?"}  # only the first turn has the image
    assert sum(t["value"].count("<image>") for t in r1["conversations"]) == 1


def test_backoff_delay_bounds():
    rng = random.Random(0)
    for n in range(8):
        step = min(10.0, 0.5 * 2 ** n)
        d = backoff_delay(n, 0.5, 10.0, rng)
        assert step / 2 <= d <= step
    assert backoff_delay(0, 0.5, 10.0, rng, retry_after=4.0) == 4.0
    assert backoff_delay(0, 0.5, 10.0, rng, retry_after=99.0) == 10.0


def _cli(stub: StubLLM, ann_path, out, *extra) -> list[str]:
    return [sys.executable, "-m", "vistune.cli", "data", "instruct", "--annotations", str(ann_path),
            "--out", str(out), "--kinds", "conversation,reasoning", "--backend", "openai",
            "--model", "stub", "--base-url", stub.url, "--api-key-env", "VISTUNE_TEST_NO_KEY",
            "--concurrency", "2", "--backoff", "0.01", *extra]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_resume_after_the_process_is_killed(tmp_path, sig):
    ann_path, out = tmp_path / "ann.json", tmp_path / "out.jsonl"
    save_annotations(anns(8), ann_path)
    expected = {f"{i}-{k}" for i in range(1, 9) for k in ("conversation", "reasoning")}
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    with StubLLM(delay=0.3) as stub:
        # A shell starting jobs in the background hands them SIGINT ignored; the child
        # must get Ctrl-C as a user's terminal delivers it, whoever launched pytest.
        proc = subprocess.Popen(_cli(stub, ann_path, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 60
        while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == (-9 if sig == signal.SIGKILL else 130), err.decode()[-2000:]
        first = read(out)
        assert 3 <= len(first) < len(expected)  # killed mid-run
        stub.reset()
        stub.delay = 0.0
        done = subprocess.run(_cli(stub, ann_path, out), env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        # The rerun asked only for what was missing, each once.
        assert sorted(f"{i}-{k}" for i, k in stub.requests) == sorted(expected - {r["id"] for r in first})
    final = read(out)
    ids = [r["id"] for r in final]
    assert len(ids) == len(set(ids)) and set(ids) == expected  # nothing lost, nothing twice
    assert final[: len(first)] == first  # what was written before the kill is kept as is
    assert "estimated cost" in done.stdout and f"{len(first)} already done" in done.stdout


def test_cli_in_process_and_bad_input(tmp_path, capsys):
    ann_path, out = tmp_path / "ann.json", tmp_path / "out.jsonl"
    save_annotations(anns(2), ann_path)
    with StubLLM() as stub:
        rc = main(["data", "instruct", "--annotations", str(ann_path), "--out", str(out), "--kinds", "detail",
                   "--model", "stub", "--base-url", stub.url, "--api-key-env", "VISTUNE_TEST_NO_KEY",
                   "--price-in", "2", "--price-out", "8"])
    assert rc == 0 and len(read(out)) == 2
    assert "estimated cost $0.0007 (at $2.0/M in, $8.0/M out)" in capsys.readouterr().out  # 200*2e-6 + 40*8e-6
    assert main(["data", "instruct", "--annotations", str(ann_path), "--out", str(out), "--kinds", "poem",
                 "--model", "m"]) == 2
    assert "unknown kind(s) 'poem'" in capsys.readouterr().err
    assert main(["data", "instruct", "--annotations", str(tmp_path / "nope.json"), "--out", str(out),
                 "--model", "m"]) == 2
    assert "nope.json" in capsys.readouterr().err
    assert main(["data", "instruct", "--annotations", str(ann_path), "--out", str(tmp_path / "o.json"),
                 "--model", "m", "--base-url", "http://127.0.0.1:9/v1"]) == 2
    assert "o.json: the output is appended one record per line: name it .jsonl" in capsys.readouterr().err


def test_cli_rules_backend_is_called_lazily(tmp_path, capsys, monkeypatch):
    import types

    ann_path, out = tmp_path / "ann.json", tmp_path / "out.jsonl"
    save_annotations(anns(3), ann_path)
    argv = ["data", "instruct", "--annotations", str(ann_path), "--out", str(out), "--backend", "rules",
            "--kinds", "detail,reasoning", "--seed", "7", "--limit", "2"]
    monkeypatch.setitem(sys.modules, "vistune.instruct.rules", None)  # as if rules.py were not there
    assert main(argv) == 1
    assert "rules backend is not available" in capsys.readouterr().err
    calls = []

    def generate_records(annotations, kinds, seed):
        calls.append(([a.id for a in annotations], kinds, seed))
        return [{"id": f"{a.id}-{k}", "image": a.file, "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]}
            for a in annotations for k in kinds]

    fake = types.ModuleType("vistune.instruct.rules")
    fake.generate_records = generate_records
    monkeypatch.setitem(sys.modules, "vistune.instruct.rules", fake)
    assert main(argv) == 0
    assert calls == [(["1", "2"], ["detail", "reasoning"], 7)]
    assert [r["id"] for r in read(out)] == ["1-detail", "1-reasoning", "2-detail", "2-reasoning"]


def test_images_without_captions_are_skipped_and_counted(tmp_path, caplog):
    out = tmp_path / "out.jsonl"
    images = anns(3)
    images[1].captions = ["  "]  # nothing to build a prompt on: an LLM would invent the picture
    with StubLLM() as stub, caplog.at_level(logging.WARNING, "vistune.instruct.llm"):
        s = generate_with_llm(images, ["conversation"], out, cfg(stub), progress=False)
        assert sorted(stub.requests) == [(1, "conversation"), (3, "conversation")]
    assert (s.jobs, s.written, s.failed, s.no_captions) == (2, 2, 0, 1)
    assert "1 image(s) without captions skipped" in s.report()
    assert "1 image(s) have no caption and were skipped (first: 2)" in caplog.text


def test_a_detail_reply_that_describes_nothing_is_rejected(tmp_path, caplog):
    out = tmp_path / "out.jsonl"
    chatty = Reply(content="Sure! Here are some thoughts about the picture. It has shapes.")
    with StubLLM({(2, "detail"): [chatty]}) as stub, caplog.at_level(logging.WARNING, "vistune.instruct.llm"):
        s = generate_with_llm(anns(2), ["detail"], out, cfg(stub), progress=False)
    assert (s.written, s.rejected) == (1, 1)  # image 1's reply names its cat
    assert "image 2 detail: rejected: not a description: names 0 of the image's 1 annotated" in caplog.text
    assert [r["id"] for r in read(out)] == ["1-detail"]


def test_a_200_with_broken_json_is_retried(tmp_path, caplog):
    out = tmp_path / "out.jsonl"
    script = {(1, "reasoning"): [Reply(body=b'{"id": "chatcmpl-1", "choices": [{"ind'), Reply()]}
    delays, sleep = record_sleeps()
    with StubLLM(script) as stub, caplog.at_level(logging.INFO, "vistune.instruct.llm"):
        s = generate_with_llm(anns(1), ["reasoning"], out, cfg(stub), progress=False, sleep=sleep)
        assert stub.counts()[(1, "reasoning")] == 2
    assert (s.written, s.failed, s.retries) == (1, 0, 1)
    assert "image 1 reasoning: broken JSON in a 200 response, retry 1/3" in caplog.text


def test_an_unreachable_server_stops_the_run_early(tmp_path):
    import socket

    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    delays, sleep = record_sleeps()
    config = LLMConfig(model="m", base_url=url, api_key_env="VISTUNE_TEST_NO_KEY", concurrency=2, max_attempts=6,
                       backoff_base=0.01, backoff_max=0.05, timeout=5.0, max_connection_failures=5)
    with pytest.raises(LLMError, match=rf"cannot reach {url}: 5 requests in a row failed to connect.*is the server up"):
        generate_with_llm(anns(20), ["conversation"], tmp_path / "out.jsonl", config, progress=False, sleep=sleep)
    assert len(delays) <= 5  # not 20 jobs x 6 attempts


def test_each_job_sends_its_own_seed_whatever_the_order(tmp_path):
    """A server that honours OpenAI's `seed` then answers a rerun the same, in any order of jobs."""
    def seeds(concurrency: int, seed: int, script=None) -> dict:
        with StubLLM(script) as stub:
            generate_with_llm(anns(4), KINDS, tmp_path / f"{concurrency}-{seed}-{bool(script)}.jsonl",
                              cfg(stub, concurrency=concurrency, seed=seed), progress=False, sleep=record_sleeps()[1])
        return stub.seeds

    first = seeds(1, 0)
    assert all(len(v) == 1 and isinstance(v[0], int) for v in first.values())
    assert len({v[0] for v in first.values()}) == len(first) == 12  # each job its own
    # retries of a job send its seed again; other concurrency and order: the same seeds
    again = seeds(4, 0, {(2, "detail"): [Reply(status=500), Reply()]})
    assert again[(2, "detail")] == first[(2, "detail")] * 2
    assert {k: v[:1] for k, v in again.items()} == first
    other = seeds(1, 1)
    assert other.keys() == first.keys() and all(other[k] != v for k, v in first.items())  # the run's seed moves them all
