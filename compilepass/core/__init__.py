"""The lowest layer: errors, atomic writes, process lifetime (owner tags, death signals), the
environment key, paths, model shapes and presets, the workload description. Imports nothing else
of compilepass."""
