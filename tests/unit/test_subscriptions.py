"""Subscriptions lapse on their own unless renewed: a client that crashed never says goodbye."""

from mai.core.subscriptions import Subscribers


def test_subscribers_get_events_until_their_ttl_runs_out():
    subs = Subscribers()
    subs.add("events-cli", now=0.0, ttl_s=30.0)
    subs.add("loop", now=10.0, ttl_s=30.0)
    assert subs.live(29.9) == ["events-cli", "loop"]
    assert subs.live(30.0) == ["loop"]  # lapsed at exactly now + ttl, and dropped
    assert "events-cli" not in subs and len(subs) == 1


def test_renewing_extends_and_keeps_the_order():
    subs = Subscribers()
    subs.add("a", 0.0, 10.0)
    subs.add("b", 0.0, 10.0)
    subs.add("a", 9.0, 10.0)
    assert subs.live(15.0) == ["a"]
    assert subs.next_expiry() == 19.0


def test_unsubscribe_says_whether_there_was_a_subscription():
    subs = Subscribers()
    subs.add("a", 0.0, 10.0)
    assert subs.remove("a") is True
    assert subs.remove("a") is False
    assert subs.live(0.0) == [] and subs.next_expiry() is None


def test_a_successor_restores_the_live_subscriptions_in_order_without_duplicates():
    old = Subscribers()
    old.add("a", now=0.0, ttl_s=10.0)
    old.add("b", now=0.0, ttl_s=100.0)
    old.add("c", now=0.0, ttl_s=50.0)
    new = Subscribers()
    new.add("c", now=20.0, ttl_s=30.0)  # renewed at the successor before the file was read
    assert new.restore(old.entries(), now=20.0) == 2  # "a" lapsed at 10
    assert new.live(20.0) == ["c", "b"] and new.next_expiry() == 50.0
