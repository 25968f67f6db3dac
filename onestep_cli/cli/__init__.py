"""The `onestep` command line: one module per verb, each a thin skin over one library call."""
