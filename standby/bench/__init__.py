"""Benchmarks that are also commands: ``compilepass bench context`` (:mod:`~compilepass.standby.bench.context`)."""
