"""File formats: the GGUF reader (`gguf`), the GGUF writer (`gguf_writer`) and the ggml block types (`quants`)."""
