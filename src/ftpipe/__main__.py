"""`python -m ftpipe` == the `ftpipe` console script (used by the executor inside other venvs)."""

from ftpipe.cli.main import main

main()
