"""Synthetic reasoning-trace rows in the HuggingFaceTB/smoltalk2 `Mid` schema, with exact token counts:
`synth.write_jsonl("ot3.jsonl.gz", synth.rows("ot3", num_tokens=50_000_000, seed=0))`.

The sample in prep/sample/ and the benchmark corpora are generated (we have no hub access): rows shaped
like DeepSeek-R1 traces of Llama-Nemotron-Post-Training ("nemotron", mean ~5k tokens) or OpenThoughts3
("ot3", mean ~12k), of meaningless words. Once per seed, a Writer fills ~6,500 templates with words
drawn (Zipf) from ~110 common words and 40,000 seeded pseudo-words, and prep's own encoder counts each
block's tokens with the separator after it. No block starts with whitespace, so the pre-tokenizer always
cuts where blocks meet and a message's token count is the sum of its blocks'. A row is then a few
random.choices and one "".join.
"""

import functools
import gzip
import itertools
import json
import math
import os
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from prep.shards import atomic_file
from prep.tokenizer import load_encoder

KINDS = {  # source, domain weights, median and sigma of the lognormal body of row lengths
    "nemotron": ("Llama_Nemotron_Post_Training_Dataset_reasoning_r1",
                 {"math": 0.45, "code": 0.30, "science": 0.15, "chat": 0.10}, 2_900, 0.9),
    "ot3": ("OpenThoughts3_1.2M", {"math": 0.55, "code": 0.30, "science": 0.15}, 10_250, 0.55),
}
# Row tokens (all message contents): lognormal within BODY_RANGE, and TAIL_FRACTION of rows log-uniform
# in TAIL_RANGE, which no 32,768-token sequence holds; make_sample.py forces a few rows into FORCED_RANGE.
BODY_RANGE, TAIL_RANGE, FORCED_RANGE, TAIL_FRACTION = (400, 31_000), (33_000, 80_000), (40_000, 80_000), 0.015
SYSTEM_FRACTION, CRLF_FRACTION, LOOKALIKE_FRACTION = 0.10, 0.03, 0.01
NUM_PSEUDO_WORDS, PSEUDO_SHARE = 40_000, 0.3  # the long tail of rare words, names and identifiers

# category: (blocks per pool, separator after each block, templates whose @slots Writer fills). A message
# ends with an "ask", "final" or "system" block, the reasoning with a "closing" one (its "\n" then </think>).
CATEGORIES = {
    "prose": (2400, "\n\n", ["@p", "@p @p", "@s So $@e = @e$. @p", "1. @s\n2. @s\n3. @s", "@p\n- @s\n- @s"]),
    "latex": (1200, "\n\n", ["@s\n\\[\n@e = @e\n\\]", "\\begin{aligned}\n@e &= @e \\\\\n@e &= @e\n\\end{aligned}\n@s",
                             "$@op @e = @e$, @w.", "@s So $@e \\equiv @n \\pmod{@n}$ and $@e \\ne @e$."]),
    "code": (600, "\n\n", ["@s\n\n@code", "@code\n\n@p"]),
    "science": (500, "\n\n", ["@s @mol + @mol → @mol, ΔH° ≈ −@n kJ/mol.", "@s @w @n × 10@exp @unit, @w.",
                              "ΔG° = ΔH° − TΔS° at T = @n K @w. @s", "The molar mass of @mol is @n g/mol, @w. @p"]),
    "unicode": (600, "\n\n", ["@s @foreign @emoji", "@han。@s @han。", "@s @hangul. @emoji", "@s @nfd, @foreign @s"]),
    "space": (150, "\n\n", ["@i@sp@n\n@i@sp@n\n@i@sp@n", "Position:@sp@sp@sp^   \n\t\t\tvalue@tabs@n", "@s@nls@s"]),
    "lookalike": (60, "\n\n", ["@s @look @s"]),
    "ask": (400, "", ["Find $@e$ if $@e = @n$. Put the final answer in \\boxed{}.", "Which @w?\nA) @w\nB) @w\nC) @w",
                      "How many @w satisfy $@e \\le @n$?", "@han？", "Input\n\nThe first line contains n "
                      "(1 ≤ n ≤ 2·10^5).\n\nOutput\n\nPrint @w.\n\nExample\n\n@n @n\n\n@n"]),
    "closing": (300, "\n", ["@s So the answer is @n.", "@s Yes, $@e = @n$."]),
    "final": (300, "", ["**Final Answer**\n\\[\n\\boxed{@n}\n\\]", "The answer is **@abcd**.",
                        "It runs in $O(n \\log n)$: @w.", "I hope this helps! @emoji"]),
    "system": (20, "", ["detailed thinking on", "You are a helpful assistant.", "Your role as an assistant involves "
                        "thoroughly exploring questions through a systematic long thinking process."]),
}
BODY = ("prose", "latex", "code", "science", "unicode", "space")
DOMAIN_MIX = {  # share of each BODY category among a row's blocks
    "math": (0.50, 0.38, 0.03, 0.02, 0.04, 0.03), "code": (0.47, 0.05, 0.38, 0.01, 0.04, 0.05),
    "science": (0.48, 0.14, 0.02, 0.28, 0.05, 0.03), "chat": (0.62, 0.02, 0.05, 0.03, 0.25, 0.03)}
