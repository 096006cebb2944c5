"""The `millrace` command: `up` (everything) or one service / component alone."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from importlib import import_module
from pathlib import Path
from typing import Any

from setproctitle import setproctitle

from millrace import service
from millrace.errors import SettingsError
from millrace.settings import BUNDLED_CHAT_MODEL, Settings
from ops import SERVICES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="millrace", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    common = service.common_flags

    up = common(sub.add_parser("up", help="start broker, Redis and every service"))
    up.add_argument("--port", type=int, help="gateway port (MILLRACE_PORT)")
    up.add_argument("--engine", choices=["vllm", "echo"], help="MILLRACE_ENGINE")
    up.add_argument("--model", help="served models (MILLRACE_MODEL)")
    up.add_argument("--replicas", help="instances per service, each in its own data dir as on "
                                       "separate hosts: gateway=2,worker=2,aggregator=2,sink=2 "
                                       "(MILLRACE_REPLICAS)")
    for command, module in SERVICES.items():
        started = import_module(f"{module}.main")
        started.flags(common(sub.add_parser(command, help=started.HELP)))
    broker = sub.add_parser("broker", help="the embedded Kafka-protocol broker (tansu)")
    broker.add_argument("--port", type=int, default=0, help="0 = a free port")
    redis = common(sub.add_parser("redis", help="the embedded redis-server"))
    redis.add_argument("--port", type=int, default=0, help="0 = a free port")
    bench = common(sub.add_parser(
        "bench", help="vLLM direct vs the pipeline on one file (starts its own deployments)"))
    bench.add_argument("--streaming", action="store_true",
                       help="instead: produce→response latency of single streamed requests "
                            "against the running deployment in --data-dir")
    bench.add_argument("--requests", type=int, default=30,
                       help="single requests of the streaming measurement")
    bench.add_argument("--scheduling", action="store_true",
                       help="prefix-aware vs file order, and an urgent batch with and without "
                            "priority, on the real engine")
    bench.add_argument("--api", action="store_true",
                       help="instead: GET /v1/batches/{id} under wrk load, 1 vs MILLRACE_GATEWAYS "
                            "gateway processes (starts its own deployments; needs wrk)")
    bench.add_argument("--connections", type=int, default=200, help="--api: open connections")
    bench.add_argument("--seconds", type=int, default=30, help="--api: length of each run")
    bench.add_argument("--lines", type=int,
                       help="chat lines of the compared file (64; --gpu: 2000)")
    bench.add_argument("--max-tokens", type=int, help="32; --gpu: 128")
    bench.add_argument("--ingest-lines", type=int,
                       help="lines of the echo-engine file (ingest rate, orchestration ceiling, "
                            "CPU per request; 50000)")
    bench.add_argument("--no-direct", action="store_true",
                       help="skip vLLM alone (its offline engine and `vllm run-batch`)")
    bench.add_argument("--repeat", type=int,
                       help="runs of each real-engine case, the median kept (3; --gpu: 1)")
    bench.add_argument("--gpu", action="store_true",
                       help="a GPU host: --model name=folder (a local HF folder), the GPU "
                            "build's vLLM defaults, bigger defaults, one worker")
    bench.add_argument("--model", help="served name, or name=folder (default: the bundled "
                                       "chat model)")
    bench.add_argument("--work", type=Path, default=Path("bench/work"),
                       help="inputs, outputs and the deployments' data dirs")
    bench.add_argument("--results", type=Path, default=Path("bench/results"))
    common(sub.add_parser(
        "rebuild", help="restore Redis (batches, files, API keys, webhook endpoints) from Kafka"))
    resume = common(sub.add_parser(
        "resume", help="carry every unfinished batch on after Kafka lost its data"))
    resume.add_argument("--reseed", action="store_true",
                        help="also publish every file, key, endpoint and batch state again")
    chaos = common(sub.add_parser(
        "chaos", help="run a deployment through random kills and restarts, check every line"))
    chaos.add_argument("--rounds", type=int, default=30)
    chaos.add_argument("--engine", choices=["vllm", "echo"], default="echo")
    chaos.add_argument("--lines", type=int,
                       help="lines per round's batch (5000; --scale-out: 2000)")
    chaos.add_argument("--seed", type=int, help="for the same faults at the same moments")
    chaos.add_argument("--faults", help="comma-separated (default: sigterm-all, "
                                        "sigkill-all, kill-<part>, pause); also "
                                        "partition-worker, partition-sink, "
                                        "partition-gateway (spread over hosts; root) and "
                                        "disk-full")
    chaos.add_argument("--replicas", help="instances per service, as `up --replicas` takes "
                                          "them (sink=2,aggregator=2: a paused owner's "
                                          "partitions move to the other instance)")
    chaos.add_argument("--scale-out", action="store_true",
                       help="instead: `up --replicas` with two of every service; a sink, an "
                            "aggregator and a gateway lost mid-batch with their disks, then a "
                            "host with one more of each joins and leaves; checks every line "
                            "and the webhooks, prints the rebalance pauses (file store: "
                            "MILLRACE_FILE_STORE_URL)")
    sub.add_parser("schemas", help="print the JSON schema of every record on the public topics")

    def client(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        common(p)
        p.add_argument("--base-url", help="the gateway, e.g. http://host:8000/v1 "
                                          "(MILLRACE_BASE_URL, OPENAI_BASE_URL)")
        p.add_argument("--api-key", help="MILLRACE_API_KEY, OPENAI_API_KEY")
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
        return p

    submit = client(sub.add_parser("submit", help="upload a JSONL file and create a batch"))
    submit.add_argument("file", type=Path, nargs="?", help="a JSONL file of OpenAI batch lines")
    submit.add_argument("--task", help="instead: run this PromptLoop task over --csv rows")
    submit.add_argument("--csv", type=Path, help="with --task: one data row per CSV row, "
                                                 "inputs from the columns named like its slots")
    submit.add_argument("--uuid-column", default="data_uuid",
                        help="with --task: the CSV column that names each row")
    submit.add_argument("--endpoint", help="default: the lines' own url")
    submit.add_argument("--model", help="set every line's body.model")
    submit.add_argument("--window", default="24h", help="completion window")
    submit.add_argument("--wait", action="store_true",
                        help="show progress until it ends, then download its files")
    submit.add_argument("--out", type=Path, default=Path("."), help="where --wait downloads")
    batches = sub.add_parser("batches", help="list, show, watch, cancel, retry, download")
    batches_sub = batches.add_subparsers(dest="batches_command", required=True)
    listed = client(batches_sub.add_parser("ls", help="the newest batches"))
    listed.add_argument("--limit", type=int, default=20)
    for name, what in (("show", "one batch"), ("watch", "a progress bar until it ends"),
                       ("cancel", "cancel a batch"),
                       ("retry", "a new batch of a finished batch's failed lines"),
                       ("download", "its output and error files")):
        one = client(batches_sub.add_parser(name, help=what))
        one.add_argument("batch_id")
        if name in ("watch", "download"):
            one.add_argument("--out", type=Path, default=Path("."))
        if name == "retry":
            one.add_argument("--custom-id", action="append", dest="custom_ids",
                             help="only this failed line (repeatable)")
    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = common(keys_sub.add_parser("create", help="mint a key for a project"))
    create.add_argument("--project", required=True)
    create.add_argument("--admin", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SERVICES:
        # a service starts from its own main, as `python -m <package>` starts it
        import_module(f"{SERVICES[argv[0]]}.main").main(argv[1:])
    args = _parser().parse_args(argv)
    setproctitle(" ".join(["millrace", *argv]))
    if args.command == "broker":
        _broker(args.port)
        return
    if args.command == "schemas":
        from millrace.schemas import topic_schemas

        print(json.dumps(topic_schemas(), indent=2))
        return
    settings = service.configure(args)
    handler = {
        "up": _up, "redis": _redis, "keys": _keys, "bench": _bench, "rebuild": _rebuild,
        "resume": _resume, "chaos": _chaos, "submit": _submit, "batches": _batches,
    }[args.command]
    service.finish(lambda: handler(settings, args))


def _up(settings: Settings, args: argparse.Namespace) -> int:
    from ops.launcher import up

    return up(settings, lambda line: print(line, flush=True))


def _broker(port: int) -> None:
    from ops import embedded

    port = port or embedded.free_port()
    print(f"millrace broker: 127.0.0.1:{port}", flush=True)
    os.execv(embedded.tansu_binary(), embedded.broker_argv(port))


def _redis(settings: Settings, args: argparse.Namespace) -> None:
    from ops import embedded

    port = args.port or embedded.free_port()
    print(f"millrace redis: redis://127.0.0.1:{port}/0", flush=True)
    os.execv(embedded.redis_binary(), embedded.redis_argv(port, settings.data_dir / "redis"))


def _bench(settings: Settings, args: argparse.Namespace) -> None:
    from ops.bench import streaming as bench

    if args.api:
        from ops.bench import api

        measured = api.run(settings.gateways, args.connections, args.seconds)
        print(api.table(measured))
        print(f"saved {api.save(measured, args.results)}")
        return
    if args.scheduling:
        from ops.bench import scheduling

        ordered = scheduling.run(args.work, args.model or BUNDLED_CHAT_MODEL,
                                 lines=args.lines or 64, max_tokens=args.max_tokens or 16,
                                 say=lambda text: print(text, file=sys.stderr, flush=True))
        print(scheduling.table(ordered))
        print(f"saved {scheduling.save(ordered, args.results)}")
        return
    if not args.streaming:
        from ops.bench import batch as batch_bench

        given = {"lines": args.lines, "max_tokens": args.max_tokens,
                 "ingest_lines": args.ingest_lines, "repeat": args.repeat}
        changes = {k: v for k, v in given.items() if v is not None}
        changes.update(direct=not args.no_direct, streaming_requests=args.requests)
        plan = (batch_bench.Plan.gpu(**changes) if args.gpu
                else batch_bench.Plan(**changes))
        compared = batch_bench.run(
            settings, args.work, plan, model=args.model or BUNDLED_CHAT_MODEL,
            say=lambda text: print(text, file=sys.stderr, flush=True))
        print(batch_bench.table(compared))
        print(f"saved {batch_bench.save(compared, args.results)}")
        return
    key_file = settings.data_dir / "api_key"
    if settings.api_key is not None:
        api_key = settings.api_key.get_secret_value()
    elif key_file.exists():
        api_key = key_file.read_text().strip()
    else:
        sys.exit("millrace bench: set MILLRACE_API_KEY or run `millrace up` in this data dir")
    result = bench.streaming(settings.data_dir, api_key, requests=args.requests)
    print(bench.table(result))
    print(f"saved {bench.save(result, args.results)}")


def _rebuild(settings: Settings, args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from millrace.recovery import rebuild

    print(json.dumps(asdict(asyncio.run(rebuild(_with_endpoints(settings, "rebuild"))))))


def _resume(settings: Settings, args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from millrace.recovery import resume

    resumed = asyncio.run(resume(_with_endpoints(settings, "resume"), reseed=args.reseed))
    print(json.dumps(asdict(resumed)))


def _chaos(settings: Settings, args: argparse.Namespace) -> int:
    import tempfile

    from ops.chaos import EVERY_FAULT, FAULTS, chaos, table

    data_dir = Path(tempfile.mkdtemp(prefix="millrace-chaos-"))
    if args.scale_out:
        from ops import scale_out

        env = {"MILLRACE_FILE_STORE_URL": settings.file_store_url} if settings.file_store_url \
            else {}
        result = scale_out.run(data_dir, env, lines=args.lines or 2000,
                               say=lambda line: print(line, file=sys.stderr, flush=True))
        print(scale_out.table(result))
        print(f"deployment data dir: {data_dir}")
        return 0 if result.ok else 1
    faults = tuple(args.faults.split(",")) if args.faults else FAULTS
    if unknown := set(faults) - set(EVERY_FAULT):
        raise SystemExit(f"millrace chaos: unknown faults {sorted(unknown)}")
    env = {"MILLRACE_REPLICAS": args.replicas} if args.replicas else {}
    rounds = chaos(data_dir, args.rounds, engine=args.engine, lines=args.lines or 5000,
                   seed=args.seed, faults=faults, env=env,
                   say=lambda line: print(line, file=sys.stderr, flush=True))
    print(table(rounds))
    print(f"deployment data dir: {data_dir}")
    return 0 if all(r.ok for r in rounds) else 1


def _submit(settings: Settings, args: argparse.Namespace) -> int:
    from ops import terminal

    api = terminal.Api.of(settings, args.base_url, args.api_key)
    if (args.task is None) == (args.file is None) or (args.task is None) != (args.csv is None):
        raise terminal.ClientError("give a JSONL FILE, or --task with --csv")
    interrupts = terminal.Interrupts() if args.wait else None
    if args.task is not None:
        batch = terminal.submit_task(api, args.task, args.csv, args.uuid_column)
    else:
        batch = terminal.submit(api, args.file, args.endpoint, args.model, args.window)
    console = terminal.console()
    if interrupts is None:
        _show(console, args.json, batch, f"created {batch['id']} ({batch['status']})")
        return 0
    console.print(f"created {batch['id']}", highlight=False)
    return _finish(api, console, batch["id"], args.out, args.json, interrupts)


def _finish(api: Any, console: Any, batch_id: str, out: Path, as_json: bool,
            interrupts: Any) -> int:
    """Watch a batch to its end, download its files, say where: the exit code."""
    from ops import terminal

    try:
        final = terminal.watch(api, batch_id, console, interrupts,
                               terminal.ask_to_cancel(console))
    except terminal.LeftRunning:
        console.print(f"{batch_id} left running: `millrace batches watch {batch_id}`",
                      highlight=False)
        return 130
    files = terminal.download(api, final, out)
    counts = final.get("request_counts") or {}
    _show(console, as_json, {**final, "downloaded": [str(f) for f in files]},
          f"{final['id']} {final['status']}: {counts.get('completed', 0)} completed, "
          f"{counts.get('failed', 0)} failed" + "".join(f"\n  {f}" for f in files))
    return terminal.exit_code(final)


def _show(console: Any, as_json: bool, data: Any, text: Any) -> None:
    if as_json:
        print(json.dumps(data))
    else:
        console.print(text, highlight=False)


def _batches(settings: Settings, args: argparse.Namespace) -> int:
    from ops import terminal

    api = terminal.Api.of(settings, args.base_url, args.api_key)
    console = terminal.console()
    command = args.batches_command
    if command == "ls":
        page = api.call("GET", f"/batches?limit={args.limit}")
        _show(console, args.json, page["data"], terminal.batches_table(page["data"]))
        return 0
    if command == "watch":
        return _finish(api, console, args.batch_id, args.out, args.json, terminal.Interrupts())
    path = f"/batches/{args.batch_id}"
    if command == "download":
        batch = api.call("GET", path)
        files = terminal.download(api, batch, args.out)
        _show(console, args.json, [str(f) for f in files], "\n".join(map(str, files)))
        return 0
    if command == "cancel":
        batch = api.call("POST", path + "/cancel")
    elif command == "retry":
        body = {"custom_ids": args.custom_ids} if args.custom_ids else None
        batch = api.call("POST", path + "/retry", json=body)
    else:
        batch = api.call("GET", path)
    _show(console, args.json, batch, json.dumps(batch, indent=2))
    return 0


def _keys(settings: Settings, args: argparse.Namespace) -> None:
    from millrace.registry import register_key
    from millrace.storage.principals import Principal, new_api_key

    settings = _with_endpoints(settings, "keys")
    key = new_api_key()
    asyncio.run(register_key(settings, key, Principal(args.project, args.admin)))
    print(json.dumps({"key": key, "project": args.project}))


def _with_endpoints(settings: Settings, command: str) -> Settings:
    """Kafka and Redis from the settings, else from a running `millrace up` in the data dir."""
    endpoints = settings.data_dir / "endpoints.json"
    found = json.loads(endpoints.read_text()) if endpoints.exists() else {}
    settings = settings.with_kafka(
        bootstrap=settings.kafka.bootstrap or found.get("kafka_bootstrap")
    ).model_copy(update={"redis_url": settings.redis_url or found.get("redis_url")})
    if not (settings.kafka.bootstrap and settings.redis_url):
        raise SettingsError(f"millrace {command}: set MILLRACE_KAFKA__BOOTSTRAP and "
                            "MILLRACE_REDIS_URL, or run `millrace up` in this data dir")
    return settings
