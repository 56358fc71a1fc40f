"""Convert a Hugging Face model directory to GGUF (the same as `wasmchord convert`).

    python tools/convert_model.py --model DIR --output FILE.gguf --quant f32|f16|q8_0|q4_0|q4_1 [--force]
"""

import sys

try:
    from wasmchord.cli import main
except KeyboardInterrupt:  # Ctrl-C while the imports load: no traceback (main() handles it later)
    print("wasmchord: interrupted", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
