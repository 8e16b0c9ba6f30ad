from node.resume import plan_replay


def entries(*pairs):
    return [(sid.encode(), {b"s": str(seq).encode()}) for sid, seq in pairs]


def test_epoch_mismatch_is_not_recovered():
    plan = plan_replay("old", "new", "5-0", "9-0", entries(("5-0", 1), ("6-0", 2)), 10)
    assert not plan.recovered and not plan.entries


def test_cursor_entry_present_replays_strictly_after_it():
    plan = plan_replay("e", "e", "5-0", "7-0", entries(("5-0", 1), ("6-0", 2), ("7-0", 3)), 10)
    assert plan.recovered
    assert [e[0] for e in plan.entries] == [b"6-0", b"7-0"]


def test_cursor_trimmed_away_is_a_gap():
    plan = plan_replay("e", "e", "5-0", "9-0", entries(("8-0", 4), ("9-0", 5)), 10)
    assert not plan.recovered


def test_cursor_at_position_replays_nothing():
    plan = plan_replay("e", "e", "9-0", "9-0", entries(("9-0", 5)), 10)
    assert plan.recovered and not plan.entries


def test_over_replay_limit_is_not_recovered():
    rows = entries(("1-0", 1), *[(f"{i}-0", i) for i in range(2, 6)])
    assert not plan_replay("e", "e", "1-0", "5-0", rows, 3).recovered
    assert plan_replay("e", "e", "1-0", "5-0", rows, 4).recovered


def test_zero_cursor_needs_the_first_message():
    assert plan_replay("e", "e", "0-0", "3-0", entries(("1-0", 1), ("3-0", 2)), 10).recovered
    assert not plan_replay("e", "e", "0-0", "3-0", entries(("2-0", 7)), 10).recovered
    assert plan_replay("e", "e", "0-0", "0-0", [], 10).recovered


def test_cursor_from_the_future_is_not_recovered():
    assert not plan_replay("e", "e", "10-0", "9-0", [], 10).recovered
