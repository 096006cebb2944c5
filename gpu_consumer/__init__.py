"""gpu_consumer: reads requests from Kafka, runs them through the engine, writes responses."""
