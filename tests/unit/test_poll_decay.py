from node import config
from node.poll import next_poll_ms

S = config.load({})


def test_activity_snaps_back_to_the_minimum():
    assert next_poll_ms(True, 30000, True, S) == 1000


def test_empty_polls_decay_geometrically_up_to_the_maximum():
    interval, seen = 1000, []
    for _ in range(12):
        interval = next_poll_ms(False, interval, True, S)
        seen.append(interval)
    assert seen[:4] == [1500, 2250, 3375, 5062]
    assert max(seen) == 30000 and seen[-1] == 30000


def test_first_poll_and_nonsense_intervals_start_at_the_minimum():
    assert next_poll_ms(False, 0, True, S) == 1000
    assert next_poll_ms(False, None, True, S) == 1000
    assert next_poll_ms(False, 10, True, S) == 1500  # below the minimum counts as the minimum


def test_unfocused_clients_wait_at_least_the_unfocused_interval():
    assert next_poll_ms(True, 1000, False, S) == 15000
    assert next_poll_ms(False, 20000, False, S) == 30000


def test_load_raises_the_interval_but_boundedly():
    assert next_poll_ms(True, 1000, True, S, load=2.0) == 2000
    assert next_poll_ms(False, 30000, True, S, load=4.0) == 60000


def test_ten_idle_minutes_cost_at_most_30_polls_with_the_defaults():
    elapsed, polls, interval = 0, 0, 0
    while True:
        interval = next_poll_ms(polls == 0, interval, True, S)
        polls += 1
        elapsed += interval
        if elapsed > 600_000:
            break
    assert polls <= 30
