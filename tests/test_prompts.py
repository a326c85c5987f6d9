import pytest

from vistune.instruct.annotations import Box, ImageAnnotation, symbolic_context
from vistune.instruct.prompts import PROMPTS, CompletionError, build_messages, check_kinds, parse_completion, parse_qa

ANN = ImageAnnotation("9", "9.jpg", 200, 100, ["A bike by a wall.", "A red bike."], [Box("bicycle", (57.4, 64.1, 101.4, 87.4))])


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_few_shot_examples_follow_their_own_rules(kind):
    # The examples teach the format: each must parse cleanly under the rules for its kind.
    spec = PROMPTS[kind]
    assert len(spec.examples) >= 2
    for context, output in spec.examples:
        pairs = parse_completion(kind, output)
        assert pairs and all(a for _, a in pairs)
        assert ("bicycle: [" in context or "dog: [" in context) == spec.with_boxes


def test_messages_carry_the_right_context():
    conv = build_messages("conversation", ANN)
    assert [m["role"] for m in conv] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert conv[-1]["content"] == "A bike by a wall.\nA red bike."  # captions only
    detail = build_messages("detail", ANN)
    assert detail[-1]["content"] == symbolic_context(ANN) and "bicycle: [0.287, 0.641, 0.507, 0.874]" in detail[-1]["content"]
    assert detail[0]["content"] != conv[0]["content"]
    with pytest.raises(ValueError, match="unknown kind.*'story'"):
        check_kinds(["detail", "story"])


def test_parse_qa_variants():
    strict = "Question:\nWhat is it?\n===\nAnswer:\nA bike.\n===\nQuestion:\nColor?\n===\nAnswer:\nRed.\n==="
    assert parse_qa(strict) == [("What is it?", "A bike."), ("Color?", "Red.")]
    loose = "Here you go.\n**Question:** What is it?\n**Answer:** A bike\nleaning on a wall.\n\nquestion: Color?\nanswer: Red."
    assert parse_qa(loose) == [("What is it?", "A bike\nleaning on a wall."), ("Color?", "Red.")]


@pytest.mark.parametrize("kind, text, reason", [
    ("conversation", "Answer:\nA bike.\n===", "block 1 is an answer"),
    ("conversation", "Question:\nWhat?\n===", "question 1 has no answer"),
    ("conversation", "Question:\n\n===\nAnswer:\nA bike.\n===", "empty question 1"),
    ("conversation", "Question:\nWhat?\n===\nAnswer:\nAs the captions say, a bike.\n===", "mentions its sources"),
    ("conversation", "Question:\nWhat? <image>\n===\nAnswer:\nA bike.\n===", "placeholder"),
    ("reasoning", "Question:\nA?\n===\nAnswer:\nB.\n===\nQuestion:\nC?\n===\nAnswer:\nD.\n===", "expected one question"),
    ("detail", "Question:\nWhat?\n===\nAnswer:\nA bike.", "contains Question/Answer markers"),
    ("detail", "A bike at 0.287 from the left.", "quotes box coordinates"),
    ("detail", "As an AI language model, I cannot see images.", "refusal"),
    ("detail", "   ", "empty completion"),
])
def test_unusable_completions(kind, text, reason):
    with pytest.raises(CompletionError, match=reason):
        parse_completion(kind, text)
