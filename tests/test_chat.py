"""Chat sessions (image features reused across turns) and `vistune chat` driven through stdin."""
from __future__ import annotations

import io
import sys

import pytest
import torch
from conftest import make_model, noise_image

from vistune.cli import main
from vistune.infer.chat import Chat
from vistune.infer.engine import Engine, GenerationConfig, Prompt
from vistune.model.checkpoint import LoadedModel, save_model
from tolerances import assert_reordered

CFG = GenerationConfig(max_new_tokens=10)


@pytest.fixture
def engine(tokenizer):
    return Engine(LoadedModel(*make_model(tokenizer)))


def count_vision_calls(engine) -> list:
    calls: list = []
    orig = engine.model.encode_images
    engine.model.encode_images = lambda px: (calls.append(px.shape[0]), orig(px))[1]
    return calls


def test_session_reuses_image_features_and_matches_the_engine(engine):
    calls = count_vision_calls(engine)
    img, img2 = noise_image(1), noise_image(2)
    chat = Chat(engine, config=CFG)
    chat.attach(img)
    a1 = chat.ask("what is in the image?")
    a2 = chat.ask("and what color is it?")
    chat.attach(img2)
    a3 = chat.ask("compare the two")
    assert calls == [1, 1]  # one vision pass per image, none for the later turns
    assert len(chat.turns) == 6 and chat.turns[4]["value"].startswith("<image>\n")
    # Exactly what the engine answers for the whole conversation given as PIL images.
    turns = [{"from": "human", "value": "<image>\nwhat is in the image?"}, {"from": "gpt", "value": a1},
             {"from": "human", "value": "and what color is it?"}, {"from": "gpt", "value": a2},
             {"from": "human", "value": "<image>\ncompare the two"}]
    engine.image_cache.clear()
    assert engine.generate([Prompt(turns, [img, img2])], CFG)[0].text == a3
    chat.reset()
    assert chat.turns == [] and chat.image_embeds == [] and chat.pending == []


def prefill_lengths(engine) -> list[int]:
    """Tokens of each language-model call that prefills (more than one token)."""
    seen: list[int] = []

    def record(_module, _args, kw, _out):
        x = kw.get("inputs_embeds") if kw.get("inputs_embeds") is not None else kw["input_ids"]
        if x.shape[1] > 1:
            seen.append(x.shape[1])

    engine.lm.register_forward_hook(record, with_kwargs=True)
    return seen


def test_a_later_turn_prefills_only_its_new_message(tokenizer):
    # two copies of the same weights, so that each engine's calls are recorded apart
    engine, plain = (Engine(LoadedModel(*make_model(tokenizer))) for _ in range(2))
    plain.reuse_turns, plain.template_prefix = False, None  # the reference: every prompt prefilled whole
    seen, seen_plain = prefill_lengths(engine), prefill_lengths(plain)
    chats = [Chat(e, config=CFG) for e in (engine, plain)]
    img = noise_image(4)
    previous = 0
    for i, text in enumerate(["what is in the image?", "and what color is it?", "where is it?"]):
        replies = []
        for chat in chats:
            if i == 0:
                chat.attach(img)
            ids = engine.encode(chat._prompt(text)[0]).input_ids
            replies.append(chat.ask(text))
        assert replies[0] == replies[1]
        assert seen_plain[-1] == len(ids)
        if i:  # the whole previous prompt (image included) comes from the stored turn
            assert seen[-1] <= len(ids) - previous
        previous = len(ids)
    assert engine.turns.last is not None and engine.turns.last.images is not None


