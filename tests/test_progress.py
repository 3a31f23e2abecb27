"""The progress bar: elapsed time, rate and time left on a terminal; one final line elsewhere."""
import io

from imgclf.utils import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bar_on_a_terminal_says_time_left():
    out = Terminal()
    bar = progress.Progress(100, "features train", stream=out)
    bar.start -= 30            # as if 30 s had passed: 40 rows in 30 s, 60 to go at that rate
    bar.last = 0
    bar.update(40)
    assert "40/100" in out.getvalue()
    assert "45.0s left" in out.getvalue()
    bar.close()
    assert out.getvalue().endswith("\n")


def test_finished_bar_and_a_log_file_show_no_time_left_or_escape_codes():
    out = io.StringIO()
    bar = progress.Progress(10, "scan", stream=out)
    bar.update(10)
    bar.close()
    line = out.getvalue()
    assert line.count("\n") == 1 and "10/10" in line
    assert "left" not in line and "\033" not in line


def test_clock():
    assert progress.clock(5.23) == " 5.2s"
    assert progress.clock(187) == "3:07"
    assert progress.clock(3729) == "1:02:09"
