"""`python -m dgplug.cli`: the same command line as `dgplug`."""

from . import app

app(prog_name="dgplug")
