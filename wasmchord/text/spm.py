"""SentencePiece-style tokenizer (`tokenizer.ggml.model = llama`), as llama.cpp's llm_tokenizer_spm.

Spaces become U+2581; starting from single characters, the adjacent pair whose concatenation is the
highest-scoring vocabulary token is merged (ties: leftmost first) until no pair is a token; symbols
that are not tokens are emitted as byte-fallback tokens `<0xNN>`.
"""

from __future__ import annotations

import heapq

SPACE = "\u2581"


class SPMModel:
    def __init__(self, vocab: dict[str, int], scores, unk_id: int | None):
        self.vocab = vocab
        self.scores = [float(s) for s in scores] if scores is not None else [0.0] * (max(vocab.values()) + 1)
        self.unk_id = unk_id
        self.byte_ids = [vocab.get(f"<0x{b:02X}>") for b in range(256)]
        self._no_split_before_space: set[str] | None = None

    # The merge loop is O(n log n) in pure Python; long texts are cut into independent chunks at
    # positions no merge can cross: before a U+2581 whose left neighbour never precedes U+2581 inside
    # any vocabulary token (any merged symbol spanning the cut would be such a token).
    def _chunks(self, text: str) -> list[str]:
        if len(text) < 256:
            return [text]
        if self._no_split_before_space is None:
            self._no_split_before_space = {t[i - 1] for t in self.vocab for i in range(1, len(t)) if t[i] == SPACE}
        keep = self._no_split_before_space
        out, start = [], 0
        pos = text.find(SPACE, 1)
        while pos != -1:
            if text[pos - 1] not in keep and pos > start:
                out.append(text[start:pos])
                start = pos
            pos = text.find(SPACE, pos + 1)
        out.append(text[start:])
        return out

    def encode(self, text: str) -> list[int]:
        """`text` already has spaces escaped to U+2581 and any space prefix added."""
        out: list[int] = []
        for chunk in self._chunks(text):
            self._encode_chunk(chunk, out)
        return out

    def _encode_chunk(self, text: str, out: list[int]):
        n = len(text)
        if n == 0:
            return
        vocab, scores = self.vocab, self.scores
        start = list(range(n))
        size = [1] * n
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = []

        def push(left, right):
            if left < 0 or right < 0:
                return
            s = text[start[left]:start[right] + size[right]]
            tid = vocab.get(s)
            if tid is not None:
                heapq.heappush(heap, (-scores[tid], left, right, len(s)))

        for i in range(1, n):
            push(i - 1, i)
        while heap:
            _, left, right, ln = heapq.heappop(heap)
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != ln:
                continue  # one side was merged away since this pair was queued
            size[left] += size[right]
            size[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        i = 0
        while i != -1:
            s = text[start[i]:start[i] + size[i]]
            tid = vocab.get(s)
            if tid is not None:
                out.append(tid)
            else:
                for b in s.encode("utf-8"):
                    bid = self.byte_ids[b]
                    if bid is None:
                        bid = vocab.get(chr(b), self.unk_id)
                    if bid is not None:
                        out.append(bid)
            i = nxt[i]
