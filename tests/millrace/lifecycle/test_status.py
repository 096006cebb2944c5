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


FINAL = {S.COMPLETED, S.FAILED, S.EXPIRED, S.CANCELLED}  # OpenAI's final statuses


def test_terminal_statuses_have_no_way_out() -> None:
    assert {s for s in S if s.terminal} == FINAL


def test_every_reachable_status_stamps_a_timestamp() -> None:
    for targets in TRANSITIONS.values():
        for target in targets:
            assert TIMESTAMP_FIELD[target].endswith("_at")


@given(st.data())
def test_every_walk_of_legal_steps_ends_in_a_final_status(data: st.DataObject) -> None:
    """Nothing is stuck and nothing loops: from `validating`, any choice of legal steps
    reaches a final status in fewer steps than there are statuses."""
    current, seen = S.VALIDATING, [S.VALIDATING]
    while TRANSITIONS[current]:
        current = data.draw(st.sampled_from(sorted(TRANSITIONS[current])))
        assert current not in seen, f"a loop: {[*seen, current]}"
        seen.append(current)
    assert current in FINAL, f"stuck in {current}"
    assert len(seen) <= len(S)


def test_every_status_is_reachable_from_validating() -> None:
    reached, frontier = {S.VALIDATING}, [S.VALIDATING]
    while frontier:
        for target in TRANSITIONS[frontier.pop()] - reached:
            reached.add(target)
            frontier.append(target)
    assert reached == set(S)
