"""The engine replica's bounded queue (hispec/serving/admission.py), without Ray."""

import pytest
from hispec.errors import Overloaded
from hispec.serving.admission import Admission


class Engines:
    """The engine that serves: the current one, unless it died."""

    def __init__(self) -> None:
        self.current, self.dead = object(), False

    def serves(self) -> object | None:
        return None if self.dead else self.current


def test_refuses_beyond_the_limit_and_frees_a_place_on_leave():
    admission = Admission(3, "at capacity", Engines().serves)
    tickets = [admission.enter() for _ in range(3)]
    with pytest.raises(Overloaded, match="at capacity"):
        admission.enter()
    assert admission.holding() == 3
    admission.leave(tickets[1])
    assert admission.holding() == 2
    admission.enter()
    with pytest.raises(Overloaded):
        admission.enter()


def test_requests_on_a_dead_engine_hold_no_place():
    """The race CI hit: the engine dies with the queue full; the ingress retries a queued request
    before the dead attempts' generators have left. The retry must get in, and the queue stays bounded."""
    engines = Engines()
    admission = Admission(4, "at capacity", engines.serves)
    on_engine = [admission.enter() for _ in range(4)]
    for ticket in on_engine:
        ticket.engine = engines.current
    with pytest.raises(Overloaded):
        admission.enter()
    engines.dead = True  # none has left yet
    retries = [admission.enter() for _ in range(4)]  # waiting for the rebuild (engine None): they count
    assert admission.holding() == 4
    with pytest.raises(Overloaded):
        admission.enter()
    engines.current, engines.dead = object(), False  # rebuilt: the old engine is not the current one
    for ticket in retries:
        ticket.engine = engines.current
    with pytest.raises(Overloaded):
        admission.enter()
    for ticket in on_engine:
        admission.leave(ticket)
    assert admission.holding() == 4


def test_leaving_twice_or_a_limit_below_one():
    admission = Admission(1, "full", Engines().serves)
    ticket = admission.enter()
    admission.leave(ticket)
    admission.leave(ticket)
    assert admission.holding() == 0
    with pytest.raises(ValueError, match="at least one"):
        Admission(0, "full", Engines().serves)
