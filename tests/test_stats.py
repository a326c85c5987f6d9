import json

import pytest
from PIL import Image

from vistune.cli import main
from vistune.data.records import write_records
from vistune.instruct.stats import compute_stats, to_markdown, write_report


def rec(rid, kind, rounds, words=3, image=True):
    conv = []
    for r in range(rounds):
        q = " ".join(["q"] * words)
        conv += [{"from": "human", "value": ("<image>\n" + q) if (r == 0 and image) else q},
                 {"from": "gpt", "value": " ".join(["a"] * words)}]
    d = {"id": rid, "conversations": conv, "kind": kind}
    if image:
        d["image"] = f"{rid}.jpg"
    return d


@pytest.fixture
def data(tmp_path):
    recs = ([rec(f"c{i}", "conversation", 1 + i % 3) for i in range(6)]
            + [rec(f"d{i}", "detail", 1, words=10) for i in range(3)]
            + [rec("t", "text", 2, image=False), {"id": "x", "conversations": []}])
    recs[-2].pop("kind")
    path = tmp_path / "data.jsonl"
    write_records(recs, path)
    return path


def test_counts_turns_and_word_lengths(data):
    st = compute_stats(data, progress=False)
    assert (st.records, st.invalid, st.with_image, st.unit) == (10, 1, 9, "words")
    assert "record 'x'" in st.problems[0]
    assert st.kinds == {"(no kind)": 1, "conversation": 6, "detail": 3}
    assert st.rounds == {1: 5, 2: 3, 3: 2}
    # c_i has 1 + i%3 rounds of 3 + 3 words; the placeholder is not a word.
    assert sorted(st.lengths["conversation"]) == [6, 6, 12, 12, 18, 18]
    assert st.lengths["detail"] == [20, 20, 20]
    pc = st.percentiles("conversation")
    assert pc["p50"] == 12 and pc["max"] == 18 and pc["mean"] == 12
    md = to_markdown(st, "lengths.png")
    assert "| conversation | 6 | 60.0% |" in md and "| 3 | 2 |" in md and "![length histogram](lengths.png)" in md


def test_token_lengths_with_tokenizer(data, tokenizer):
    st = compute_stats(data, tokenizer, progress=False)
    assert st.unit == "tokens"
    text = "\n".join(["q q q", "a a a"])
    assert st.lengths["detail"][0] > 0
    assert st.lengths["conversation"][0] == len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_report_files_and_cli(data, tmp_path, capsys, tokenizer):
    paths = write_report(compute_stats(data, progress=False), tmp_path / "rep")
    assert Image.open(paths["png"]).size[0] > 100
    summary = json.loads(paths["json"].read_text())
    assert summary["kinds"]["detail"] == 3 and summary["length_percentiles"]["detail"]["p50"] == 20
    assert summary["mean_rounds"] == pytest.approx((5 + 6 + 6) / 10)
    assert main(["data", "stats", str(data)]) == 0
    out = capsys.readouterr().out
    assert "| detail | 3 | 30.0% |" in out
    assert (data.parent / "data_stats" / "lengths.png").exists() and (data.parent / "data_stats" / "stats.md").exists()
    tokenizer.save_pretrained(tmp_path / "tok")
    assert main(["data", "stats", str(data), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "t")]) == 0
    assert "Length in tokens" in capsys.readouterr().out
    assert json.loads((tmp_path / "t" / "stats.json").read_text())["unit"] == "tokens"
    assert main(["data", "stats", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_one_outlier_does_not_crush_the_histogram(tmp_path):
    from vistune.instruct.stats import DataStats, length_bins, to_markdown

    values = list(range(1, 1000)) + [1_000_000]
    bins, outliers = length_bins(values)
    # 50 bins over 1..995 (p99.5), not 20 000 records wide each; the top 0.5 % (996..999 and the outlier) counted
    assert (bins[0], bins[-1], len(bins), outliers) == (1, 995, 51, 5)
    st = DataStats("d.jsonl", "words", lengths={"x": values})
    assert "5 longer record(s), up to 1000000, are not shown" in to_markdown(st, "lengths.png")
