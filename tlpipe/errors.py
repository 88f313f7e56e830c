class TlpipeError(Exception):
    """Bad input or state the user can fix; the CLI prints its one line and exits 2."""
