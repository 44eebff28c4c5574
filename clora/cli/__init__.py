"""The `clora` command line, one module per command group; `clora.cli.main` assembles them."""
