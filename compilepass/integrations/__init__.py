"""Integrations with other training stacks (each imports its stack lazily: ``compilepass.integrations.trl``)."""
