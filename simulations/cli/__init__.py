"""The `fedrec` command: one thin module per command group over plain functions; `main` assembles them."""
