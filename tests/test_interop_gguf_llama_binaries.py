"""GGUF export run by llama.cpp's own binaries, as docs/interop.md tells users to run it:
``llama-mtmd-cli`` and ``llama-server --mmproj``, both with ``--jinja``, so that the chat template
in the file is rendered by llama.cpp's C++ Jinja engine (not Python's Jinja2, which the parity
tests in test_interop_gguf_llama_cpp.py use). Checked: the server renders every exportable
template as vistune does (its /apply-template); the CLI renders vistune's prompt and prints
vistune's engine's greedy answer; the server counts vistune's prompt tokens and returns its greedy
token ids and bytes (logprobs).

Opt-in: runs where the binaries are found, from ``LLAMA_MTMD_CLI`` / ``LLAMA_SERVER`` (paths to
them) or on PATH, and skips otherwise (CI has no llama.cpp binaries; see docs/interop.md).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers.convert_slow_tokenizer import bytes_to_unicode

pytest.importorskip("gguf", reason="GGUF export needs the `gguf` package (the test extra installs it)")

from conftest import make_model, noise_image, solid_image  # noqa: E402
from live_server import data_url, free_port  # noqa: E402
from real_weights import FOLLOW_UP, REFERENCE_QUESTIONS, smollm2_dir  # noqa: E402,F401
from train_fixtures import tiny_config, tiny_data  # noqa: E402,F401
from vistune.infer.engine import Engine, GenerationConfig, Prompt  # noqa: E402
from vistune.interop import export_checkpoint  # noqa: E402
from vistune.interop.chat_template import LLAMA_CPP_MARKER  # noqa: E402
from vistune.interop.gguf import export_gguf  # noqa: E402
from vistune.model.build import build_vlm  # noqa: E402
from vistune.model.checkpoint import LoadedModel, load  # noqa: E402
from vistune.model.tiny import tiny_vision_config  # noqa: E402
from vistune.text.templates import IMAGE_PLACEHOLDER, TEMPLATES, render  # noqa: E402
from vistune.train import run  # noqa: E402

BINARIES = {"llama-mtmd-cli": "LLAMA_MTMD_CLI", "llama-server": "LLAMA_SERVER"}
THREADS = "2"
ANSWER_MARK = "@@vistune-answer@@"  # llama-mtmd-cli prints $MTMD_TEST_RESPONSE_MARKER before its answer
GGUF_TEMPLATES = [name for name, t in TEMPLATES.items() if not t.image_format]  # what export_gguf accepts


def binary(name: str) -> str:
    """The binary's path: $LLAMA_MTMD_CLI / $LLAMA_SERVER, else PATH; skips when neither has it."""
    env = BINARIES[name]
    path = os.environ.get(env)
    if path:
        if not (Path(path).is_file() and os.access(path, os.X_OK)):
            pytest.fail(f"{env}={path} is not an executable file")
        return path
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"opt-in: {name} not found (set {env} to llama.cpp's {name}, or put it on PATH)")
    return found


@pytest.fixture(scope="session")  # session: checked before any session fixture builds a model
def mtmd_cli() -> str:
    return binary("llama-mtmd-cli")


@pytest.fixture(scope="session")
def server_bin() -> str:
    return binary("llama-server")


# -- vistune's side ---------------------------------------------------------------------------------
def greedy(engine: Engine, prompt: Prompt, max_new: int) -> tuple[list[int], bool]:
    """vistune's greedy new ids, and whether they end with an end-of-generation token (llama.cpp
    stops on the same token; it returns it in the server's logprobs, and prints it nowhere)."""
    run_ = engine.start([prompt], GenerationConfig(max_new_tokens=max_new))
    for _ in run_:
        pass
    tokens = list(run_.rows[0].tokens)
    stop_ids, _ = engine.stop_strings(GenerationConfig())
    return tokens, bool(tokens) and tokens[-1] in stop_ids


def decode(engine: Engine, ids: list[int]) -> str:
    return engine.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# -- llama.cpp's side -------------------------------------------------------------------------------
