"""Resilience policies: deadlines, retries and their budget, breakers, outlier detection, faults,
bulkheads and rate limits. Each is plain, synchronous, IO-free code testable without a socket."""
