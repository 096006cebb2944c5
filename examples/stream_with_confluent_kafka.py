"""Stream requests into millrace and read responses with nothing but confluent-kafka and
an HTTP client: what any Kafka client (kcat, Java, Go) would do.

    python examples/stream_with_confluent_kafka.py .millrace/endpoints.json sk-...
"""

import json
import sys
import uuid

import httpx
from confluent_kafka import Consumer, Producer


def main(endpoints_path: str, api_key: str) -> None:
    with open(endpoints_path) as f:
        endpoints = json.load(f)
    base, bootstrap = endpoints["base_url"], endpoints["kafka_bootstrap"]
    prefix = endpoints["topic_prefix"]
    model = next(iter(endpoints["models"]))
    auth = {"Authorization": f"Bearer {api_key}"}

    # 1. open a stream batch over HTTP
    batch = httpx.post(f"{base}/batches", headers=auth, json={
        "input": "stream", "endpoint": "/v1/chat/completions", "completion_window": "24h",
    }).json()

    # 2. produce OpenAI batch lines to <prefix>.ingest, key = batch id (any partitioner),
    #    each with the batch's ingest token (given once, in the create answer)
    token = {"millrace-ingest-token": batch["ingest_token"]}
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all",
                         "enable.idempotence": True})
    questions = ["What is the capital of France?", "Name a colour.", "Say hello."]
    for i, question in enumerate(questions):
        line = {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": model, "max_tokens": 32, "temperature": 0,
                         "messages": [{"role": "user", "content": question}]}}
        producer.produce(f"{prefix}.ingest", key=batch["id"], value=json.dumps(line),
                         headers=token)
    producer.flush()

    # 3. seal with the number of messages produced: millrace closes the batch once it has
    #    processed all of them, whichever partitions they landed on
    httpx.post(f"{base}/batches/{batch['id']}/seal", headers=auth,
               json={"total": len(questions)}).raise_for_status()

    # 4. read the responses from <prefix>.responses, correlating by the batch_id header
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"example-{uuid.uuid4()}",
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([f"{prefix}.responses"])
    got: dict[str, str] = {}
    while len(got) < len(questions):
        msg = consumer.poll(1.0)
        if msg is None or msg.error():
            continue
        if dict(msg.headers() or []).get("batch_id") != batch["id"].encode():
            continue
        record = json.loads(msg.value())
        got[record["custom_id"]] = record["body"]["choices"][0]["message"]["content"]
        print(record["custom_id"], "→", got[record["custom_id"]])
    consumer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
