"""orderbus daemon: the process, its CLI, settings, HTTP server and local tooling."""
