"""Validate GGUF files (the same as `wasmchord validate`): prints a report, exits 1 on problems.

    python tools/validate_gguf.py FILE_OR_ALIAS [...] [--no-values]
"""

import sys

from wasmchord.cli import main

if __name__ == "__main__":
    sys.exit(main(["validate", *sys.argv[1:]]))
