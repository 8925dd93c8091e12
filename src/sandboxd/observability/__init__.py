"""Prometheus metrics of a sandboxd node: events counted where they happen (:mod:`.events`),
state read at scrape time (:mod:`.collector`), served on ``GET /metrics`` (:mod:`.endpoint`)."""