def mtmd_cli_answer(cli: str, files, image: Path, question: str, n: int, want: str | None, stops: bool = False,
                    system: str | None = None, tries: int = 10) -> tuple[str, str]:
    """The documented command (one question, the image first, greedy, ``n`` tokens at most; ``-sys``
    if ``system``): the prompt it rendered (its debug log, ``-v``) and its answer, which should be
    ``want`` (None: not checked). The CLI prints through llama.cpp's asynchronous log, which it does
    not flush at exit (common/log.cpp, as of 0c1e570), so on a busy machine the end of its output is
    often missing: a cut-off run must be a prefix of ``want`` and is run again. After the answer the
    CLI prints a newline when it stopped on an end-of-generation token (``stops``), then its closing
    two newlines: their presence says the output is whole."""
    cmd = [cli, "-m", str(files.llm), "--mmproj", str(files.mmproj), "--image", str(image),
           "-p", LLAMA_CPP_MARKER + question, "--temp", "0", "-n", str(n), "--jinja", "-t", THREADS, "-v"]
    if system is not None:
        cmd += ["-sys", system]
    end = ("\n" if stops else "") + "\n\n"
    for _ in range(tries):
        done = subprocess.run(cmd, capture_output=True, timeout=120,
                              env={**os.environ, "MTMD_TEST_RESPONSE_MARKER": ANSWER_MARK})
        # the CLI writes each token's bytes as they come: decoded as a whole, as the tokenizer decodes
        stdout, stderr = done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
        assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{stderr[-3000:]}"
        # each message it evaluates (the system text, then the question) is logged, then marked on stdout
        prompts = re.findall(r"formatted_chat\.prompt: (.*?)\n(?:\d+\.\d+\.\d+\.\d+ [DIWE] |\Z)", stderr, re.S)
        _, marked, out = stdout.rpartition(ANSWER_MARK + "\n\n")  # the marker, then the prompt's closing newline
        out = out if marked else ""
        if out.endswith(end):
            assert len(prompts) == 1 + (system is not None), f"llama-mtmd-cli's log:\n{stderr[-3000:]}"
            return "".join(prompts), out[: -len(end)]
        assert want is None or (want + end).startswith(out), f"llama-mtmd-cli answered {out!r}, vistune {want!r}"
    raise AssertionError(f"llama-mtmd-cli's output was cut off {tries} times; the last:\n{stdout[-2000:]}")


def vistune_text(engine: Engine, question: str, marker: str, system: str | None = None) -> str:
    """vistune's prompt for one image and ``question`` (the image first), ``marker`` for the image."""
    tok = engine.tokenizer
    return render(engine.template, [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}"}], system=system,
                  add_generation_prompt=True, eos=tok.eos_token, bos=tok.bos_token).text.replace(IMAGE_PLACEHOLDER,
                                                                                                 marker)


class LlamaServer:
    """``llama-server -m LLM --mmproj MMPROJ --jinja`` on a free loopback port, up until /health
    answers 200; stopped (then killed if it must be) on exit."""

    def __init__(self, binary_path: str, files, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [binary_path, "-m", str(files.llm), "--jinja", "--host", "127.0.0.1", "--port", str(self.port),
                    "-t", THREADS, "-np", "1"]
        if files.mmproj is not None:
            self.cmd[3:3] = ["--mmproj", str(files.mmproj)]
        self.log_path = log
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "LlamaServer":
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or 503 while the model loads
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"llama-server did not become healthy:\n{self.log_tail()}")
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self.log.close()

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST {path}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def chat(self, messages: list[dict], n: int) -> dict:
        """A greedy chat completion of ``n`` tokens at most, with its tokens' ids and bytes (logprobs)."""
        body = {"messages": messages, "temperature": 0, "max_tokens": n, "logprobs": True, "cache_prompt": False}
        reply = self.post("/v1/chat/completions", body)
        choice = reply["choices"][0]
        return {"text": choice["message"]["content"], "finish": choice["finish_reason"],
                "prompt_tokens": reply["usage"]["prompt_tokens"],
                "entries": [(t["id"], bytes(t["bytes"])) for t in choice["logprobs"]["content"]]}


