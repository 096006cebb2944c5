"""The worker's bookkeeping without Kafka: the order lines are admitted in (priority,
deadline, turns, the minimum share), in-flight limits, and which offset may be committed
when lines finish out of order."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.intake import MIN_PRIORITY
from gpu_consumer.admission import (
    Backlog,
    Budget,
    PartitionOffsets,
    Pending,
    prefix_key,
    token_cost,
)
from millrace.records import Order, RequestRecord, read_request
from millrace.records.requests import BACKGROUND_PRIORITY
from millrace.topics import request_route


def pending(batch_id: str, line: int, offsets: PartitionOffsets | None = None,
            partition: int = 0, priority: int = 0, deadline: float | None = None,
            reply: bool = False, system: str | None = None) -> Pending:
    messages = [{"role": "user", "content": f"line {line}"}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    record = read_request(RequestRecord(
        batch_id=batch_id, project="p", custom_id=f"{batch_id}-{line}", line=line,
        url="/v1/chat/completions", body={"model": "m", "messages": messages},
        priority=priority, deadline=deadline, reply=reply).dumps())
    return Pending(record, "t", partition, line, offsets or PartitionOffsets(), 1,
                   prefix_key(record.body))


def drain(backlog: Backlog, most: int | None = None) -> list[str]:
    """Batch ids of the lines popped, in order (each checked to be the one `peek` showed)."""
    order = []
    while backlog and (most is None or len(order) < most):
        shown = backlog.peek()
        popped = backlog.pop()
        assert popped is shown
        order.append(popped.record.batch_id)
    return order


def test_batches_take_turns_and_keep_their_own_order() -> None:
    backlog = Backlog()
    for line in range(5):
        backlog.push(pending("big", line))
    backlog.push(pending("small", 0))
    backlog.push(pending("small", 1))
    order = [(p.record.batch_id, p.record.line) for p in (backlog.pop() for _ in range(7))]
    # the small batch, read after five lines of the big one, gets every other slot
    assert order == [("big", 0), ("small", 0), ("big", 1), ("small", 1),
                     ("big", 2), ("big", 3), ("big", 4)]
    assert len(backlog) == 0


def test_a_higher_priority_goes_first_whenever_it_arrives() -> None:
    backlog = Backlog()
    for line in range(4):
        backlog.push(pending("nightly", line, priority=0))
    assert drain(backlog, 1) == ["nightly"]
    for line in range(2):
        backlog.push(pending("urgent", line, priority=5))
    backlog.push(pending("background", 0, priority=-1))
    assert drain(backlog) == ["urgent", "urgent", "nightly", "nightly", "nightly",
                              "background"]


def test_the_earlier_deadline_goes_first_and_deadlines_in_one_step_take_turns() -> None:
    backlog = Backlog(deadline_step_s=3600)
    for line in range(3):
        backlog.push(pending("day", line, deadline=86_400 * 3))
    for line in range(2):
        backlog.push(pending("hour", line, deadline=86_400 * 2 + 60))
        backlog.push(pending("same-hour", line, deadline=86_400 * 2 + 1800))
    backlog.push(pending("open", 0))  # no deadline: last
    assert drain(backlog) == ["hour", "same-hour", "hour", "same-hour", "day", "day", "day",
                              "open"]


def test_a_line_someone_waits_on_goes_before_others_of_its_priority() -> None:
    backlog = Backlog()
    backlog.push(pending("big", 0, deadline=100.0))
    backlog.push(pending("big", 1, deadline=100.0))
    backlog.push(pending("row", 0, deadline=9_999.0, reply=True))
    backlog.push(pending("vip", 0, priority=1))
    assert drain(backlog) == ["vip", "row", "big", "big"]


def test_the_minimum_share_reaches_every_batch_whatever_its_rank() -> None:
    backlog = Backlog(min_share=0.25)  # one pick in four goes round the batches
    for line in range(12):
        backlog.push(pending("low", line, priority=-5))
        backlog.push(pending("high", line, priority=5))
    order = drain(backlog, 12)
    assert order.count("low") == 3 and order[3] == order[7] == order[11] == "low"
    strict = Backlog()
    for line in range(12):
        strict.push(pending("low", line, priority=-5))
        strict.push(pending("high", line, priority=5))
    assert drain(strict, 12) == ["high"] * 12


def test_a_background_batch_runs_only_on_what_no_other_batch_wants() -> None:
    """No minimum share for a background batch: it waits while any other batch waits, and
    then has the engine to itself."""
    backlog = Backlog(min_share=0.25)
    for line in range(8):
        backlog.push(pending("spare", line, priority=BACKGROUND_PRIORITY))
    for line in range(12):
        backlog.push(pending("low", line, priority=MIN_PRIORITY))
    assert drain(backlog, 12) == ["low"] * 12
    assert drain(backlog) == ["spare"] * 8
    assert Order.of({"completion_window": "background", "priority": 5,
                     "expires_at": 10}) == (BACKGROUND_PRIORITY, None)


@given(st.lists(st.tuples(st.sampled_from("abcd"), st.integers(-1, 1),
                          st.sampled_from([None, 10.0, 5000.0]), st.booleans(),
                          st.sampled_from([None, "x", "y"])),
                max_size=60),
       st.floats(0, 1), st.lists(st.integers(0, 3), max_size=10))
def test_every_line_comes_out_once_in_order_within_its_batch_and_prefix(
        pushes: list[tuple[str, int, float | None, bool, str | None]], share: float,
        steps: list[int]) -> None:
    backlog = Backlog(min_share=share, deadline_step_s=3600)
    kinds: dict[str, tuple[int, float | None, bool]] = {}
    lines: dict[str, int] = {}
    for batch_id, priority, deadline, reply, system in pushes:
        if batch_id == "d" and priority < 0:  # a background batch among them
            priority = BACKGROUND_PRIORITY
        priority, deadline, reply = kinds.setdefault(batch_id, (priority, deadline, reply))
        lines[batch_id] = lines.get(batch_id, -1) + 1
        backlog.push(pending(batch_id, lines[batch_id], priority=priority, deadline=deadline,
                             reply=reply, system=system))
    for step in steps:  # revoke a partition or stop a batch now and then
        if step == 0 and backlog:
            backlog.take_batch(backlog.peek().record.batch_id)
    seen: dict[tuple[str, str | None], list[int]] = {}
    left = len(backlog)
    while backlog:
        item = backlog.pop()
        seen.setdefault((item.record.batch_id, item.prefix), []).append(item.record.line)
        left -= 1
        assert len(backlog) == left
    for batch_lines in seen.values():
        assert batch_lines == sorted(batch_lines)
    assert backlog.batches() == [] and list(backlog) == []


def test_lines_that_share_a_system_prompt_leave_together() -> None:
    backlog = Backlog()
    for line, system in enumerate(["A", "B", "A", None, "B", "A"]):
        backlog.push(pending("b", line, system=system))
    backlog.push(pending("other", 0, system="A"))
    popped = [(p.record.batch_id, p.record.line) for p in (backlog.pop() for _ in range(7))]
    # batches still take turns; within one, prefix A (seen first), then B, then the rest
    assert popped == [("b", 0), ("other", 0), ("b", 2), ("b", 5), ("b", 1), ("b", 4),
                      ("b", 3)]
    in_order = Backlog(prefix_order=False)  # MILLRACE_WORKER_PREFIX_ORDER=false
    for line, system in enumerate(["A", "B", "A", None]):
        in_order.push(pending("b", line, system=system))
    assert [in_order.pop().record.line for _ in range(4)] == [0, 1, 2, 3]


def test_the_prefix_key_is_the_system_prompt_or_the_instructions() -> None:
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert prefix_key({"messages": system}) == "Be brief."
    developer = [{"role": "developer", "content": "Rules"}, {"role": "user", "content": "x"}]
    assert prefix_key({"messages": developer}) == "Rules"
    assert prefix_key({"messages": [{"role": "user", "content": "Hi"}]}) is None
    assert prefix_key({"input": "x", "instructions": "Answer in French."}) == (
        "Answer in French.")
    assert prefix_key({"prompt": "x"}) is None
    assert prefix_key({"messages": "not a list"}) is None


def test_revoked_partitions_and_stopped_batches_leave_the_backlog() -> None:
    backlog = Backlog()
    for line in range(4):
        backlog.push(pending("a", line, partition=line % 2))
    backlog.push(pending("b", 0, partition=1))
    assert backlog.drop({("t", 1)}) == 3
    assert [p.record.line for p in backlog] == [0, 2]
    assert [p.record.line for p in backlog.take_batch("a")] == [0, 2]
    assert len(backlog) == 0 and backlog.batches() == []


def test_commit_stops_at_the_first_unfinished_line() -> None:
    offsets = PartitionOffsets()
    assert offsets.committable() is None  # nothing read: nothing to commit
    for offset in (10, 11, 12, 13):
        offsets.received(offset)
    offsets.finished(12)
    offsets.finished(13)
    assert offsets.committable() == 10  # 10 and 11 still run: a crash redoes them
    offsets.finished(10)
    assert offsets.committable() == 11
    offsets.finished(11)
    assert offsets.committable() == 14  # all done: one past the last line read


def test_budget_limits_requests_and_tokens_but_never_starves() -> None:
    budget = Budget(max_requests=3, max_tokens=100)
    assert budget.fits(500)  # an idle engine takes even an oversized request
    budget.take(1, 60)
    assert budget.fits(40) and not budget.fits(41)
    budget.take(2, 40)
    assert not budget.fits(1)
    budget.release(1)
    budget.release(1)  # a second release of the same ticket changes nothing
    assert budget.requests == 1 and budget.tokens == 40
    budget.take(3, 10)
    budget.take(4, 10)
    assert not budget.fits(0)  # three requests in flight


def test_token_cost_counts_completion_times_n_plus_a_prompt_estimate() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 10, "n": 2}
    assert token_cost(body, 256) == len(str(body["messages"])) // 4 + 20
    assert token_cost({"prompt": ""}, 256) == 256
    assert token_cost({"prompt": "", "max_completion_tokens": 7, "max_tokens": 9}, 256) == 7


def test_a_batch_spreads_evenly_over_partitions() -> None:
    routes = [request_route("batch_abc", line, shards=8, partitions=8) for line in range(80)]
    partitions = [p for _, p in routes]
    assert sorted(set(partitions)) == list(range(8))
    assert all(partitions.count(p) == 10 for p in range(8))
    assert routes[0][0] == "batch_abc:0" and routes[9][0] == "batch_abc:1"
    # fewer shards than partitions: consecutive partitions from a per-batch start
    assert len({request_route("b", line, 2, 8)[1] for line in range(10)}) == 2
