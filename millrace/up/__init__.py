"""`millrace up`: the embedded deployment (launcher, embedded broker and Redis, readiness)."""