def oai_messages(prompt: Prompt) -> list[dict]:
    """A vistune prompt as an OpenAI chat request: the images as base64 data-URL parts first."""
    out = [] if prompt.system is None else [{"role": "system", "content": prompt.system}]
    for i, t in enumerate(prompt.turns):
        role = "user" if t["from"] == "human" else "assistant"
        if i == 0 and prompt.images:
            parts = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in prompt.images]
            out.append({"role": role, "content": [*parts, {"type": "text", "text": t["value"]}]})
        else:
            out.append({"role": role, "content": t["value"]})
    return out


def held_back(text: bytes) -> bool:
    """Whether llama-server holds ``text`` back as ending inside a UTF-8 character (its
    validate_utf8, tools/server/server-common.cpp: a multi-byte lead among the last 4 bytes with
    too few bytes after it); the tokens that leave it so get no logprobs entry of their own."""
    for i in range(1, min(4, len(text)) + 1):
        c = text[-i]
        need = 2 if c & 0xE0 == 0xC0 else 3 if c & 0xF0 == 0xE0 else 4 if c & 0xF8 == 0xF0 else 0
        if i < need:
            return True
    return False


def logprobs_entries(engine: Engine, ids: list[int], eog: bool) -> list[tuple[int, bytes]]:
    """The (id, bytes) entries of the server's logprobs for a greedy answer ``ids``: a token that
    leaves a character unfinished has none, the next one carries its bytes; an end-of-generation
    token has one, with no text. (Byte-level BPE vocabularies.)"""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    text, sent, out = b"", 0, []
    for i, piece in zip(ids, engine.tokenizer.convert_ids_to_tokens(ids[:-1] if eog else ids)):
        text += bytes(byte_of[c] for c in piece)
        if not held_back(text):
            out.append((i, text[sent:]))
            sent = len(text)
    return out + [(ids[-1], b"")] if eog else out


def assert_server_answers_as_vistune(server: LlamaServer, engine: Engine, prompt: Prompt, max_new: int) -> dict:
    """The server's prompt has as many tokens as vistune's; its greedy tokens (ids and bytes, from
    its logprobs) and text equal vistune's, and it stops where vistune stops on an end-of-generation token."""
    want, eog = greedy(engine, prompt, max_new)
    # a stop string ends vistune's answer early: ask llama.cpp for as many tokens
    got = server.chat(oai_messages(prompt), max_new if eog else len(want))
    assert got["prompt_tokens"] == len(engine.encode(prompt).input_ids)  # image tokens included
    assert got["entries"] == logprobs_entries(engine, want, eog), decode(engine, want)
    assert got["text"] == b"".join(b for _, b in got["entries"]).decode(errors="replace")
    assert got["finish"] == ("stop" if eog else "length")
    return got


# -- the chat template, rendered by llama.cpp's C++ Jinja engine ----------------------------------------
@pytest.mark.parametrize("template", GGUF_TEMPLATES)
def test_server_renders_every_exportable_template_as_vistune(server_bin, tokenizer, tmp_path, template):
    """llama-server's /apply-template (the prompt it would run: the file's template rendered by
    llama.cpp's Jinja, its own random image marker, a leading BOS dropped when the vocabulary adds
    one) equals vistune's rendering with the marker for ``<image>``: base64 image parts and string
    content, a system message, and a second turn."""
    model, tok = make_model(tokenizer, vision="siglip", template=template, seed=1)
    files = export_gguf(model, tok, tmp_path / "gguf", outtype="f32")
    q, system = "what color is the circle", "Answer briefly."
    multi = TEMPLATES[template].single_turn is False
    image = {"type": "image_url", "image_url": {"url": data_url(noise_image(0))}}
    with LlamaServer(server_bin, files, tmp_path / "server.log") as server:
        marker = server.get("/props")["media_marker"]
        assert marker != LLAMA_CPP_MARKER  # the server's own marker, which the template must also handle
        for sys_text in (None, system):
            turns = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{q}"}]
            if multi:
                turns += [{"from": "gpt", "value": "red."}, {"from": "human", "value": "and the square?"}]
            want = render(template, turns, system=sys_text, add_generation_prompt=True, eos=tok.eos_token,
                          bos=tok.bos_token).text.replace(IMAGE_PLACEHOLDER, marker)
            head = [] if sys_text is None else [{"role": "system", "content": sys_text}]
            tail = [{"role": "assistant", "content": "red."}, {"role": "user", "content": "and the square?"}] \
                if multi else []
            for first in ([image, {"type": "text", "text": q}], marker + q):
                messages = [*head, {"role": "user", "content": first}, *tail]
                got = server.post("/apply-template", {"messages": messages})["prompt"]
                assert got == want, f"{template}, system={sys_text!r}, content={type(first).__name__}"


