"""Subscriptions lapse unless renewed; tokens are actor addresses, compared by equality."""

from mai.core.subscriptions import Subscribers


class _Unhashable:
    """Like Thespian's ActorAddress: equality by value, no hash."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, name: str) -> None:
        self.name = name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Unhashable) and other.name == self.name


def test_unhashable_tokens_such_as_actor_addresses_work():
    subs = Subscribers()
    subs.add(_Unhashable("a"), now=0, ttl_s=10)
    subs.add(_Unhashable("a"), now=5, ttl_s=10)  # a renewal, not a second subscriber
    subs.add(_Unhashable("b"), now=0, ttl_s=1)
    assert len(subs) == 2 and _Unhashable("a") in subs
    assert subs.live(now=2) == [_Unhashable("a")]
    assert subs.next_expiry() == 15
    assert subs.remove(_Unhashable("a")) and not subs.remove(_Unhashable("a"))
