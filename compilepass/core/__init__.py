"""The lowest layer: errors, atomic writes, the environment key, paths, model shapes and presets,
the workload description. Imports nothing else of compilepass."""
