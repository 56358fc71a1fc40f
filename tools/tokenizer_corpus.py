"""The tokenizer test corpus: diverse strings for parity tests against llama.cpp and sentencepiece.

Deterministic (no randomness); `corpus()` returns the list. The fixtures written by
tools/make_tokenizer_fixtures.py embed these strings, so tests read the fixture, not this module.
"""

PROSE = [
    "Hello world", "Hello, world!", "The quick brown fox jumps over the lazy dog.",
    "It was the best of times, it was the worst of times.",
    "I'm sure you'll agree that we've done it; they'd said so and it's true.",
    "DON'T SHOUT. I'M HERE. WE'LL SEE. THEY'RE GONE. IT'S OK.",
    "She said: \"Really?\" and he replied 'yes'.",
    "Mr. Smith went to Washington, D.C., on Jan. 3rd.",
    "The U.S.A. and the U.K. signed the treaty in 1994.",
    "Call me Ishmael. Some years ago - never mind how long precisely - having little or no money in my purse.",
    "In the beginning God created the heaven and the earth.",
    "To be, or not to be: that is the question.",
    "Once upon a time, there was a little girl who lived in a village near the forest.",
    "Machine learning models are trained on large datasets to recognize patterns.",
    "What is the capital of France? The capital of France is Paris.",
    "Please summarize the following article in three sentences.",
    "  leading spaces", "trailing spaces   ", " single leading space", "double  space  inside",
    "Line one\nLine two\nLine three", "Paragraph one.\n\nParagraph two.\n\n\nParagraph three.",
    "camelCaseWordsAndPascalCase", "snake_case_identifier_name", "kebab-case-identifier-name",
    "e-mail: someone@example.com, web: https://example.org/path?q=1&r=two#frag",
    "The price is $12.99 (or €11,50), a 15% discount!",
    "ALL CAPS SENTENCE WITH NUMBERS 123 AND SYMBOLS #@!",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism",
    "He said 'it''s' twice'", "rock'n'roll", "'s 't 're 've 'm 'll 'd", "'S 'T 'RE 'VE 'M 'LL 'D",
    "y'all ain't gonna", "O'Neil's dog", "the 90's", "don't\ndo\nit",
    "Hello\r\nWindows\r\nline endings", "carriage\rreturn", "form\x0cfeed and vertical\x0btab",
    "non\u00a0breaking\u00a0space", "zero\u200bwidth\u200bspace", "soft\u00adhyphen",
    "em—dash and en–dash … ellipsis", "“smart quotes” and ‘single ones’",
]

CODE = [
    "def hello(name):\n    print(f\"Hello, {name}!\")\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}",
    "#include <stdio.h>\nint main(void) { return 0; }",
    "const x = (a, b) => a ?? b; // nullish",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
    "<html><body><p class=\"x\">Hi &amp; bye</p></body></html>",
    "{\"key\": [1, 2.5, -3e10, true, null], \"nested\": {\"a\": \"b\"}}",
    "x = [i**2 for i in range(10) if i % 2 == 0]",
    "if __name__ == '__main__':\n    main()",
    "    indented with four spaces\n        and eight",
    "\tindented with a tab\n\t\tand two",
    "fn main() { let v: Vec<u8> = vec![0x1F, 0xff]; }",
    "a+=1;b-=2;c*=3;d/=4;e%=5;f**=6;g//=7;h>>=8;i<<=9",
    "std::vector<std::pair<int, std::string>> v;",
    "$ ls -la | grep '.py' && echo \"done\" > /dev/null 2>&1",
    "git commit -m \"Fix #123: handle edge-case\"",
    "λx.λy.x y  -- lambda calculus",
    "matrix[i][j] = matrix[i-1][j-1] + 1",
    "// TODO(user): refactor this\n/* block\n   comment */",
    "print('a'*3, \"b\"*2, '''c''')",
    "0x7FFF_FFFF 0b1010 0o777 1_000_000 3.14e-10",
    "key=value; other_key = \"quoted value\"",
    "@decorator\nclass Foo(Bar, metaclass=Meta):\n    pass",
    "import numpy as np\nimport torch.nn.functional as F",
    "    \n    \n",
    "```python\nprint(1)\n```",
    "| col1 | col2 |\n|------|------|\n| a    | b    |",
    "a\tb\tc\n1\t2\t3",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n",
    "#!/usr/bin/env bash\nset -euo pipefail",
]

WHITESPACE = (
    [" " * n for n in range(1, 11)] + ["\t" * n for n in range(1, 6)] + ["\n" * n for n in range(1, 7)]
    + [" \n", "\n ", " \n ", "\t\n", "\n\t", " \t ", "\t \t", "\r\n", "\r\n\r\n", " \r\n",
       "a  b", "a   b", "a    b", "a\t\tb", "a\n\n\nb", "a \n b", "word \n\n  word", "end.   ",
       "   \t  \n  x", "x\n\n\n\n\n\n\n\n\n\ny"]
)

NUMBERS = [
    "0", "7", "42", "123", "1234", "12345", "123456789", "3.14159", "-273.15", "+1", "1e6", "6.022e23",
    "1,000,000", "1.000.000,00", "2024-01-15", "15/01/2024", "01.15.2024", "12:34:56", "2024-01-15T12:34:56Z",
    "Jan 1, 1970", "the year 1999 and 2000", "version 3.11.7", "v1.2.3-rc.4", "phone +1 (555) 123-4567",
    "ISBN 978-3-16-148410-0", "10%", "$100", "¥1000", "½ ¾ ⅓", "x² + y³ = z⁴", "٠١٢٣٤٥٦٧٨٩",
    "१२३४५", "一二三 123", "ⅠⅡⅢⅣ", "3rd 21st 42nd 100th", "007", "0.5", ".5", "5.", "1/2", "2^10=1024",
]