# -- a model trained by the tiny recipe (v0 template, SigLIP tower) --------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):  # noqa: F811
    """The tiny recipe's stage-2 model of the llama.cpp parity tests, its f32 export, and eight
    image questions of the tiny data set (32 px: the tower's size) with their image files."""
    out = tmp_path_factory.mktemp("gguf_binaries")
    r = run(tiny_config(tiny_data, out / "run", {"model.vision": tiny_vision_config("siglip"), "train.epochs": 12,
                                                 "train.lr": 2e-3}))
    files = export_checkpoint(r.model_dir, out / "gguf", format="gguf", outtype="f32")
    rows = [json.loads(line) for line in open(tiny_data["instruct"])]
    rows = [r for r in rows if "image" in r][:8]
    questions = [(tiny_data["images"] / r["image"], r["conversations"][0]["value"].replace("<image>\n", ""))
                 for r in rows]
    return Engine(load(r.model_dir)), files, questions


def test_mtmd_cli_answers_with_vistunes_greedy_text(mtmd_cli, trained):
    """The documented `llama-mtmd-cli ... --image IMG -p '<__media__>Q' --temp 0 -n N --jinja` prints
    vistune's greedy answer for four image questions (v0 does not stop on an end token: `-n` bounds it)."""
    engine, files, questions = trained
    answers = []
    for path, q in questions[:4]:
        want, eog = greedy(engine, Prompt.ask(q, [Image.open(path).convert("RGB")]), 12)
        assert not eog  # v0 stops on the text ###, which the CLI does not know
        prompt, answer = mtmd_cli_answer(mtmd_cli, files, path, q, len(want), decode(engine, want), eog)
        assert prompt == vistune_text(engine, q, LLAMA_CPP_MARKER)
        assert answer == decode(engine, want), q
        answers.append(answer)
    assert sum("The" in a or "It" in a for a in answers) >= 2  # the model learned to answer


def test_server_answers_with_vistunes_greedy_tokens(server_bin, trained, tmp_path):
    """llama-server --mmproj, OpenAI chat requests with a base64 image, temperature 0: vistune's
    greedy token ids (the response's logprobs), for eight questions and a two-turn conversation with
    a system text; with `"stop": ["###"]` (v0's stop, as the docs say) the answer ends where vistune's does."""
    engine, files, questions = trained
    with LlamaServer(server_bin, files, tmp_path / "server.log") as server:
        prompts = [Prompt.ask(q, [Image.open(path).convert("RGB")]) for path, q in questions]
        for p in prompts:
            assert_server_answers_as_vistune(server, engine, p, 12)
        first = Prompt(prompts[0].turns, prompts[0].images, system="Answer about the image.")
        reply = engine.start([first], GenerationConfig(max_new_tokens=12))
        for _ in reply:
            pass
        conv = Prompt([*first.turns, {"from": "gpt", "value": reply.completions[0].text},
                       {"from": "human", "value": "What shape is it?"}], first.images, first.system)
        assert_server_answers_as_vistune(server, engine, conv, 12)
        stopped = server.post("/v1/chat/completions", {"messages": oai_messages(prompts[0]), "temperature": 0,
                                                      "max_tokens": 24, "stop": ["###"]})
        done = engine.start([prompts[0]], GenerationConfig(max_new_tokens=24))
        for _ in done:
            pass
        text = stopped["choices"][0]["message"]["content"]
        assert "###" not in text and text.strip() == done.completions[0].text


