import math

from PIL import Image

from vistune.train.metrics import loss_summary, plot_loss, plot_losses, step_times


def test_step_times_split_the_first_step_from_the_median_after_it():
    times = [51.9, 52.3, 52.7, 53.5, 53.9]  # a compile in the first step, then 0.4 s steps and one slow one
    recs = [{"step": i + 1, "loss": 1.0, "time": t} for i, t in enumerate(times)]
    assert step_times(recs) == {"first_step_s": 51.9, "median_step_s": 0.4}


def test_step_times_share_a_gap_among_steps_logged_every_few():
    recs = [{"step": s, "loss": 1.0, "time": t} for s, t in [(10, 5.0), (20, 7.0), (30, 9.0)]]
    # Step 1 was not logged, so there is no first-step time to report.
    assert step_times(recs) == {"first_step_s": None, "median_step_s": 0.2}
    assert step_times([]) == {"first_step_s": None, "median_step_s": None}


def test_loss_summary_first_and_final():
    assert loss_summary([{"step": 1, "loss": 2.34567}, {"step": 2}, {"step": 3, "loss": 1.0}]) == \
        {"first": 2.3457, "final": 1.0}
    assert all(math.isnan(v) for v in loss_summary([{"step": 1}]).values())


def test_loss_plots_one_run_or_a_panel_per_run(tmp_path):
    recs = [{"step": s, "loss": 3.0 / s, "lr": 1e-3} for s in range(1, 60)]
    assert plot_loss([{"step": 1}], tmp_path / "none.png") is None
    with Image.open(plot_loss(recs, tmp_path / "one.png")) as one:
        one_width = one.size[0]
    with Image.open(plot_losses({"stage1": recs, "stage2": recs, "ablation": []}, tmp_path / "three.png")) as three:
        assert three.format == "PNG" and three.size[0] > one_width
