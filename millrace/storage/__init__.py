"""The one storage seam: every Redis key millrace uses is read and written through this
package, and its Redis client is private to it (a layering test keeps it so).

- `store`: the read model every service shares: batches, the aggregator's state, active
  batches and their deadlines, leases, replies, webhook endpoints; with its halves
  `principals` (API keys), `files` (files and their expiry) and `done` (which lines of a
  batch have a result).
- `scans`: whole-keyspace reads for recovery.
- `keyspace`: every key family, with the owner that may write it.
- `ownership`: owner epochs, so a consumer that froze changes nothing its successor did.
- `deliveries`: webhook deliveries and their attempts.
- `ledger`: a stream batch's accepted lines (the gateway's ingest stage).
- `tasks`: PromptLoop tasks.
"""
