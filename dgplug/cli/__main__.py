"""`python -m dgplug.cli`: the same command line as `dgplug`."""

from . import entry

entry(script=True)
