"""Every command that loads a model reports a path that holds none as one error line."""
import json
import shutil

import pytest

from conftest import make_model
from vistune.cli import main
from vistune.model.checkpoint import save_model


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory):
    model, tok = make_model(tokenizer)
    return save_model(model, tok, tmp_path_factory.mktemp("good") / "m")


def broken(saved, tmp_path, how: str):
    """A copy of a good model directory, broken in one way; returns it and what the error must say."""
    path = tmp_path / how
    if how == "missing":
        return path, "no config.json"
    shutil.copytree(saved, path)
    if how == "config not json":
        (path / "config.json").write_text("{not json")
        return path, "config.json is not valid JSON"
    if how == "not a vistune config":
        (path / "config.json").write_text(json.dumps({"model_type": "llava"}))
        return path, "run `vistune import` first"
    if how == "truncated weights":
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:64])
        return path, "model.safetensors"
    if how == "no weights":
        (path / "model.safetensors").unlink()
        return path, "model weights missing"
    raise AssertionError(how)


COMMANDS = {
    "chat": lambda m, d: ["chat", "--model", m],
    "predict": lambda m, d: ["predict", "--model", m, "--data", str(d / "q.jsonl"), "--out", str(d / "a.jsonl")],
    "eval vqa": lambda m, d: ["eval", "vqa", "--model", m, "--data", str(d / "q.jsonl"), "--out", str(d / "out")],
    "serve": lambda m, d: ["serve", "--model", m, "--port", "1"],
    "web": lambda m, d: ["web", "--model", m, "--port", "1"],
}


@pytest.mark.parametrize("how", ["missing", "config not json", "not a vistune config", "truncated weights",
                                 "no weights"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_path_that_holds_no_model_is_one_error_line(saved, tmp_path, capsys, command, how):
    model, says = broken(saved, tmp_path, how)
    (tmp_path / "q.jsonl").write_text(json.dumps({"question_id": 1, "text": "What is it?", "answers": ["x"]}) + "\n")
    assert main(COMMANDS[command](str(model), tmp_path)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    (line,) = [ln[ln.index("error:"):] for ln in err.splitlines() if "error:" in ln]  # eval's bar may precede it
    assert line.startswith(f"error: cannot load the model at {model}: ") and says in line, line
