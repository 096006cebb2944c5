"""The tests mirror the tree: every code module has `tests/<package>/…/test_<module>.py`, or
is listed here with where its behaviour is tested instead (a test module that exists) and
why it has no module of its own, or why the suite does not run it at all. A new module
without either fails this test, and so does an entry here that has since got its own test
module."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("millrace", "gateway", "gpu_consumer", "streams", "sink", "ops")

# module → (the test module that covers it, or None, and why it has none of its own)
ELSEWHERE: dict[str, tuple[str | None, str]] = {
    # wiring: every HTTP test goes through it
    "gateway/app.py": ("tests/gateway/test_hardening.py", "the app's assembly"),
    "gateway/context.py": ("tests/gateway/test_endpoints.py", "the per-process handles"),
    "gateway/api/deps.py": ("tests/gateway/api/test_auth.py", "route dependencies"),
    "gateway/api/errors.py": ("tests/gateway/test_conformance.py",
                              "the error envelope of every refusal"),
    "gateway/api/http_metrics.py": ("tests/millrace/test_metrics.py", "per-route metrics"),
    "gateway/api/openapi.py": ("tests/gateway/test_schemathesis.py",
                               "the schema schemathesis drives the API from"),
    "gateway/api/routes/admin.py": ("tests/gateway/api/test_auth.py", "key minting"),
    "gateway/api/routes/docs.py": ("tests/gateway/api/routes/test_dashboard.py",
                                   "the docs pages, in the browser"),
    "gateway/api/routes/health.py": ("tests/gateway/test_hardening.py", "liveness"),
    "gateway/api/routes/metrics.py": ("tests/millrace/test_metrics.py", "the scrape"),
    "gateway/api/routes/models.py": ("tests/gpu_consumer/test_lora.py",
                                     "the served models, adapters included"),
    "gateway/jobs/base.py": ("tests/gateway/jobs/test_consumer.py",
                             "the jobs' fencing and checkpoints"),
    "gateway/jobs/explode.py": ("tests/gateway/jobs/test_consumer.py",
                                "the explode, by the partition's owner only"),
    "gateway/main.py": ("tests/millrace/test_service.py", "a service's start"),
    "gpu_consumer/main.py": ("tests/millrace/test_service.py", "a service's start"),
    "streams/main.py": ("tests/millrace/test_service.py", "a service's start"),
    "sink/main.py": ("tests/millrace/test_service.py", "a service's start"),
    "gpu_consumer/engine.py": ("tests/gpu_consumer/test_echo.py",
                               "the engine protocol, through both engines"),
    "gpu_consumer/models.py": ("tests/gpu_consumer/test_vllm_engine.py",
                               "the bundled models, prepared before vLLM loads them"),
    "millrace/client.py": ("tests/gateway/test_ingest.py", "stream batches through Kafka"),
    "millrace/records/ingest.py": ("tests/gateway/test_ingest.py", "declarations"),
    "millrace/records/registry.py": ("tests/millrace/test_registry.py", "declarations"),
    "millrace/records/workers.py": ("tests/gateway/test_worker_board.py", "declarations"),
    # the tools: run as a user runs them
    "ops/cli.py": ("tests/ops/test_terminal.py", "the `millrace` commands, run"),
    "ops/embedded.py": ("tests/ops/test_launcher.py", "the embedded broker and Redis"),
    "ops/chaos.py": ("tests/chaos/test_faults.py", "the scenarios, run by tests/chaos"),
    "ops/network.py": ("tests/chaos/test_network.py", "partitions in a network namespace"),
    "ops/scale_out.py": ("tests/chaos/test_scale_out.py", "replicas of every service"),
    "ops/bench/costs.py": ("tests/ops/bench/test_batch.py",
                           "each service's CPU and memory, measured during a batch"),
    # not run by the suite, and why
    "ops/bench/api.py": (None, "drives wrk against replicated gateways for 30 s: a "
                               "benchmark that `millrace bench --api` runs"),
    "ops/bench/vllm_offline.py": (None, "a second vLLM engine beside the session's: over "
                                        "the suite's CPU budget; `millrace bench` runs it"),
    "ops/bench/vllm_run_batch.py": ("tests/gpu_consumer/test_vllm_engine.py",
                                    "vLLM's own run_batch, which that test runs"),
}


def modules() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name not in ("__init__.py", "__main__.py"):
                found.append(str(path.relative_to(ROOT)))
    return found


def mirror(module: str) -> Path:
    path = Path(module)
    return ROOT / "tests" / path.parent / f"test_{path.name}"


def test_every_module_has_its_own_test_module_or_says_where_it_is_tested() -> None:
    without = {m for m in modules() if not mirror(m).exists()}
    assert without - set(ELSEWHERE) == set(), "modules with no test module and no entry"
    assert set(ELSEWHERE) - without == set(), "entries whose module has its own test now"
    for module, (where, why) in ELSEWHERE.items():
        assert where is None or (ROOT / where).is_file(), f"{module}: no {where}"
        assert why


def test_the_check_sees_a_module_without_a_test() -> None:
    assert "gateway/outputs.py" in modules() and mirror("gateway/outputs.py").exists()
    assert not mirror("gateway/app.py").exists()  # listed above, so allowed
