from node.ratelimit import PenaltyBox


def test_blocks_after_max_strikes_within_the_window_then_forgives():
    box = PenaltyBox(max_strikes=3, window_s=10, penalty_s=5)
    assert not box.record("1.2.3.4", 0) and not box.record("1.2.3.4", 1)
    assert box.blocked_for("1.2.3.4", 1) == 0
    assert box.record("1.2.3.4", 2)
    assert box.blocked_for("1.2.3.4", 3) == 4
    assert box.blocked_for("5.6.7.8", 3) == 0
    assert box.blocked_for("1.2.3.4", 7.5) == 0


def test_strikes_outside_the_window_do_not_add_up():
    box = PenaltyBox(max_strikes=2, window_s=10, penalty_s=5)
    assert not box.record("ip", 0)
    assert not box.record("ip", 11)
    assert box.record("ip", 12)


def test_disabled_and_bounded():
    assert not PenaltyBox(0, 10, 5).record("ip", 0)
    box = PenaltyBox(max_strikes=1, window_s=10, penalty_s=100, max_keys=3)
    for i in range(10):
        box.record(f"ip{i}", 0)
    assert len(box._blocked) == 3 and box.blocked_for("ip9", 1) > 0
