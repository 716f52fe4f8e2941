"""One-command teaching experiments. Never imported by the library core."""
