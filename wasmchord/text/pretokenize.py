r"""llama.cpp's BPE pre-tokenizers: every `tokenizer.ggml.pre` name it knows, the regexes that split
text into words before merging, and the per-name flags that change what encoding gives.

Copied from llama.cpp src/llama-vocab.cpp (llama-cpp-python 0.3.36): `SPLITS` holds the regex lists
of llm_tokenizer_bpe's constructor, one per LLAMA_VOCAB_PRE_TYPE_* (keyed by its lower-case name; types
with equal lists share one entry), `NAMES` the name -> type map of llama_vocab::impl::load with its
ignore_merges / add_bos / escape_whitespaces flags. The regexes are kept as llama.cpp spells them;
`compile_split` runs them with llama.cpp's semantics (src/unicode.cpp unicode_regex_split):
    - a regex with a Unicode category runs on "collapsed" text, one byte per category, so \p{Lu},
      \p{Ll}, ... all mean any letter;
    - one without runs as std::wregex: non-ASCII whitespace is first turned into \v, \d is ASCII, $
      is the end of the text;
    - a few regexes stand for hand-written splitters (digit groups of three, Kimi-K2's Han rule).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import regex

from ..errors import UnsupportedError


@dataclass(frozen=True)
class Pre:
    """A pre-tokenizer name's type (a key of SPLITS) and flags (llama_vocab::impl::load)."""

    splits: str
    ignore_merges: bool = False  # a word that is a token is not merged again
    add_bos: bool = False        # add BOS when the file has no tokenizer.ggml.add_bos_token
    gemma4: bool = False         # llama.cpp's Gemma 4 cases: BOS even when the file says not; newline-only
                                 # words that are tokens stay whole
    escape_spaces: bool = False  # spaces become U+2581 before splitting (SentencePiece-style BPE)


# Types whose words are merged as raw UTF-8 (unknown bytes as <0xXX> tokens), not GPT-2 byte-mapped.
RAW_UTF8 = {"gemma4", "whitespace"}

