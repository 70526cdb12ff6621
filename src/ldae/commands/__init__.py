"""One module per ``ldae`` subcommand (see ``ldae.cli``)."""