def test_interleaved_conversations_each_reuse_their_previous_turn(tokenizer):
    """Two people taking turns (a web page, a server): each conversation keeps its own stored turn."""
    engine, plain = (Engine(LoadedModel(*make_model(tokenizer))) for _ in range(2))
    plain.reuse_turns, plain.template_prefix = False, None
    seen = prefill_lengths(engine)
    chats = {who: (Chat(engine, config=CFG), Chat(plain, config=CFG)) for who in ("ann", "bob")}
    for (mine, ref), img in zip(chats.values(), (noise_image(7), noise_image(8))):
        mine.attach(img)
        ref.attach(img)
    previous = {}
    for i in range(3):
        for who, (mine, ref) in chats.items():
            text = f"{who} asks question {i}"
            ids = engine.encode(mine._prompt(text)[0]).input_ids
            assert mine.ask(text) == ref.ask(text)
            if i:  # the other conversation's turn in between did not evict this one's
                assert seen[-1] <= len(ids) - previous[who]
            previous[who] = len(ids)
    assert len(engine.turns) == 2  # one per conversation: each later turn replaced its earlier one


def test_the_last_turn_serves_only_what_matches(tokenizer):
    # two copies of the same weights, so that each engine's calls are recorded apart
    engine, plain = (Engine(LoadedModel(*make_model(tokenizer))) for _ in range(2))
    plain.reuse_turns, plain.template_prefix = False, None
    seen = prefill_lengths(engine)
    engine.generate([Prompt.ask("what is in the image?", [noise_image(5)])], CFG)
    for image, reused_image in ((noise_image(6), False), (noise_image(5), True)):
        prompt = Prompt.ask("what is in the image? tell me", [image])
        ids = engine.encode(prompt).input_ids
        first_image = ids.index(engine.image_token_id)
        got, ref = engine.generate([prompt], CFG), plain.generate([prompt], CFG)
        assert got == ref
        if reused_image:  # the same picture in the same place: its tokens are not computed again
            assert seen[-1] <= len(ids) - first_image - engine.num_image_tokens
        else:  # another picture: everything from it on is computed
            assert seen[-1] >= len(ids) - first_image
        engine.generate([Prompt.ask("what is in the image?", [noise_image(5)])], CFG)  # the stored turn again
    # The stored keys and values are those a full prefill computes.
    last = engine.turns.last
    with torch.inference_mode():
        out = engine.lm(input_ids=torch.tensor([last.ids[:1]]), use_cache=True)
    # The first layer's keys: one 64-term projection, computed alone or within a longer prefill.
    assert_reordered(out.past_key_values.layers[0].keys[0, :, 0], last.kv[0][0][0, :, 0], terms=64, depth=1)


def test_session_stream_records_the_reply(engine):
    chat = Chat(engine, config=CFG)
    pieces = list(chat.stream("hello there"))
    assert chat.turns[-1] == {"from": "gpt", "value": "".join(pieces)}


