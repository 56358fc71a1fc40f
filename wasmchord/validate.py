"""Check a GGUF file: structure, required metadata, tensor shapes against the config, NaN/Inf in the
weights, tokenizer consistency (`wasmchord validate FILE`, tools/validate_gguf.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import ModelConfig
from .errors import WasmchordError
from .formats.gguf import GGUFFile


@dataclass
class Report:
    path: str
    checks: list[tuple[str, bool, str]] = field(default_factory=list)  # (check, ok, detail)

    def add(self, check, ok, detail=""):
        self.checks.append((check, bool(ok), detail))

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    @property
    def problems(self) -> list[str]:
        return [f"{c}: {d}" for c, ok, d in self.checks if not ok]

    def format(self) -> str:
        lines = [f"{self.path}"]
        lines += [f"  [{'ok' if ok else 'FAIL'}] {c}{': ' + d if d else ''}" for c, ok, d in self.checks]
        lines.append(f"  {'valid' if self.ok else f'{len(self.problems)} problem(s)'}")
        return "\n".join(lines)


def validate(path, *, check_values: bool = True, progress=None) -> Report:
    """Check the GGUF file at `path`; problems are reported, never raised.

    Args:
        check_values: dequantize every tensor and look for NaN/Inf (the slow part).
        progress: called as progress(stage, done, total) during the value scan.
    """
    r = Report(str(path))
    try:
        gf = GGUFFile(path)
    except WasmchordError as e:
        r.add("structure (header, metadata, tensor infos, alignment, offsets, sizes, duplicates)", False, str(e))
        return r
    r.add("structure (header, metadata, tensor infos, alignment, offsets, sizes, duplicates)", True,
          f"GGUF v{gf.version}, {len(gf.metadata)} keys, {len(gf.tensors)} tensors")
    try:
        cfg = ModelConfig.from_gguf(gf.metadata)
        r.add("required metadata", True, f"{cfg.arch}, {cfg.n_layers} layers")
    except WasmchordError as e:
        r.add("required metadata", False, str(e))
        cfg = None
    if cfg is not None:
        missing, wrong = cfg.check_tensors({name: ti.shape for name, ti in gf.tensors.items()})
        bad = [f"{n} is {list(gf.tensors[n].shape)}, expected {list(s)}" for n, s in wrong.items()]
        r.add("required tensors present", not missing, ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
        r.add("tensor shapes match the config", not bad, "; ".join(bad[:3]) + (" ..." if len(bad) > 3 else ""))
    if check_values:
        nonfinite, skipped = [], []
        for i, (name, ti) in enumerate(gf.tensors.items()):
            if progress:
                progress("check values", i, len(gf.tensors))
            if ti.ggml_type.dequantize_blocks is None:
                skipped.append(name)
                continue
            if not np.isfinite(gf.dequantize(name)).all():
                nonfinite.append(name)
        r.add("no NaN/Inf in the weights", not nonfinite, ", ".join(nonfinite[:5]) +
              (f" ({len(skipped)} tensors of types without a decoder not checked)" if skipped else ""))
    try:
        from .text.tokenizer import Tokenizer
        tok = Tokenizer(gf.metadata, source=str(path))
        issues = []
        if cfg is not None and tok.vocab_size != cfg.vocab_size:
            issues.append(f"{tok.vocab_size} tokens but vocab size {cfg.vocab_size}")
        emb = gf.tensors.get("token_embd.weight")
        if emb is not None and emb.shape[0] != tok.vocab_size:
            issues.append(f"token_embd has {emb.shape[0]} rows for {tok.vocab_size} tokens")
        if tok.encode("Hello world", add_bos=False) and tok.decode(tok.encode("Hello world", add_bos=False)) != "Hello world":
            issues.append("decode(encode('Hello world')) does not round-trip")
        r.add("tokenizer consistent", not issues, "; ".join(issues) or f"{tok.model}, {tok.vocab_size} tokens")
    except WasmchordError as e:
        r.add("tokenizer consistent", False, str(e))
    return r