# A function with a loop of 2-14 random statements (@py, @cpp) over five names (@v).
CODE = ["```python\ndef @v(@v, @v):\n    @v = @n\n    for @v in range(@v):\n@py\n    return @v\n```",
        "```cpp\nlong long @v(vector<long long>& @v, int @v) {\n\tlong long @v = @n;\n"
        "\tfor (int @v = 0; @v < @v; ++@v) {\n@cpp\n\t}\n\treturn @v;\n}\n```"]
PY_LINES = ["@v = @v + @n", "@v = @v * @v % @n", "# @w", "if @v > @n:\n            @v -= @v", "print(@v, @v)"]
CPP_LINES = ["@v = @v + @n;", "@v = @v * @v % @n;", "// @w", "if (@v > @n) @v -= @v;", "cout << @v;"]
SENTENCES = ["@o @w.", "@o @w @w.", "@o @w = @n.", "@o @w is @n!", "@o @w @w?", "@o @w: @w.", "@o @w gives @n."]

COMMON = """the a of to and is that it we so this for be not with as then but if or on at by from are can has have was
which would should could must each every all some any only one two first second last next also because since maybe
actually right wait let me check need find get means equal less greater than more number value sum term case
answer problem function array loop index result step way count total both other same new possible again now here
there when where how what why think see try compute consider assume suppose know use note look make take set""".split()
OPENERS = "Okay, so|Wait,|Hmm,|So|Let me check:|Alternatively,|Actually,|But|Therefore,|Now|Then|Right,".split("|")
SYLLABLES = ["".join(parts) for parts in itertools.product(  # onset, vowel, coda
    ["", *"b c d f g h k l m n p r s t v w z br ch cr dr gr pl pr sh st th".split()], "a e i o u ai ea io ou".split(),
    ["", "", *"n r s t l m nd st ck x".split()])]
MATH_LETTERS = "x y z n k m a b t p q \\alpha \\beta \\theta \\lambda \\pi \\varepsilon".split()
BIG_OPS = ["\\sum_{k=1}^{n}", "\\prod_{i=0}^{m}", "\\int_{0}^{1}", "\\lim_{x \\to \\infty}", "\\max_{1 \\le i \\le n}"]
ELEMENTS, UNITS = "H H₂ C C₆ N O O₂ O₄ S P Cl Na K Ca Fe₂ Mg Cu".split(), "kJ/mol|m/s²|mol/L|Ω|μm|Å|°C|eV".split("|")
SUPERSCRIPT = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")
HAN = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后小么心多天而能好都然没日于起还发成事只作当想看文无开手"
HANGUL = "가나다라마바사아자차카타파하는은이을를에서의도로고다습니까요그것수있없해했보면" + " " * 10  # words of ~4
FOREIGN = ["Donc la réponse est @n ; vérifions : l'élève a déjà résolu ce problème.", "Следовательно, ответ равен @n.",
           "¿Cuántos niños hay? La respuesta es @n, según el año pasado.", "לכן התשובה היא @n.", "Vậy đáp án là @n.",
           "Die Größe beträgt ungefähr @n km; das Ergebnis ist schön.", "إذن الجواب هو @n.", "ดังนั้นคำตอบคือ @n",
           "Έστω α, β, γ οι γωνίες, τότε α + β + γ = π.", "したがって、答えは@nです。", "इसलिए उत्तर @n है।", "∀ε > 0 ∃δ > 0"]
