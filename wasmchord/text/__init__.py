"""Text: the tokenizer (`tokenizer`, with `spm` and `bpe`), chat templates and tokenizer metadata export."""
