"""One small module per subcommand: typer options in, one call into rlkit out."""
