"""The `millrace` command and the tools around the services (floor 3): the launcher
(`millrace up`, embedded broker and Redis), the terminal client, benchmarks, chaos and
scale-out scenarios, and the recovery commands. The only package that imports services;
nothing imports it."""

# `millrace <command>` of each service, and the package whose `main` starts it (`python -m`)
SERVICES = {"gateway": "gateway", "worker": "gpu_consumer", "aggregator": "streams",
            "sink": "sink"}
