"""Demo conda channel: real, installable packages built with the standard library."""