SPLITS: dict[str, tuple[str, ...]] = {
    'llama3': (  # also dbrx, smaug, chatglm4
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ),
    'jais2': (
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s{512}(?!\\S)|\\s{256}(?!\\S)|\\s{128}(?!\\S)|\\s{64}(?!\\S)|\\s{32}(?!\\S)|\\s{16}(?!\\S)|\\s{8}(?!\\S)|\\s{4}(?!\\S)|\\s{1,2}(?!\\S)|\\s{1}",
    ),
    'deepseek_llm': (
        '[\r\n]',
        r'\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+',
        '\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+',
        r'\s+$',
        '[一-龥ࠀ-一가-\ud7ff]+',
        r'\p{N}+',
    ),
    'deepseek3_llm': (  # also hunyuan_dense, joyai_llm, hy_v4
        r'\p{N}{1,3}',
        '[一-龥\u3040-ゟ゠-ヿ]+',
        '[!"#$%&\'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+',
    ),
    'spark2_5': (
        r'\p{N}{1,3}',
        '[一-龥\u3040-ゟ゠-ヿ]+',
        '[!"#$%&\'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+|[\r\n]|\\s+(?!\\S)|\\s+',
        r'\p{N}',
    ),
    'youtu': (
        '[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥\u3040-ゟ゠-ヿ]+',
        "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ),
    'deepseek_coder': (
        '[\r\n]',
        r'\s?\p{L}+',
        r'\s?\p{P}+',
        '[一-龥ࠀ-一가-\ud7ff]+',
        r'\p{N}',
    ),
    'falcon': (
        r'[\p{P}\$\+<=>\^~\|`]+',
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
        '[0-9][0-9][0-9]',
    ),
    'starcoder': (  # also refact, command_r, smollm, codeshell, exaone, minerva, mellum2
        r'\p{N}',
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ),
    'gpt2': (  # also mpt, olmo, jais, trillion, granite_docling
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ),
    'stablelm2': (  # also qwen2, hunyuan, solar_open, grok_2
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ),
    'qwen35': (
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ),
    'poro': (  # also bloom, gpt3_finnish
        r' ?[^(\s|.,!?…。，、।۔،)]+',
    ),
    'viking': (
        r' ?[^(\s|.,!?…。，、।۔،)]+',
        r'\p{N}',
    ),
    'tekken': (
        r'[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+',
    ),
    'chameleon': (
        '<sentinel:[0-9]+>',
        '(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z',
        r'([\t\n]|    |  )',
        r'\p{N}',
        r'[\p{P}!-/:-@\[-`{-~]',
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ),
    'gpt4o': (  # also minimax_m2
        "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ),
    'granite_emb_multi': (
        "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}\\p{M}])([^a-z]))*((?=[\\p{L}\\p{M}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}\\p{M}])([^a-z]))+((?=[\\p{L}\\p{M}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ),
    'tiny_aya': (
        r'\d{1,3}(?=(?:\d{3})*\b)',
        "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ),
    'kimi_k2': (
        r'\p{Han}+',
    ),
    'superbpe': (
        r'\p{N}+',
        r'(?=(\d{3})+(?!\d))',
    ),
    'bailingmoe': (
        "'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+",
    ),
    'seed_coder': (
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}| ?[^\\s\\p{L}\\p{N}\\r\\n]+|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ),
    'ufakzeka': (
        r'[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+',
    ),
    'afmoe': (
        r'\p{AFMoE_digits}',
        '[一-鿿㐀-䶿豈-\ufaff\u3040-ゟ゠-ヿ･-ﾟ⼀-\u2fdfเ-\u0e7f\u0e80-\u0effក-\u17ffက-႟ꩠ-ꩿꧠ-\ua9ff가-\ud7afᄀ-ᇿ]+',
        '[!"#$%&\'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\\r\\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+',
    ),
    'laguna': (
        r'[^\n]+|[\n]+',
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ),
    'exaone_moe': (
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?(?:\\p{L}\\p{M}*(?: \\p{L}\\p{M}*)*)+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]?|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+",
    ),
    'gemma4': (  # also sarvam_moe
        r'[^\n]+|[\n]+',
    ),
    'minicpm5': (
        r'\p{N}{1,3}',
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}+| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ),
    'whitespace': (
        r'\S+',
    ),
    'default': (
        r'[\p{P}\$\+<=>\^~\|]+',
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
        r'\p{N}+',
        '[0-9][0-9][0-9]',
    ),
}


NAMES: dict[str, Pre] = {
    'default': Pre('default'),
    'minicpm5': Pre('minicpm5', ignore_merges=True),
    'llama3': Pre('llama3', ignore_merges=True, add_bos=True),
    'llama-v3': Pre('llama3', ignore_merges=True, add_bos=True),
    'llama-bpe': Pre('llama3', ignore_merges=True, add_bos=True),
    'falcon3': Pre('llama3', ignore_merges=True, add_bos=True),
    'falcon-h1': Pre('llama3', ignore_merges=True, add_bos=True),
    'pixtral': Pre('llama3', ignore_merges=True, add_bos=True),
    'midm-2.0': Pre('llama3', ignore_merges=True, add_bos=True),
    'lfm2': Pre('llama3', ignore_merges=True, add_bos=True),
    'jina-v5-nano': Pre('llama3', ignore_merges=True, add_bos=True),
    'deepseek-llm': Pre('deepseek_llm'),
    'deepseek-coder': Pre('deepseek_coder'),
    'deepseek-v3': Pre('deepseek3_llm'),
    'spark2_5': Pre('spark2_5'),
    'youtu': Pre('youtu', ignore_merges=True),
    'falcon': Pre('falcon'),
    'mpt': Pre('gpt2'),
    'starcoder': Pre('starcoder'),
    'gpt-2': Pre('gpt2'),
    'phi-2': Pre('gpt2'),
    'jina-es': Pre('gpt2'),
    'jina-de': Pre('gpt2'),
    'gigachat': Pre('gpt2'),
    'jina-v2-es': Pre('gpt2'),
    'jina-v2-de': Pre('gpt2'),
    'a.x-4.0': Pre('gpt2'),
    'mellum': Pre('gpt2'),
    'modern-bert': Pre('gpt2'),
    'jais-2': Pre('jais2'),
    'gemma4': Pre('gemma4', escape_spaces=True, gemma4=True),
    'granite-embed-multi-311m': Pre('gemma4', escape_spaces=True, gemma4=True),
    'sarvam-moe': Pre('gemma4', escape_spaces=True),  # type sarvam_moe: gemma4's splits, no BOS override
    'jina-v1-en': Pre('gpt2'),
    'jina-v2-code': Pre('gpt2'),
    'roberta-bpe': Pre('gpt2'),
    'whitespace': Pre('whitespace'),
    'refact': Pre('starcoder'),
    'command-r': Pre('starcoder'),
    'qwen2': Pre('stablelm2'),
    'deepseek-r1-qwen': Pre('stablelm2'),
    'kormo': Pre('stablelm2'),
    'f2llmv2': Pre('stablelm2'),
    'qwen35': Pre('qwen35'),
    'stablelm2': Pre('stablelm2'),
    'olmo': Pre('gpt2'),
    'dbrx': Pre('llama3'),
    'smaug-bpe': Pre('llama3'),
    'poro-chat': Pre('poro'),
    'chatglm-bpe': Pre('llama3'),
    'glm4': Pre('llama3', ignore_merges=True),
    'glm5': Pre('llama3', ignore_merges=True),
    'viking': Pre('viking'),
    'jais': Pre('gpt2'),
    'tekken': Pre('tekken', ignore_merges=True, add_bos=True),
    'smollm': Pre('starcoder'),
    'codeshell': Pre('starcoder'),
    'bloom': Pre('poro'),
    'gpt3-finnish': Pre('poro'),
    'exaone': Pre('starcoder'),
    'exaone4': Pre('gpt2'),
    'exaone-moe': Pre('exaone_moe'),
    'chameleon': Pre('chameleon', add_bos=True),
    'minerva-7b': Pre('starcoder'),
    'megrez': Pre('stablelm2'),
    'gpt-4o': Pre('gpt4o'),
    'llama4': Pre('gpt4o'),
    'kanana2': Pre('gpt4o'),
    'talkie': Pre('gpt4o'),
    'granite-embed-multi-97m': Pre('granite_emb_multi', ignore_merges=True),
    'tiny_aya': Pre('tiny_aya'),
    'cohere2moe': Pre('tiny_aya'),
    'superbpe': Pre('superbpe'),
    'trillion': Pre('gpt2'),
    'granite-docling': Pre('gpt2'),
    'bailingmoe': Pre('bailingmoe'),
    'bailingmoe2': Pre('bailingmoe'),
    'llada-moe': Pre('bailingmoe'),
    'seed-coder': Pre('seed_coder'),
    'hunyuan': Pre('stablelm2'),
    'hunyuan-dense': Pre('deepseek3_llm'),
    'hy_v4': Pre('deepseek3_llm'),
    'joyai-llm': Pre('deepseek3_llm'),
    'kimi-k2': Pre('kimi_k2'),
    'ufakzeka': Pre('ufakzeka'),
    'grok-2': Pre('stablelm2'),
    'afmoe': Pre('afmoe'),
    'laguna': Pre('laguna'),
    'minimax-m2': Pre('gpt4o'),
    'solar-open': Pre('stablelm2'),
    'mellum2': Pre('starcoder'),
}


# ---------------------------------------------------------------------------- running llama.cpp's regexes

_HAN = "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002ebef\U0002f800-\U0002fa1f]"
# unicode.cpp unicode_regex_split_custom_kimi_k2, as one regex (Han as unicode_cpt_is_han's ranges).
_KIMI_K2 = (f"{_HAN}+|[^\\r\\n\\p{{L}}\\p{{N}}]?(?:(?!{_HAN})\\p{{L}})+(?:'[sStTmMdD]|'[rR][eE]|'[vV][eE]|'[lL][lL])?"
            "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_NUMBER_RUN = regex.compile(r"\p{N}+")
_NON_ASCII_SPACE = {c: "\v" for c in (0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F,
                                         0x3000)}


def _digits_by_three(piece: str) -> list[str]:
    """unicode.cpp unicode_regex_split_custom_afmoe: each run of digits split into a leading 1-2 digits
    (its length mod 3) and groups of three; the text between runs stays whole."""
    out, start = [], 0
    for m in _NUMBER_RUN.finditer(piece):
        if m.start() > start:
            out.append(piece[start:m.start()])
        run, lead = m.group(), len(m.group()) % 3
        out += ([run[:lead]] if lead else []) + [run[i:i + 3] for i in range(lead, len(run), 3)]
        start = m.end()
    return out + ([piece[start:]] if start < len(piece) else [])


# Regexes llama.cpp runs by hand-written code (unicode_regex_split_custom).
_CUSTOM: dict[str, str | Callable[[str], list[str]]] = {
    r"\p{AFMoE_digits}": _digits_by_three,
    r"\d{1,3}(?=(?:\d{3})*\b)": _digits_by_three,  # tiny_aya: llama.cpp runs the afmoe splitter
    r"\p{Han}+": _KIMI_K2,
}


def _regex_split(pat: regex.Pattern, wide: bool) -> Callable[[str], list[str]]:
    """Split a piece at the matches of `pat`, keeping the text between them (unicode_regex_split_stl)."""
    def split(piece: str) -> list[str]:
        target = piece.translate(_NON_ASCII_SPACE) if wide else piece  # same length: offsets carry over
        out, start = [], 0
        for m in pat.finditer(target):
            if m.start() > start:
                out.append(piece[start:m.start()])
            if m.end() > m.start():
                out.append(piece[m.start():m.end()])
            start = m.end()
        if start < len(piece):
            out.append(piece[start:])
        return out
    return split


def compile_split(expr: str) -> Callable[[str], list[str]]:
    """One of llama.cpp's pre-tokenizer regexes as a function piece -> pieces, with its semantics."""
    custom = _CUSTOM.get(expr, expr)
    if callable(custom):
        return custom
    if "\\p{" in expr:  # collapsed: every letter category is "a letter"
        return _regex_split(regex.compile(re.sub(r"\\p\{L[ultmo]\}", r"\\p{L}", custom)), wide=False)
    expr = expr.replace("\\d", "[0-9]")
    if expr.endswith("$") and not expr.endswith("\\$"):
        expr = expr[:-1] + "\\Z"
    return _regex_split(regex.compile(expr), wide=True)


def pre_tokenizer(name: str) -> tuple[Pre, list[Callable[[str], list[str]]]]:
    """The flags and the splitters (applied in turn) of pre-tokenizer `name`.

    Raises:
        UnsupportedError: a name llama.cpp does not know, named with the known ones.
    """
    if name not in NAMES:
        raise UnsupportedError(f"unknown BPE pre-tokenizer tokenizer.ggml.pre = {name!r}; "
                               f"supported: {', '.join(sorted(NAMES))}")
    pre = NAMES[name]
    return pre, [compile_split(e) for e in SPLITS[pre.splits]]
