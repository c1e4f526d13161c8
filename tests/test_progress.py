"""Progress in a file (SLURM, nohup, CI) is plain log lines, never a redrawn bar."""

import io

from mupfast.progress import LineProgress, progress_bar


def test_progress_into_a_file_is_complete_lines_at_most_one_per_interval_and_the_last():
    buf = io.StringIO()  # not a terminal
    bar = progress_bar(1000, initial=100, desc="train", unit="step", file=buf)
    assert isinstance(bar, LineProgress)
    bar.interval = 3600.0  # nothing until the end
    for _ in range(899):
        bar.set_postfix(loss="2.3100")
        bar.update()
    assert buf.getvalue() == ""
    bar.write("step 500: val loss 2.4")
    bar.update()
    bar.close()
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue()
    assert lines[0] == "step 500: val loss 2.4"
    assert lines[1].startswith("train: 1000/1000 step (100%), ") and lines[1].endswith("loss=2.3100")
    assert len(lines) == 2  # close after the last update adds nothing


def test_a_run_stopped_early_still_ends_with_where_it_stopped():
    buf = io.StringIO()
    with progress_bar(10, desc="grid", unit="run", file=buf) as bar:
        bar.interval = 3600.0
        bar.update(3)
    assert buf.getvalue().startswith("grid: 3/10 run (30%), ") and "left" in buf.getvalue()
