"""`python -m ftpipe` == the `ftpipe` console script (used by the executor inside other venvs)."""

from ftpipe.cli.main import main

if __name__ == "__main__":  # not when a spawned worker process (preprocess-sft) imports this module
    main()
