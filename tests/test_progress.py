"""extract's progress line: formatting, the job's ETA over ranks, and when a line is shown (no terminal needed)."""

import io

import pytest

from w2vbert_fast.extract.progress import Display, Snapshot, combine, eta_seconds, format_duration, format_line


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (44.6, "45s"), (59.4, "59s"), (60, "1m00s"), (365, "6m05s"),
                                          (3599, "59m59s"), (3600, "1h00m"), (7620, "2h07m"), (86399, "23h59m"),
                                          (86400 * 3 + 3600 * 4 + 59, "3d04h"), (None, "?")])
def test_durations_show_two_units_at_most(seconds, text):
    assert format_duration(seconds) == text


def test_combine_sums_counts_and_takes_the_longest_elapsed():
    a = Snapshot(1, 4, 10, 40, 100.0, 400.0, 1, 20.0)
    b = Snapshot(2, 3, 5, 30, 50.0, 300.0, 0, 30.0)
    assert combine([a, b]) == Snapshot(3, 7, 15, 70, 150.0, 700.0, 1, 30.0)
    assert combine([]) == Snapshot()


def test_eta_is_the_slowest_rank_at_its_own_rate():
    fast = Snapshot(seconds_done=100.0, seconds=200.0, elapsed=10.0)  # 10 s/s, 100 s left -> 10 s
    slow = Snapshot(seconds_done=20.0, seconds=100.0, elapsed=10.0)  # 2 s/s, 80 s left -> 40 s
    assert eta_seconds([fast, slow]) == pytest.approx(40.0)
    assert eta_seconds([fast]) == pytest.approx(10.0)
    # a finished rank does not hold the job up
    assert eta_seconds([Snapshot(seconds_done=50.0, seconds=50.0, elapsed=100.0), fast]) == pytest.approx(10.0)


def test_eta_before_any_rate_is_unknown_and_a_silent_rank_gets_the_mean_rate():
    assert eta_seconds([Snapshot(seconds=100.0, elapsed=5.0)]) is None
    assert eta_seconds([Snapshot()]) == 0.0  # nothing to do
    measured = [Snapshot(seconds_done=10.0, seconds=10.0, elapsed=10.0),  # 1 s/s
                Snapshot(seconds_done=30.0, seconds=30.0, elapsed=10.0)]  # 3 s/s
    waiting = Snapshot(seconds=60.0, elapsed=10.0)  # no batch yet: 60 s at the mean 2 s/s
    assert eta_seconds(measured + [waiting]) == pytest.approx(30.0)


def test_line_reports_clips_hours_rate_failures_and_eta():
    ranks = [Snapshot(3, 7, 120, 300, 3600.0, 3 * 3600.0, 2, 100.0), Snapshot(2, 5, 80, 200, 1800.0, 7200.0, 0, 90.0)]
    line = format_line(ranks)
    assert line.startswith("[batch 5/12] 200/500 clips, 1.500/5.000 h of audio in 1m40s, ")
    # 5400 audio s in 100 s: 54x real time = 0.015 audio-hours per second
    assert "0.015 audio-h/s (54.0x real time), 2 failed, " in line
    # rank 0: 7200 s left at 36 s/s = 200 s; rank 1: 5400 s left at 20 s/s = 270 s
    assert line.endswith("ETA 4m30s")


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def snapshot(done):
    return [Snapshot(done, 10, done, 10, done * 10.0, 100.0, 0, done + 1.0)]


def test_plain_lines_first_then_every_interval_and_the_final_one():
    stream, clock = io.StringIO(), Clock()
    display = Display(stream, live=False, every=30.0, clock=clock)
    shown = []
    for step, (now, final) in enumerate([(0, False), (10, False), (29, False), (31, False), (40, False),
                                         (41, True)], 1):
        clock.now = now
        shown.append(display.show(snapshot(step), final=final))
    assert shown == [True, False, False, True, False, True]
    lines = stream.getvalue().splitlines()
    assert [line.split("]")[0] for line in lines] == ["[batch 1/10", "[batch 4/10", "[batch 6/10"]
    assert "\r" not in stream.getvalue()


def test_live_line_rewrites_itself_blanks_leftovers_and_ends_with_a_newline():
    stream, clock = io.StringIO(), Clock()
    display = Display(stream, live=True, live_every=0.2, clock=clock)
    long = [Snapshot(1, 10, 1, 10, 10.0, 100.0, 123456, 2.0)]
    assert display.show(long)
    clock.now = 0.1
    assert not display.show(snapshot(2))  # too soon
    clock.now = 0.5
    assert display.show(snapshot(3))
    clock.now = 0.6
    assert display.show(snapshot(10), final=True)
    text = stream.getvalue()
    writes = text.split("\r")[1:]
    assert len(writes) == 3 and text.startswith("\r") and text.endswith("\n") and text.count("\n") == 1
    assert len(writes[1]) >= len(format_line(long))  # the shorter line covers the longer one's tail
    assert writes[1].rstrip() == format_line(snapshot(3))


def test_quiet_shows_nothing_and_a_non_terminal_stream_gets_plain_lines():
    stream = io.StringIO()
    assert not Display(stream, quiet=True).show(snapshot(1), final=True)
    assert stream.getvalue() == ""
    assert Display(stream).live is False  # StringIO is no terminal


def test_tally_totals_drop_the_clips_that_failed():
    from w2vbert_fast.extract.progress import Tally

    clock = Clock()
    tally = Tally(clock=clock)
    tally.start(batches=2, clips=31, seconds=310.0)
    clock.now = 5.0
    snapshot = tally.update(2, 18, 180.0, 13, clips=18, seconds=180.0)  # 13 failed: out of the totals
    assert (snapshot.clips_done, snapshot.clips, snapshot.failed) == (18, 18, 13)
    assert eta_seconds([snapshot]) == 0.0 and format_line([snapshot]).startswith("[batch 2/2] 18/18 clips, ")
    assert tally.update(2, 18, 180.0, 13).clips == 18  # totals left out: unchanged
