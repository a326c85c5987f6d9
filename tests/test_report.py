import json

from PIL import Image

from vistune.eval.report import markdown_table, write_report


def test_write_report_files(tmp_path):
    metrics = {"task": "demo", "accuracy": 0.75, "count": 8, "model": "m",
               "by": {"kind": {"x": {"accuracy": 0.5, "count": 4}, "y": {"accuracy": 1.0, "count": 4}},
                      "empty": {}}}
    paths = write_report(tmp_path, metrics, title="Demo", summary=[("accuracy", "75.00%")],
                         sections=["## Extra\n\ntext"])
    assert json.loads(paths["metrics"].read_text()) == {"format_version": 1, **metrics}
    md = paths["report"].read_text()
    assert md.startswith("# Demo") and "| accuracy | 75.00% |" in md
    assert "## By kind" in md and "| x | 50.00% | 4 |" in md and "## By empty" not in md
    assert "## Extra" in md and "![demo](demo.png)" in md
    with Image.open(paths["chart"]) as im:
        assert im.format == "PNG" and im.size[0] >= 300
    assert not list(tmp_path.glob("*.tmp*"))


def test_chart_without_breakdown_shows_overall(tmp_path):
    paths = write_report(tmp_path, {"task": "t", "accuracy": 0.4, "count": 5}, title="T", summary=[])
    with Image.open(paths["chart"]) as im:
        assert im.format == "PNG"


def test_markdown_table_escapes_cells():
    assert markdown_table(["a", "b"], [["x|y", "multi\nline"]]) == "| a | b |\n|---|---|\n| x\\|y | multi line |"


def test_comparison_chart_draws_a_bar_per_series_and_category(tmp_path):
    from vistune.eval.report import comparison_chart

    path = comparison_chart(tmp_path / "c.png", {"full": {"color": 0.9, "shape": 0.8}, "text only": {"color": 0.3}},
                            ylabel="accuracy", colors={"text only": "#bbbbbb"})
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= 300
    import pytest

    with pytest.raises(ValueError, match="nothing to chart"):
        comparison_chart(tmp_path / "d.png", {"full": {}}, ylabel="accuracy")