def test_cli_chat_through_stdin(tokenizer, tmp_path, monkeypatch, capsys):
    model, tok = make_model(tokenizer)
    path = save_model(model, tok, tmp_path / "m")
    img = noise_image(3)
    img.save(tmp_path / "cat.png")
    script = "\n".join([f"/image {tmp_path / 'cat.png'}", "what is it?", "and the color?", "/image missing.png",
                        "/reset", "what is it?", "/bogus", "/quit", "never read"]) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    argv = ["chat", "--model", str(path), "--max-new-tokens", "8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    replies = [ln[len("ASSISTANT: "):] for ln in out.splitlines() if ln.startswith("ASSISTANT: ")]
    assert len(replies) == 3
    eng = Engine(LoadedModel(model, tok))
    cfg = GenerationConfig(max_new_tokens=8)
    first = eng.generate([Prompt.ask("what is it?", [img])], cfg)[0].text
    second = eng.generate([Prompt([{"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": first},
                                   {"from": "human", "value": "and the color?"}], [img])], cfg)[0].text
    after_reset = eng.generate([Prompt.ask("what is it?")], cfg)[0].text
    assert replies == [first, second, after_reset]
    assert "[attached" in out and "[conversation cleared" in out and "[unknown command]" in out
    assert "missing.png" in out.split("[error]")[1].splitlines()[0]  # names the file it could not open


def test_cli_chat_stop_strings(tokenizer, tmp_path, monkeypatch, capsys):
    model, tok = make_model(tokenizer)
    path = save_model(model, tok, tmp_path / "m")
    eng = Engine(LoadedModel(model, tok))
    full = eng.generate([Prompt.ask("tell me a story")], GenerationConfig(max_new_tokens=16))[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]  # a piece from the middle of the reply
    assert stop.strip() and full.index(stop) > 0 and "\n" not in full
    monkeypatch.setattr(sys, "stdin", io.StringIO("tell me a story\n/quit\n"))
    assert main(["chat", "--model", str(path), "--max-new-tokens", "16", "--stop", "no such text",
                 "--stop", stop]) == 0
    replies = [ln[len("ASSISTANT: "):] for ln in capsys.readouterr().out.splitlines() if ln.startswith("ASSISTANT: ")]
    assert replies == [full[:full.index(stop)].strip()]


def test_a_long_chat_drops_its_oldest_turns_but_keeps_the_image(engine):
    engine.max_context = 200  # a few exchanges of ten new tokens each fill it
    chat = Chat(engine, config=CFG)
    chat.attach(noise_image(1))
    for i in range(12):
        chat.ask(f"what color is the {i} object on the left side?")
    assert chat.dropped_turns > 0
    assert chat.turns[0]["value"].startswith("<image>\n")  # the exchange holding the image stays
    assert len(chat.image_embeds) == 1
    dropped = chat.dropped_turns
    chat.ask("and the next one?")  # still goes on, dropping what it must
    assert chat.dropped_turns >= dropped and chat.turns[-2]["value"] == "and the next one?"


def cli_chat(tokenizer, tmp_path, monkeypatch, script: str, max_context: int | None = None) -> str:
    from vistune.cli import infer as cli_infer

    model, tok = make_model(tokenizer)
    eng = Engine(LoadedModel(model, tok))
    if max_context:
        eng.max_context = max_context
    monkeypatch.setattr(cli_infer, "load_engine", lambda args: eng)
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main(["chat", "--model", str(tmp_path), "--max-new-tokens", "8"]) == 0
    return eng


def test_cli_chat_ctrl_c_stops_the_reply_and_keeps_the_chat(tokenizer, tmp_path, monkeypatch, capsys):
    real = Engine.stream
    calls = []

    def interrupted(self, prompt, config=None):
        calls.append(len(prompt.input_ids))
        for i, piece in enumerate(real(self, prompt, config)):
            if len(calls) == 1 and i == 2:
                raise KeyboardInterrupt  # Ctrl-C while the first reply streams
            yield piece

    monkeypatch.setattr(Engine, "stream", interrupted)
    cli_chat(tokenizer, tmp_path, monkeypatch, "tell me a story\nand then?\n/quit\n")
    out = capsys.readouterr().out
    replies = [ln for ln in out.splitlines() if ln.startswith("ASSISTANT: ")]
    assert len(replies) == 2 and replies[0].endswith(" [stopped]") and "[stopped]" not in replies[1]
    assert calls[1] > calls[0]  # the second message was sent with the first, stopped exchange


def test_cli_chat_says_once_that_it_drops_turns_and_reset_names_the_image(tokenizer, tmp_path, monkeypatch, capsys):
    img = noise_image(3)
    img.save(tmp_path / "cat.png")
    script = "\n".join([f"/image {tmp_path / 'cat.png'}"] + [f"what color is the {i} object on the left?"
                                                              for i in range(12)] + ["/reset", "/quit"]) + "\n"
    cli_chat(tokenizer, tmp_path, monkeypatch, script, max_context=200)
    out = capsys.readouterr().out
    assert "[error]" not in out
    assert out.count("outgrew the model's context") == 1 and "/reset" in out.split("outgrew")[1].splitlines()[0]
    assert "[conversation cleared; the image is dropped too" in out


def test_cli_chat_ctrl_c_while_an_image_loads_keeps_the_chat(tokenizer, tmp_path, monkeypatch, capsys):
    def interrupted(self, image):
        raise KeyboardInterrupt  # Ctrl-C while `/image PATH` runs the vision tower

    monkeypatch.setattr(Chat, "attach", interrupted)
    noise_image(3).save(tmp_path / "cat.png")
    cli_chat(tokenizer, tmp_path, monkeypatch, f"/image {tmp_path / 'cat.png'}\ntell me a story\n/quit\n")
    out = capsys.readouterr().out
    replies = [ln for ln in out.splitlines() if ln.startswith("ASSISTANT: ")]
    assert "[stopped]" in out and len(replies) == 1 and "[stopped]" not in replies[0]


def spawn_at_a_terminal(argv: list[str], stdout=None):
    """``python argv`` with a pty as its stdin, stdout (unless given) and stderr; (process, the pty's other end)."""
    import os
    import pty
    import signal
    import subprocess

    main_fd, sub_fd = pty.openpty()
    src = str(__import__("pathlib").Path(__import__("vistune").__file__).parents[1])
    # pytest-xdist's workers ignore SIGINT, and a child inherits that: give it a terminal's default.
    proc = subprocess.Popen([sys.executable, *argv], stdin=sub_fd, stdout=sub_fd if stdout is None else stdout,
                            stderr=sub_fd, close_fds=True,
                            env=dict(os.environ, PYTHONPATH=src, TERM="xterm"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(sub_fd)
    return proc, main_fd


def read_until(fd: int, text: bytes, seen: bytes = b"", timeout: float = 120) -> bytes:
    """Read ``fd`` until ``text`` shows; what came after it."""
    import os
    import select
    import time

    deadline = time.monotonic() + timeout
    while text not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    assert text in seen, seen.decode(errors="replace")
    return seen[seen.index(text) + len(text):]


@pytest.mark.parametrize("stdout", ["terminal", "pipe"])
def test_ctrl_c_recorded_while_the_prompt_is_not_yet_waiting_still_quits(stdout):
    """CPython's readline acts on Ctrl-C only when it interrupts the wait for a key; one recorded just
    before that wait began (here: taken by another thread, as a SIGINT landing between drawing the
    prompt and waiting would be) must still end the prompt, not wait for the next key."""
    import os
    import signal
    import subprocess

    child = ("import readline, signal, sys, threading\n"
             "from vistune.cli.infer import read_line\n"
             "threading.Thread(target=threading.Event().wait, daemon=True).start()\n"
             "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # the other thread takes it\n"
             "sys.exit(0 if read_line(True) is None else 3)\n")
    # With stdout a pipe (`vistune chat | tee log`), input() reads the line without readline.
    proc, main_fd = spawn_at_a_terminal(["-c", child], stdout=None if stdout == "terminal" else subprocess.PIPE)
    try:
        if proc.stdout is None:
            read_until(main_fd, b"USER: ")
        else:
            read_until(proc.stdout.fileno(), b"USER: ")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stdout is not None:
            proc.stdout.close()
        os.close(main_fd)


def test_cli_chat_at_a_terminal_has_history_and_ctrl_c_quits(tokenizer, tmp_path):
    """At a terminal: the up arrow recalls the last line (readline), Ctrl-C at the prompt quits."""
    import os
    import signal

    model, tok = make_model(tokenizer)
    path = save_model(model, tok, tmp_path / "m")
    proc, main_fd = spawn_at_a_terminal(["-m", "vistune.cli", "chat", "--model", str(path)])
    seen = b""

    def until(text: bytes) -> None:
        nonlocal seen
        seen = read_until(main_fd, text, seen)

    try:
        until(b"USER: ")
        os.write(main_fd, b"/image no-such-file.png\r")
        until(b"[error]")
        until(b"USER: ")
        os.write(main_fd, b"\x1b[A\r")  # the up arrow: the same command again, not text for the model
        until(b"[error]")
        until(b"USER: ")
        proc.send_signal(signal.SIGINT)  # Ctrl-C at the prompt (the pty is not its controlling terminal)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main_fd)
