"""The `millrace` command: `up` (everything) or one service / component alone."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from setproctitle import setproctitle

from millrace import logs
from millrace.errors import MillraceError, SettingsError
from millrace.settings import BUNDLED_CHAT_MODEL, Settings, service_links


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="millrace", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--data-dir", type=Path, help="MILLRACE_DATA_DIR")
        p.add_argument("--log-level", help="MILLRACE_LOG_LEVEL")
        return p

    up = common(sub.add_parser("up", help="start broker, Redis and every service"))
    up.add_argument("--port", type=int, help="gateway port (MILLRACE_PORT)")
    up.add_argument("--engine", choices=["vllm", "echo"], help="MILLRACE_ENGINE")
    up.add_argument("--model", help="served models (MILLRACE_MODEL)")
    up.add_argument("--replicas", help="instances per service, each in its own data dir as on "
                                       "separate hosts: gateway=2,worker=2,aggregator=2,sink=2 "
                                       "(MILLRACE_REPLICAS)")
    gateway = common(sub.add_parser("gateway", help="the HTTP API"))
    gateway.add_argument("--host", help="MILLRACE_HOST")
    gateway.add_argument("--port", type=int, help="MILLRACE_PORT")
    worker = common(sub.add_parser("worker", help="gpu_consumer: inference worker"))
    worker.add_argument("--engine", choices=["vllm", "echo"], help="MILLRACE_ENGINE")
    worker.add_argument("--model", help="served models (MILLRACE_MODEL)")
    common(sub.add_parser("aggregator", help="streams: batch statuses and expiry"))
    common(sub.add_parser("sink", help="output/error file assembly"))
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


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for flag in ("data_dir", "log_level", "port", "host", "engine", "model", "replicas"):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[flag] = value
    return Settings.load(**overrides)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    setproctitle(" ".join(["millrace", *(argv if argv is not None else sys.argv[1:])]))
    if args.command == "broker":
        _broker(args.port)
        return
    if args.command == "schemas":
        from millrace.schemas import topic_schemas

        print(json.dumps(topic_schemas(), indent=2))
        return
    try:
        settings = _settings(args)
    except SettingsError as exc:
        _refuse(exc)
    logs.configure(settings)
    if links := service_links():
        logging.getLogger("millrace").warning(
            "ignoring %s: Kubernetes service links, not settings (set enableServiceLinks: "
            "false in the pod spec to drop them)", ", ".join(links))
    handler = {
        "up": _up, "gateway": _gateway, "worker": _worker, "aggregator": _aggregator,
        "sink": _sink, "redis": _redis, "keys": _keys, "bench": _bench, "rebuild": _rebuild,
        "resume": _resume, "chaos": _chaos, "submit": _submit, "batches": _batches,
    }[args.command]
    try:
        sys.exit(handler(settings, args) or 0)
    except SettingsError as exc:
        _refuse(exc)
    except MillraceError as exc:
        logging.getLogger("millrace").error("%s", exc)
        sys.exit(getattr(exc, "exit_code", 1))


def _refuse(exc: SettingsError) -> NoReturn:
    """A bad setting: one line on stderr and exit code 2, as for a bad command line."""
    print(f"millrace: {exc}", file=sys.stderr)
    sys.exit(2)


def _up(settings: Settings, args: argparse.Namespace) -> int:
    from millrace.up.launcher import up

    return up(settings, lambda line: print(line, flush=True))


def _gateway(settings: Settings, args: argparse.Namespace) -> None:
    if settings.gateway_metrics_dir is not None:
        # prometheus-client picks its multiprocess mode from this variable when first
        # imported: set it before anything imports it
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(settings.gateway_metrics_dir)
    import uvicorn

    from gateway.app import create_app
    from gateway.http_limits import LimitedHttpProtocol

    # Several gateways may serve one port: each binds it with SO_REUSEPORT and the kernel
    # spreads the connections over them.
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(2048)
    # The socket object itself, not its fd: uvicorn wraps a bare fd as AF_UNIX, and the event
    # loop then leaves Nagle on — headers and body go out as two segments and the second waits
    # for the client's delayed ACK (p50 56 ms at 200 connections with the CPU half idle).
    # asyncio's own loop, not uvloop: under 200 busy connections uvloop served 3-5 % of the
    # requests 0.3-1.5 s late (p99 650-770 ms on one gateway, the loop never stalled over
    # 45 ms); asyncio's p99 was 76 ms at 6 % fewer requests/s. The collector: everything
    # imported is frozen out of it and the young generation collected every 100,000
    # allocations instead of 2,000 (p99 116 -> 68 ms with two gateways).
    config = uvicorn.Config(create_app(settings), loop="asyncio",
                            log_level=settings.log_level.lower(), access_log=False,
                            http=LimitedHttpProtocol, backlog=2048, proxy_headers=False,
                            server_header=False,
                            # JSON lines: uvicorn's loggers go through ours, not its own
                            log_config=None if settings.log_format == "json" else
                            uvicorn.config.LOGGING_CONFIG)
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(3)  # as uvicorn.run: the app did not start


def _worker(settings: Settings, args: argparse.Namespace) -> None:
    from gpu_consumer.main import run_worker

    run_worker(settings)


def _aggregator(settings: Settings, args: argparse.Namespace) -> None:
    from streams.app import run

    run(settings)


def _sink(settings: Settings, args: argparse.Namespace) -> None:
    from sink.service import Sink

    asyncio.run(Sink(settings).run())


def _broker(port: int) -> None:
    from millrace.up import embedded

    port = port or embedded.free_port()
    print(f"millrace broker: 127.0.0.1:{port}", flush=True)
    os.execv(embedded.tansu_binary(), embedded.broker_argv(port))


def _redis(settings: Settings, args: argparse.Namespace) -> None:
    from millrace.up import embedded

    port = args.port or embedded.free_port()
    print(f"millrace redis: redis://127.0.0.1:{port}/0", flush=True)
    os.execv(embedded.redis_binary(), embedded.redis_argv(port, settings.data_dir / "redis"))


def _bench(settings: Settings, args: argparse.Namespace) -> None:
    from millrace.bench import streaming as bench

    if args.api:
        from millrace.bench import api

        measured = api.run(settings.gateways, args.connections, args.seconds)
        print(api.table(measured))
        print(f"saved {api.save(measured, args.results)}")
        return
    if not args.streaming:
        from millrace.bench import batch as batch_bench

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

    from streams.rebuild import rebuild

    print(json.dumps(asdict(asyncio.run(rebuild(_with_endpoints(settings, "rebuild"))))))


def _resume(settings: Settings, args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from streams.resume import resume

    resumed = asyncio.run(resume(_with_endpoints(settings, "resume"), reseed=args.reseed))
    print(json.dumps(asdict(resumed)))


def _chaos(settings: Settings, args: argparse.Namespace) -> int:
    import tempfile

    from millrace.up.chaos import EVERY_FAULT, FAULTS, chaos, table

    data_dir = Path(tempfile.mkdtemp(prefix="millrace-chaos-"))
    if args.scale_out:
        from millrace.up import scale_out

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
    from millrace import terminal

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
    from millrace import terminal

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
    from millrace import terminal

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
    from millrace.store import Principal, new_api_key

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
