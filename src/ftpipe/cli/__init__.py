"""The Typer CLI: parse, load config, call a stage, print the result. No business logic here."""
