"""`quill bench`: a load generator for any OpenAI-compatible server.

`workload` makes the requests, `client` sends them (a concurrency level or a Poisson rate at a
time) and times what the client sees, `report` turns the results into per-level numbers, a table
and JSON, `plots` draws them, `servers` starts a server to measure, and `command` ties it together.
"""
