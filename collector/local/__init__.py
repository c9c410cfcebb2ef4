"""Servers on this machine outside production: for the tests, the benchmarks, `make run` and `make demo`.

`servers` (start a private Redis or PostgreSQL), `services` (the `collector services` command),
`stack` (which `make run` / `make demo` stack runs: what operator commands and `collector status` read).
"""
