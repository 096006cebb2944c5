"""Batch jobs that gateways take from `<prefix>.batch-events` (group `<prefix>.gateway-jobs`):

- `created` (a file batch): **explode** — fetch the input file first if the batch named it
  by URL (`input_url`), validate every line, then enqueue each line not yet enqueued or
  finished (a line with link inputs once their pages are fetched — each URL once per
  batch, kept in `links/<batch>.json` for a re-drive — or as its `fetch_failed` error
  line), recording how far it got (`explode:<batch>`: lines acknowledged, with the
  broker's cluster id) every `CHECKPOINT_LINES`; publish `validated` (or
  `validation_failed`). An explode that completed on this broker is not done again; on a
  new broker (its data lost: `created` comes again from `resume`) it enqueues every line
  that has no result yet.
- `fill_requested`: **fill** — an error line (`batch_cancelled` / `batch_expired`) for every
  line that has no result yet, then `filled`; a stream batch is closed first.
- `redrive_requested`: **re-drive** — enqueue again every line that has no result yet.
- `finished`: what a batch needed while it ran is removed (a stream batch's persisted lines
  and ledger, the explode checkpoint).

Jobs run beside the consume loop, each batch's in the order of its events and different
batches' side by side (`JOBS_AT_ONCE` at a time). A fetch (an input file by URL, link
inputs) gives up its job slot while it waits and takes one of its project's
`FETCHES_PER_PROJECT` instead, so a slow or hostile server delays only the batches of the
project that named it; every fetch ends at its deadline (`millrace/fetch.py`).

A job's offset is committed only once it and every job before it on its partition are done,
so a gateway that dies mid-job leaves it to the next owner of the partition (another
gateway, or itself restarted), which does it again: lines already acknowledged in the same
broker are skipped, lines that have a result are skipped, and a line enqueued twice is
still written once (the sink keeps one result per custom_id). A job that meets an outage
(broker, Redis) waits and tries again; one that cannot be done (a missing input file, a
fetch that failed) fails the batch. An input file fetched by URL becomes a file of the
project only once it validated: a page that is not a batch is never stored.

A gateway does a partition's jobs only while it owns the partition (its owner epoch,
`millrace/storage/ownership.py`): a job checks before each chunk it enqueues and before each event
it publishes, and the explode checkpoint is written only by the owner (checked and written
in one step). A gateway that froze or was cut off while another took the partition over
drops the job where it is; the new owner does it.
"""