EMOJI = ["\U0001F44D", "\U0001F389", "\U0001F914", "\u2705", "\U0001F680", "\U0001F64F\U0001F3FD",  # a skin tone,
         "\U0001F468\u200D\U0001F469\u200D\U0001F467", "\U0001F1EB\U0001F1F7", "1\uFE0F\u20E3"]  # ZWJ, flag, keycap
# Plain text that looks like special tokens, whole or cut; "</think>" itself would end the reasoning.
LOOKALIKES = ["<|im_end|>", "<|im_start|>assistant", "<think>", "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>",
              "<|reserved_special_token_3|>", "<|im_", "im_end|>", "<|", "</think"]


class Writer:
    """Fills templates' @slots from seeded word lists, so that no two blocks are alike."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        pseudo = ["".join(rng.choices(SYLLABLES, k=rng.choice((1, 2, 2, 3)))) for _ in range(NUM_PSEUDO_WORDS)]
        self.vocab = COMMON + pseudo
        weights = []  # Zipf-Mandelbrot, 1 / (rank + offset), per group; the larger offset keeps each rare word rare
        for words, offset, share in ((COMMON, 2.7, 1 - PSEUDO_SHARE), (pseudo, 50, PSEUDO_SHARE)):
            zipf = [1 / (rank + offset) for rank in range(1, len(words) + 1)]
            scale = share / sum(zipf)
            weights += [weight * scale for weight in zipf]
        self.cum = list(itertools.accumulate(weights))
        self.slots = {
            "w": lambda: self.words(rng.randint(2, 8)), "s": lambda: self.fill(rng.choice(SENTENCES)),
            "p": lambda: " ".join(self.fill(rng.choice(SENTENCES)) for _ in range(rng.randint(2, 6))),
            "i": lambda: self.words(rng.randint(1, 3)).replace(" ", "_") if rng.random() < 0.7  # snake, Pascal case
            else self.words(rng.randint(1, 3)).title().replace(" ", ""),
            "n": lambda: rng.choice((str(rng.randint(0, 99)), str(rng.randint(100, 10**7)), f"{rng.random():.4f}",
                                     f"{rng.randint(1, 9)}/{rng.randint(2, 12)}", f"-{rng.randint(1, 999)}")),
            "e": lambda: self.expr(rng.randint(1, 3)), "op": lambda: rng.choice(BIG_OPS), "code": self.code,
            "o": lambda: rng.choice(OPENERS), "v": lambda: rng.choice(self.names), "abcd": lambda: rng.choice("ABCD"),
            "mol": lambda: "".join(rng.sample(ELEMENTS, rng.randint(2, 3))),
            "exp": lambda: str(rng.randint(-12, 23)).translate(SUPERSCRIPT), "unit": lambda: rng.choice(UNITS),
            "look": lambda: rng.choice(LOOKALIKES), "foreign": lambda: self.fill(rng.choice(FOREIGN)),
            "han": lambda: "".join(rng.choices(HAN, k=rng.randint(6, 30))),
            "hangul": lambda: "".join(rng.choices(HANGUL, k=rng.randint(6, 30))).strip(),
            "nfd": lambda: self.words(4).replace("e", "e\u0301").replace("o", "o\u0308"),  # combining marks
            "emoji": lambda: "".join(rng.choices(EMOJI, k=rng.randint(1, 4))), "sp": lambda: " " * rng.randint(2, 60),
            "py": lambda: "\n".join("        " + self.fill(rng.choice(PY_LINES)) for _ in range(rng.randint(2, 14))),
            "cpp": lambda: "\n".join("\t\t" + self.fill(rng.choice(CPP_LINES)) for _ in range(rng.randint(2, 14))),
            "tabs": lambda: "\t" * rng.randint(1, 6), "nls": lambda: "\n" * rng.randint(3, 9),
        }

    def fill(self, template: str) -> str:
        return re.sub(r"@([a-z]+)", lambda slot: self.slots[slot.group(1)](), template)

    def words(self, count: int) -> str:
        return " ".join(self.rng.choices(self.vocab, cum_weights=self.cum, k=count))

    def expr(self, depth: int) -> str:
        rng = self.rng
        if depth <= 0 or rng.random() < 0.25:
            return rng.choice((str(rng.randint(0, 99)), rng.choice(MATH_LETTERS), f"x_{{{rng.randint(1, 9)}}}"))
        x, y = self.expr(depth - 1), self.expr(depth - 1)  # math operands
        return rng.choice((f"\\frac{{{x}}}{{{y}}}", f"\\sqrt{{{x}}}", f"{x}^{{{y}}}", f"{x} + {y}", f"{x} - {y}",
                           f"{x} \\cdot {y}", f"\\left({x}\\right)", f"\\sin {x}", f"\\binom{{{x}}}{{{y}}}"))

    def code(self) -> str:
        self.names = [self.slots["i"]() for _ in range(5)]  # @v: the few names a function uses again and again
        text = self.fill(self.rng.choice(CODE))
        return text.replace("    ", "\t") if self.rng.random() < 0.1 else text  # some indent Python with tabs


class Pool:
    """One seed's blocks, each ending in its separator, with "\\n" or "\\r\\n" line endings, and their exact tokens."""

    def __init__(self, seed: int):
        writer, encoder = Writer(random.Random(f"synth-pool:{seed}")), load_encoder()
        made = {cat: [writer.fill(writer.rng.choice(templates)) for _ in range(count)]
                for cat, (count, _, templates) in CATEGORIES.items()}
        self.blocks, self.body = {}, {}
        for newline in ("\n", "\r\n"):
            for cat, (_, sep, _) in CATEGORIES.items():
                texts = [(text + sep).replace("\n", newline) for text in made[cat]]
                ends = encoder.encode_batch(texts)[1].tolist()  # text k's ids end at ends[k + 1]
                self.blocks[newline, cat] = list(zip(texts, map(int.__sub__, ends[1:], ends)))
            body = [pair for cat in BODY for pair in self.blocks[newline, cat]]
            self.body[newline] = [text for text, _ in body], [tokens for _, tokens in body]
        self.think_tokens = len(encoder.encode("<think>\n</think>\n\n"))  # special tokens: cuts on both sides
        self.cum, self.mean = {}, {}
        for domain, mix in DOMAIN_MIX.items():
            weights = [share / CATEGORIES[cat][0] for cat, share in zip(BODY, mix) for _ in range(CATEGORIES[cat][0])]
            self.cum[domain] = list(itertools.accumulate(weights))
            self.mean[domain] = sum(share * count for share, count in zip(weights, self.body["\n"][1])) / sum(weights)

    def fill(self, rng: random.Random, domain: str, newline: str, need: int) -> tuple[list[str], int]:
        """Body blocks in the domain's mix whose tokens reach `need`: one draw of ~90%, then a few top-ups."""
        (texts, counts), picked, got = self.body[newline], [], 0
        while got < need:
            num_more = max(1, int(0.9 * (need - got) / self.mean[domain]))
            more = rng.choices(range(len(texts)), cum_weights=self.cum[domain], k=num_more)
            picked += [texts[index] for index in more]
            got += sum([counts[index] for index in more])
        return picked, got


