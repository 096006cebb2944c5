"""streams: the Faust aggregator — per-batch counts, status machine, transition events."""
