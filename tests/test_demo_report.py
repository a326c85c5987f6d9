from vistune.demo.report import check_targets, markdown, plot_accuracy


def report(full=0.64, text_only=0.147, majority=0.393, total_s=549.5):
    return {"seed": 0, "questions": 10, "accuracy": {"full": full, "text_only": text_only},
            "accuracy_by_kind": {"full": {"color": full}, "text_only": {"color": text_only}},
            "accuracy_first_word": {"full": full, "text_only": text_only},
            "majority_baseline": {"overall": majority, "color": majority}, "object_recall": 0.2,
            "train_losses": {}, "timings": {"total_s": total_s}}


def test_targets_report_each_bar_and_whether_it_was_met():
    t = check_targets(report(), time_budget_s=600)
    assert set(t) == {"total_s", "full_accuracy", "text_only_vs_majority", "full_over_text_only"}
    assert t["total_s"]["met"] and t["text_only_vs_majority"]["met"] and t["full_over_text_only"]["met"]
    assert not t["full_accuracy"]["met"] and t["full_accuracy"]["value"] == 0.64
    assert t["full_over_text_only"]["value"] == 0.493


def test_targets_missed():
    t = check_targets(report(full=0.95, text_only=0.9, majority=0.4, total_s=130), time_budget_s=120)
    assert t["full_accuracy"]["met"]
    assert not t["total_s"]["met"]
    assert not t["text_only_vs_majority"]["met"]  # 0.9 > 0.4 + 0.05: answered without looking
    assert not t["full_over_text_only"]["met"]


def test_targets_without_ablations_skip_the_text_only_bars():
    r = report()
    del r["accuracy"]["text_only"]
    assert set(check_targets(r, 600)) == {"total_s", "full_accuracy"}


def test_markdown_has_the_targets_table():
    r = report()
    r["targets"] = check_targets(r, 600)
    md = markdown(r, {"full": []}, [])
    assert "## Targets" in md
    assert "| full accuracy | >= 0.9 | 0.64 | **no** |" in md


def test_accuracy_plot_sets_each_variant_beside_the_majority_answer(tmp_path):
    from PIL import Image

    path = plot_accuracy(report(), tmp_path / "accuracy.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300


def test_markdown_names_the_machine_and_the_step_times():
    r = report()
    r["targets"] = check_targets(r, 600)
    r["machine"] = {"cpu": "Some Xeon", "cores": 2, "threads": 2, "torch": "2.13.0", "native_bf16": True}
    r["step_times"] = {"stage2": {"first_step_s": 51.9, "median_step_s": 0.37}}
    md = markdown(r, {"full": []}, [])
    assert "Machine: Some Xeon, 2 cores, 2 torch threads, torch 2.13.0, native bf16." in md
    assert "| stage2 | 51.9 | 0.370 |" in md