# -- a random model whose answers depend on the image (SigLIP, Qwen2, linear projector, ChatML) ------------
@pytest.fixture(scope="module")
def chatml_model(tokenizer, tmp_path_factory):
    model, tok = make_model(tokenizer, vision="siglip", text="qwen2", projector="linear", template="chatml", seed=3)
    files = export_gguf(model, tok, tmp_path_factory.mktemp("gguf_chatml"), outtype="f32")
    return Engine(LoadedModel(model, tok)), files


def test_both_binaries_follow_the_image_as_vistune_does(mtmd_cli, server_bin, chatml_model, tmp_path):
    """A red and a blue square, one question: the answers differ between the images (so the image
    reached the model), and both binaries give vistune's greedy answer for each."""
    engine, files = chatml_model
    q, n = "what color is the square", 8
    wants = []
    with LlamaServer(server_bin, files, tmp_path / "server.log") as server:
        for color in ((255, 0, 0), (0, 0, 255)):
            image = solid_image(color, (32, 32))
            path = tmp_path / f"square{len(wants)}.png"
            image.save(path)
            prompt = Prompt.ask(q, [image])
            want, eog = greedy(engine, prompt, n)
            wants.append(want)
            text = decode(engine, want[:-1] if eog else want)
            assert mtmd_cli_answer(mtmd_cli, files, path, q, len(want), text, eog) == \
                (vistune_text(engine, q, LLAMA_CPP_MARKER), text)
            assert_server_answers_as_vistune(server, engine, prompt, n)
    assert wants[0] != wants[1]


def test_mtmd_cli_system_text_gets_one_newline_too_many_with_chatml(mtmd_cli, chatml_model, tmp_path):
    """llama.cpp's quirk that docs/interop.md warns of: `-sys` formats the system message alone,
    then the question with a newline in front, because the system block ends with one
    (common_chat_format_single), so ChatML's prompt gets a blank line that vistune's has not. The
    day llama.cpp stops doing so, this fails, and the note in the docs goes."""
    engine, files = chatml_model
    path = tmp_path / "red.png"
    solid_image((255, 0, 0), (32, 32)).save(path)
    q, system = "what color is the square", "Be brief."
    prompt, _ = mtmd_cli_answer(mtmd_cli, files, path, q, 1, None, system=system)
    want = vistune_text(engine, q, LLAMA_CPP_MARKER, system)
    block = f"<|im_start|>system\n{system}<|im_end|>\n"
    assert want.startswith(block) and prompt == block + "\n" + want[len(block):]


# -- real weights: SmolLM2-135M-Instruct, text only --------------------------------------------------------
def test_server_smollm2_text_only_same_greedy_tokens(server_bin, smollm2_dir, tmp_path):  # noqa: F811
    """SmolLM2 behind a tiny CLIP tower, exported at f32, served with its mmproj: text-only chat
    requests get vistune's greedy tokens and stop where vistune stops (Paris, Jupiter with a system
    text, then Berlin in a second turn)."""
    torch.manual_seed(0)
    model, tok = build_vlm(tiny_vision_config("clip"), smollm2_dir, template="chatml")
    engine = Engine(LoadedModel(model.eval(), tok))
    files = export_gguf(model, tok, tmp_path / "gguf", outtype="f32")
    (q1, sys1, n1), (q2, sys2, n2) = REFERENCE_QUESTIONS[:2]
    with LlamaServer(server_bin, files, tmp_path / "server.log") as server:
        a1 = assert_server_answers_as_vistune(server, engine, Prompt.ask(q1, system=sys1), n1)
        a2 = assert_server_answers_as_vistune(server, engine, Prompt.ask(q2, system=sys2), n2)
        follow = Prompt([{"from": "human", "value": q1}, {"from": "gpt", "value": a1["text"]},
                         {"from": "human", "value": FOLLOW_UP[0]}])
        a3 = assert_server_answers_as_vistune(server, engine, follow, FOLLOW_UP[1])
    assert "Paris" in a1["text"] and "Jupiter" in a2["text"] and "Berlin" in a3["text"]

