"""The `tierstore` command line: subcommands sit on top of the store and the model."""
