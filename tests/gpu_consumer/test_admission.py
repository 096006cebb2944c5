"""The worker's bookkeeping without Kafka: fair-share order, in-flight limits, and which
offset may be committed when lines finish out of order."""

from __future__ import annotations

from gpu_consumer.admission import Backlog, Budget, PartitionOffsets, Pending, token_cost
from millrace.records import RequestRecord, read_request
from millrace.topics import request_route


def pending(batch_id: str, line: int, offsets: PartitionOffsets | None = None,
            partition: int = 0) -> Pending:
    record = read_request(RequestRecord(
        batch_id=batch_id, project="p", custom_id=f"{batch_id}-{line}", line=line,
        url="/v1/chat/completions", body={"model": "m"}).dumps())
    return Pending(record, "t", partition, line, offsets or PartitionOffsets(), 1)


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
