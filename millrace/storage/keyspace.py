"""Every Redis key millrace uses, in one place. All start with the topic prefix (namespace).

| key | type | written by | what |
|---|---|---|---|
| `key:<sha256>` | hash | gateway, `up`, `keys` | an API key's project, admin, rpm, limits |
| `rate:<sha256>:<minute>` | string | gateway | requests of a key in one minute |
| `file:<id>` | hash | gateway, sink | FileObject, project, store path |
| `files:<project>` | zset | gateway, sink | a project's files by creation |
| `file-expiry` | zset | gateway, sink | file id → its `expires_at` (deleted after it) |
| `batch:<id>` | hash | gateway (`doc`, `project`, `created`, `line_key`), aggregator ¹ | Batch |
| `batches:<project>` | zset | gateway | a project's batches by creation |
| `active` | set | gateway, aggregator, sink | batches whose `finished` the sink has not taken yet |
| `deadlines` | zset | gateway, aggregator | active batch → `expires_at` |
| `done:<batch>` | bitmap | sink | input lines that have a result line in the sink's spool |
| `done-new:<token>` | bitmap | sink | a poll's new lines of a batch, OR-ed into `done:<batch>` |
| `sink-from:<topic>:<p>` | zset | sink | unfinished batch → its first offset on partition p |
| `explode:<batch>` | hash | gateway | how far an explode got (lines acknowledged, broker id) |
| `owner:<group>:<p>` | string | sink, gateway | partition p's owner epoch (`ownership.py`) |
| `stream:<batch>` | hash | gateway | an open stream: endpoint, project, token, expected, total |
| `stream-ids:<batch>` | hash | gateway | custom_id → message that claimed it |
| `stream-rejected:<batch>` | set | gateway | messages of the batch that became no line |
| `webhook-endpoints:<project>` | hash | gateway | endpoint id → WebhookEndpoint |
| `whd:<id>` | hash | sink | a webhook delivery (one per event and target) |
| `whd-body:<id>`, `whd-attempts:<id>` | string, list | sink | its body, its attempts |
| `whd-due` | zset | sink | delivery → when it is next due |
| `whd-batch:<batch>` | zset | sink | a batch's deliveries |
| `expiry-tick` | string | aggregator | lease: one aggregator a second looks for due batches |
| `janitor` | string | sink | lease: one sink at a time deletes expired files |
| `task:<id>` | hash | gateway | a PromptLoop task: project, latest version, `v<n>` each version |
| `tasks:<project>` | zset | gateway | a project's tasks by creation |
| `rate:<sha256>:<route>:<min>` | string | gateway | requests of a key to a route in a minute |
| `reply:<batch>` | list | sink | output lines of a batch someone waits on (10 min) |
| `ext:<batch>` | string | gateway | a PromptLoop or PLai batch's own fields (name, task, URLs) |
| `enqueued:<model>` | hash | gateway | batch → project, priority, estimated tokens (admission) |

¹ `agg` (its state), `state` (the Batch fields it owns) and the state's version, `agg_epoch`,
`agg_offset`, `agg_final` (the fence: `Store.save_aggregate`). `line_key` signs the batch's
line tickets (`records.line_ticket`); a stream's `token` is its ingest token. A batch its
owner deleted keeps only `deleted` (when), for 7 days: `Store.delete_batch`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keyspace:
    namespace: str

    def _k(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    def api_key(self, key_hash: str) -> str:
        return self._k("key", key_hash)

    def rate(self, key_hash: str, minute: int) -> str:
        return self._k("rate", key_hash, str(minute))

    def route_rate(self, key_hash: str, route: str, minute: int) -> str:
        return self._k("rate", key_hash, route, str(minute))

    def task(self, task_id: str) -> str:
        return self._k("task", task_id)

    def tasks(self, project: str) -> str:
        return self._k("tasks", project)

    def reply(self, batch_id: str) -> str:
        return self._k("reply", batch_id)

    def ext(self, batch_id: str) -> str:
        return self._k("ext", batch_id)

    def enqueued(self, model: str) -> str:
        return self._k("enqueued", model)

    def file(self, file_id: str) -> str:
        return self._k("file", file_id)

    def files(self, project: str) -> str:
        return self._k("files", project)

    @property
    def file_expiry(self) -> str:
        return self._k("file-expiry")

    def batch(self, batch_id: str) -> str:
        return self._k("batch", batch_id)

    def batches(self, project: str) -> str:
        return self._k("batches", project)

    @property
    def active(self) -> str:
        return self._k("active")

    @property
    def deadlines(self) -> str:
        return self._k("deadlines")

    def done(self, batch_id: str) -> str:
        return self._k("done", batch_id)

    def done_new(self, token: str) -> str:
        return self._k("done-new", token)

    def sink_from(self, topic: str, partition: int) -> str:
        return self._k("sink-from", topic, str(partition))

    def owner(self, group: str, partition: int) -> str:
        return self._k("owner", group, str(partition))

    def explode(self, batch_id: str) -> str:
        return self._k("explode", batch_id)

    def stream(self, batch_id: str) -> str:
        return self._k("stream", batch_id)

    def stream_ids(self, batch_id: str) -> str:
        return self._k("stream-ids", batch_id)

    def stream_rejected(self, batch_id: str) -> str:
        return self._k("stream-rejected", batch_id)

    def webhook_endpoints(self, project: str) -> str:
        return self._k("webhook-endpoints", project)

    def delivery(self, delivery_id: str) -> str:
        return self._k("whd", delivery_id)

    def delivery_body(self, delivery_id: str) -> str:
        return self._k("whd-body", delivery_id)

    def delivery_attempts(self, delivery_id: str) -> str:
        return self._k("whd-attempts", delivery_id)

    @property
    def deliveries_due(self) -> str:
        return self._k("whd-due")

    def batch_deliveries(self, batch_id: str) -> str:
        return self._k("whd-batch", batch_id)

    @property
    def expiry_tick(self) -> str:
        return self._k("expiry-tick")

    @property
    def janitor(self) -> str:
        return self._k("janitor")
