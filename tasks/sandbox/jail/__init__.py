"""Modules that run inside the sandbox: this folder is mounted whole, read-only, into the jail,
where they import each other as top-level modules (standard library only, never the project).
The trusted side imports `wire` and `compare` as tasks.sandbox.jail.wire / .compare."""