PUNCT = [
    "!!!", "???", "...", "?!?!", "---", "___", "***", "===", "~~~", "###", ">>>", "<<<", "((()))",
    "[[[]]]", "{{{}}}", "!@#$%^&*()", ".,;:!?", "\"\"\"", "'''", "``` ", "-->", "<!--", "=>", "->", "::",
    "..!..", "¿¡", "«»", "§¶†‡", "•·°", "©®™", "«Bonjour»", "…", "‽",
]

ACCENTS = [
    "café", "naïve", "résumé", "Ångström", "façade", "jalapeño", "Zürich", "São Paulo", "Øresund",
    "Crème brûlée à la française", "Dvořák", "Łódź", "İstanbul", "straße STRASSE", "ﬁnance (ligature)",
    "e\u0301 (e + combining acute)", "a\u0300\u0301\u0302 stacked marks", "n\u0303", "Z\u0335\u0321a\u0336lgo",
    "Ελληνικά γράμματα", "Việt Nam", "Ærøskøbing", "ỹ̀", "ṩ", "ǅ ǆ", "ﬀ ﬃ",
]

SCRIPTS = [
    # CJK
    "你好，世界！", "我爱自然语言处理。", "日本語のテキストです。", "ひらがな カタカナ 漢字", "こんにちは",
    "한국어 텍스트입니다.", "안녕하세요 세계", "中文English混合text", "東京タワー", "北京大学",
    "「引用」と『二重引用』", "全角ＡＢＣ１２３", "ｶﾀｶﾅ半角", "𠀀𠀁 (CJK Ext B)", "一",
    # Cyrillic
    "Привет, мир!", "Съешь же ещё этих мягких французских булок.", "Москва", "Україна", "Ёж ёлка",
    "Слово123число", "БОЛЬШИЕ буквы", "Српски језик", "Қазақ тілі", "Ђорђе",
    # Arabic
    "مرحبا بالعالم", "اللغة العربية جميلة", "السَّلَامُ عَلَيْكُمْ", "عربي 123 English", "كتاب",
    "فارسی زبان", "اردو", "٣٫١٤", "ﷲ", "ـــ",
    # Hebrew
    "שלום עולם", "עברית", "בְּרֵאשִׁית", "ירושלים 2024", "א ב ג", "שָׁלוֹם", "ספר", "תל אביב", "ש\"ח", "׳",
    # Devanagari and other Indic
    "नमस्ते दुनिया", "हिन्दी भाषा", "संस्कृतम्", "क्षत्रिय", "मराठी", "ॐ", "नमस्ते123",
    "বাংলা", "தமிழ்", "తెలుగు", "ગુજરાતી", "ਪੰਜਾਬੀ",
    # others
    "ภาษาไทย", "ქართული", "Հայերեն", "አማርኛ", "ᚠᚢᚦ", "ꦗꦮ", "ߒߞߏ", "𐌰𐌱𐌲 (Gothic)", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𝟘𝟙𝟚",
]

EMOJI = [
    "😀", "😀😃😄", "👍", "👍🏽", "👍🏿 👍🏻", "👩‍💻", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇺🇸🇯🇵🇩🇪", "❤️", "❤",
    "✨ sparkle ✨", "I ❤️ NY", "🙏🏼 thanks", "🧑🏾‍🚀", "👁️‍🗨️", "1️⃣2️⃣3️⃣", "🐈‍⬛", "🫠🫡", "© ® ™ ℃ ℉",
    "🤷‍♀️", "emoji😀inside", "⚠️ warning", "🔥🔥🔥🔥🔥",
]

SPECIAL = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n", "<bos>", "<eos>", "<pad>", "<unk>",
    "<mask>", "[multimodal]", "<start_of_image>", "<unused0>", "<|im_start", "im_start|>", "<|im_start|><|im_end|>",
    "text<|endoftext|>more text", "<s>", "</s>", "<repo_name>", "<jupyter_code>print(1)", "< |im_start| >",
    "<end_of_turn><end_of_turn>", "a<bos>b", "<|IM_START|>",
]

SHORT = (
    ["", " ", "a", "A", "z", "0", "9", ".", ",", "!", "?", "'", "\"", "-", "_", "\\", "/", "\n", "\t", "é",
     "ü", "ß", "中", "語", "я", "ا", "ש", "क", "😀", "€", "\u200d", "\x00", "\x7f", "~", "`"]
)

REPEATS = [
    "a" * 1000, "ab" * 300, " " * 300, "\n" * 50, "=" * 200, "😀" * 50, "ha" * 100, "1" * 100,
    "Buffalo buffalo " * 20, "中" * 100, ". " * 100, "\t" * 40, "aaaaaaaaaa bbbbbbbbbb cccccccccc",
]


def corpus() -> list[str]:
    seen, out = set(), []
    for group in (PROSE, CODE, WHITESPACE, NUMBERS, PUNCT, ACCENTS, SCRIPTS, EMOJI, SPECIAL, SHORT, REPEATS):
        for s in group:
            if s not in seen:
                seen.add(s)
                out.append(s)
    return out


if __name__ == "__main__":
    print(len(corpus()))
