"""The tools layer above the service: the ``avatarforcing`` CLI, the demo, the benchmarks and the live page.

It imports the service, the model and the SDK; nothing below it imports it (import-linter, .importlinter).
"""
