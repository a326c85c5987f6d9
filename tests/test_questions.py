import pytest

from eval_helpers import write_jsonl
from vistune.eval.questions import load_questions, query_for, with_suffix
from vistune.eval.runner import EvalError


def test_load_questions_stringifies_ids_and_names_problems(tmp_path):
    p = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "image": "a.png", "text": "Q?"},
                                           {"question_id": "2", "text": "Text only?"}])
    rows = load_questions(p)
    assert [r["question_id"] for r in rows] == ["1", "2"]
    write_jsonl(p, [{"question_id": 1, "text": "Q?"}, {"question_id": 1, "text": "again"}])
    with pytest.raises(EvalError, match=r"question '1': duplicate question_id \(first at question 1\)"):
        load_questions(p)
    write_jsonl(p, [{"question_id": 1, "text": "Q?"}, {"question_id": 2, "text": "Q?"}])
    with pytest.raises(EvalError, match=r"q.jsonl question 1: missing field 'label'"):
        load_questions(p, required=("label",))
    write_jsonl(p, [{"question_id": 3, "text": "  "}])
    with pytest.raises(EvalError, match="question '3': 'text'"):
        load_questions(p)
    with pytest.raises(EvalError, match="not found"):
        load_questions(tmp_path / "missing.jsonl")


def test_suffix_added_once():
    assert with_suffix("Q?", "Answer briefly.") == "Q?\nAnswer briefly."
    assert with_suffix("Q?\nAnswer briefly.\n", "Answer briefly.") == "Q?\nAnswer briefly."
    assert with_suffix(" Q? ", None) == "Q?"


def test_query_for_resolves_images(tmp_path):
    q = query_for({"question_id": "1", "image": "sub/a.png", "text": "Q?"}, tmp_path, "S.")
    assert q.images == [tmp_path / "sub" / "a.png"] and q.text == "Q?\nS."
    assert query_for({"question_id": "2", "text": "Q?"}, tmp_path).images == []