cached_pool = functools.lru_cache(maxsize=4)(Pool)  # the pool is built once per seed in a process


def row_length(rng: random.Random, median: float, sigma: float, force_long: bool) -> int:
    if force_long or rng.random() < TAIL_FRACTION:
        low, high = FORCED_RANGE if force_long else TAIL_RANGE
        return int(math.exp(rng.uniform(math.log(low), math.log(high))))
    while not BODY_RANGE[0] <= (tokens := rng.lognormvariate(math.log(median), sigma)) <= BODY_RANGE[1]:
        pass
    return int(tokens)


def make_row(rng: random.Random, pool: Pool, kind: str, force_long: bool = False) -> tuple[dict, int]:
    """A row and the exact token count of its message contents: a prompt of ~50-400 tokens, an answer
    of 80-1,200 tokens but at most a quarter of the row, and the reasoning for the rest."""
    source, domains, median, sigma = KINDS[kind]
    domain = rng.choices(list(domains), weights=list(domains.values()))[0]
    target = row_length(rng, median, sigma, force_long)
    newline = "\r\n" if rng.random() < CRLF_FRACTION else "\n"
    (ask, ask_tokens), (final, final_tokens), (closing, closing_tokens) = (
        rng.choice(pool.blocks[newline, cat]) for cat in ("ask", "final", "closing"))
    prompt, prompt_tokens = pool.fill(rng, domain, newline, rng.randint(50, 330) - ask_tokens)
    answer, answer_tokens = pool.fill(rng, domain, newline, min(rng.randint(80, 1200), target // 4) - final_tokens)
    tokens = closing_tokens + ask_tokens + prompt_tokens + final_tokens + answer_tokens + pool.think_tokens
    reasoning, reasoning_tokens = pool.fill(rng, domain, newline, target - tokens)
    extras = {cat: rng.choice(pool.blocks[newline, cat]) for cat, fraction in
              (("lookalike", LOOKALIKE_FRACTION), ("system", SYSTEM_FRACTION)) if rng.random() < fraction}
    if "lookalike" in extras:
        reasoning.insert(rng.randrange(len(reasoning) + 1), extras["lookalike"][0])
    reply = "".join(["<think>\n", *reasoning, closing, "</think>\n\n", *answer, final])  # one copy of the text
    messages = [{"role": "system", "content": extras["system"][0]}] if "system" in extras else []
    messages += [{"role": "user", "content": "".join(prompt) + ask}, {"role": "assistant", "content": reply}]
    tokens += reasoning_tokens + sum(count for _, count in extras.values())
    return {"messages": messages, "source": source}, tokens


def rows(kind: str, num_rows: int | None = None, num_tokens: int | None = None, seed: int = 0,
         *, force_long: Iterable[int] = ()) -> Iterator[dict]:
    """Rows of `kind` ("nemotron" or "ot3"), deterministic for `seed`. Stops after `num_rows` rows or once
    the rows' tokens (prep's encoder on the message contents) reach `num_tokens`, the row that crosses it
    included; with neither, never. Rows whose index is in `force_long` get 40k-80k tokens."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(KINDS)}")
    pool, rng, force_long = cached_pool(seed), random.Random(f"synth-rows:{kind}:{seed}"), set(force_long)
    index = total = 0
    while (num_rows is None or index < num_rows) and (num_tokens is None or total < num_tokens):
        row, tokens = make_row(rng, pool, kind, index in force_long)
        index, total = index + 1, total + tokens
        yield row


def write_jsonl(path, rows_iter: Iterable[dict], compresslevel: int = 1) -> int:
    """Write rows as JSON lines to `path` (gzip if .gz) atomically; return the row count. No name or mtime in the
    gzip header: same rows, same bytes. Level 1 is 4x faster than 6 on this text, for files 16% larger."""
    path, num_rows = Path(path), 0
    with atomic_file(path, f".tmp-{os.getpid()}") as raw:
        gz = path.suffix == ".gz"
        out = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=compresslevel) if gz else raw
        for row in rows_iter:
            out.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
            num_rows += 1
        if out is not raw:
            out.close()
    return num_rows
