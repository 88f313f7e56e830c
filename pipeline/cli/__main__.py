"""`python -m tlpipe.pipeline.cli`."""

from tlpipe.pipeline.cli import main

main()
