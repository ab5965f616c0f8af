"""tidal.commands: the `tidal` command line - train, submit, generate, eval, label tasks, config, data, report."""
