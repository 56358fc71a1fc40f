"""Validate GGUF files (the same as `wasmchord validate`): prints a report, exits 1 on problems.

    python tools/validate_gguf.py FILE_OR_ALIAS [...] [--no-values]
"""

import sys

try:
    from wasmchord.cli import main
except KeyboardInterrupt:  # Ctrl-C while the imports load: no traceback (main() handles it later)
    print("wasmchord: interrupted", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main(["validate", *sys.argv[1:]]))
