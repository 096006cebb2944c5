"""The one storage seam: every Redis key millrace uses is read and written through this
package, and its Redis client is private to it (a layering test keeps it so).

- `store`: the read model every service shares (API keys, files, batches, webhook
  endpoints, the aggregator's state, active batches and their deadlines, done lines).
- `keyspace`: every key family, with the owner that may write it.
- `ownership`: owner epochs, so a consumer that froze changes nothing its successor did.
- `deliveries`: webhook deliveries and their attempts.
- `ledger`: a stream batch's accepted lines (the gateway's ingest stage).
- `tasks`: PromptLoop tasks.
"""
