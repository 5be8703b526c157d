"""The `tierstore` command line (installed as ``tierstore_cli``; the folder is ``tools/``).

The store's subcommands sit on top of the store; ``make demo`` (``demo``) tells the whole
story with the model. Commands that need the model (``trace``) come from ``engram_model``
through an entry point (see ``cli``).
"""
