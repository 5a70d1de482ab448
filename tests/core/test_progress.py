"""core/progress.py: the bar of long work outside the training loops."""

from core.progress import steps


def test_a_bar_ends_with_its_count_and_draws_nothing_where_it_must_not(capsys, monkeypatch):
    with steps("scoring answers", 3) as advance:
        for _ in range(3):
            advance()
    err = capsys.readouterr().err
    assert "scoring answers" in err and "3/3" in err
    with steps("nothing to do", 0) as advance:
        advance()
    monkeypatch.setenv("RANK", "1")  # another process of a multi-process run: the main process draws
    with steps("not the main process", 5) as advance:
        advance(5)
    assert capsys.readouterr().err == ""
