"""Training progress lines: what a person watching a stage sees, on a terminal and in a log."""

import io

from tasks_mtl.progress import StageProgress, describe


def test_plain_lines_name_stage_step_losses_speed_and_time_left():
    lines = []
    progress = StageProgress(emit=lines.append, every_s=0.0)
    progress("joint", 25, 100, {"loss/ner": 0.4567, "loss/cws": 0.1, "tokens_per_s": 7900.0, "lr/encoder": 1e-3})
    progress("joint", 50, 100, {"loss/ner": 0.3, "tokens_per_s": 8000.0})
    progress("joint", 100, 100, {"loss/ner": 0.2, "tokens_per_s": 8000.0})
    assert lines[0].startswith("joint 25/100 (25%) | loss cws 0.100 ner 0.457 | 7.9k tok/s | ETA ")
    assert "lr/encoder" not in lines[0]
    assert lines[-1].endswith("| done") and len(lines) == 3


def test_plain_lines_are_throttled_but_each_stage_end_is_shown():
    lines = []
    progress = StageProgress(emit=lines.append, every_s=3600.0)
    for step in range(1, 11):
        progress("features", step * 10, 100, {"loss/ner": 1.0 / step})
    progress("joint", 5, 50, {"loss/ner": 0.5})
    assert [line.split(" |")[0] for line in lines] == ["features 100/100 (100%)"]  # joint's first: within the hour


def test_a_terminal_gets_a_live_line_per_stage():
    stream = io.StringIO()
    progress = StageProgress(stream=stream, live=True)
    progress("joint", 10, 20, {"loss/sentiment": 0.69})
    progress("joint", 20, 20, {"loss/sentiment": 0.35})
    text = stream.getvalue()
    assert "joint" in text and "20/20" in text and "sentiment 0.350" in text


def test_describe_without_speed():
    assert describe({"loss/mlm": 6.5}) == "loss mlm 6.500"
