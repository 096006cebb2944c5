"""The status machine, checked exhaustively against OpenAI's documented transitions."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from millrace.lifecycle.status import TIMESTAMP_FIELD, TRANSITIONS, BatchStatus, can_transition

S = BatchStatus
LEGAL = {
    (S.VALIDATING, S.IN_PROGRESS), (S.VALIDATING, S.FAILED), (S.VALIDATING, S.CANCELLING),
    # the completion window counts from creation (OpenAI), so validating can expire too
    (S.VALIDATING, S.EXPIRED),
    (S.IN_PROGRESS, S.FINALIZING), (S.IN_PROGRESS, S.EXPIRED), (S.IN_PROGRESS, S.CANCELLING),
    (S.FINALIZING, S.COMPLETED),
    (S.CANCELLING, S.CANCELLED),
}


def test_every_pair_of_statuses() -> None:
    for a, b in itertools.product(S, S):
        assert can_transition(a, b) == ((a, b) in LEGAL), (a, b)


def test_terminal_statuses_have_no_way_out() -> None:
    assert {s for s in S if s.terminal} == {S.COMPLETED, S.FAILED, S.EXPIRED, S.CANCELLED}


def test_every_reachable_status_stamps_a_timestamp() -> None:
    for targets in TRANSITIONS.values():
        for target in targets:
            assert TIMESTAMP_FIELD[target].endswith("_at")


@given(st.lists(st.sampled_from(list(S)), max_size=30))
def test_any_walk_of_legal_steps_never_leaves_a_terminal_status(steps: list[BatchStatus]) -> None:
    current = S.VALIDATING
    for step in steps:
        if can_transition(current, step):
            assert not current.terminal
            current = step
