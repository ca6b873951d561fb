"""Synthetic reasoning-trace rows in the HuggingFaceTB/smoltalk2 `Mid` schema.

We have no hub access, so the sample shipped in prep/sample/ and the benchmark
corpora are GENERATED here, not downloaded. Each row looks like a DeepSeek-R1
trace from Llama-Nemotron-Post-Training ("nemotron") or OpenThoughts3 ("ot3"):

    {"messages": [{"role": "system", "content": ...},      # ~10% of rows
                  {"role": "user", "content": prompt},      # 50-400 tokens
                  {"role": "assistant",
                   "content": "<think>\\n" + reasoning + "\\n</think>\\n\\n" + answer}],
     "source": "OpenThoughts3_1.2M"}

Usage (scripts run as `python scripts/x.py`, so `import synth` works from a sibling):

    import synth
    for row in synth.rows("ot3", num_tokens=50_000_000, seed=0): ...
    synth.write_jsonl("bench/ot3.jsonl.gz", synth.rows("ot3", num_rows=1000))

or from the shell: `python scripts/synth.py ot3 --rows 1000 --out /tmp/ot3.jsonl.gz`.

How it is fast (>= 20 MB/s on one core is required; the benchmark needs 50M+
tokens, ~200 MB of text): a pool of ~4,000 varied paragraphs / code blocks /
formulas is built ONCE per seed with ordinary Python loops (~0.06 s), and every
row is then assembled by sampling pool indices with random.choices and one
"".join. No per-word work happens per row.

Token counts are ESTIMATED from characters with a per-block-category
chars/token constant (calibrated offline against the Llama-3 BPE, which is the
SmolLM3 tokenizer's vocabulary). This module itself needs no tokenizer.

Everything is deterministic for a seed: only random.Random instances seeded
from strings are used (string seeds go through SHA-512, so they do not depend
on PYTHONHASHSEED), never the global random state.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import os
import random
import sys
from pathlib import Path
from typing import Iterable, Iterator

# ---------------------------------------------------------------------------
# Per-kind settings.
#
# Row lengths are (prompt + reasoning + answer) tokens:
#   body: lognormal, rejected outside [MIN_ROW_TOKENS, BODY_MAX_TOKENS];
#   tail: TAIL_FRACTION of rows log-uniform in [TAIL_MIN_TOKENS, TAIL_MAX_TOKENS],
#         i.e. rows that do not fit one 32,768-token sequence and must be split.
# Medians were tuned by simulation so the overall means come out at ~5k
# (nemotron) and ~12k (ot3) tokens; the tail adds ~0.015 * 55k = ~0.8k to each.
# ---------------------------------------------------------------------------
MIN_ROW_TOKENS = 400
BODY_MAX_TOKENS = 31_000
TAIL_FRACTION = 0.015
# 5% above 32,768 so that estimation error cannot pull a tail row under 32k.
TAIL_MIN_TOKENS = 34_500
TAIL_MAX_TOKENS = 80_000
# Rows forced long by `force_long` (make_sample.py): >= 56k estimated tokens is
# >= ~190k chars, which clears 32,768 tokens even at a pessimistic 5 chars/token.
FORCED_MIN_TOKENS = 56_000

KINDS = {
    "nemotron": {
        "source": "Llama_Nemotron_Post_Training_Dataset_reasoning_r1",
        "domains": {"math": 0.45, "code": 0.30, "science": 0.15, "chat": 0.10},
        "median": 2_900,
        "sigma": 0.9,
    },
    "ot3": {
        "source": "OpenThoughts3_1.2M",
        # OpenThoughts3-1.2M is roughly 850k math, 250k code, 100k science.
        "domains": {"math": 0.55, "code": 0.30, "science": 0.15},
        "median": 10_250,
        "sigma": 0.55,
    },
}

SYSTEM_FRACTION = 0.10     # rows with a system message
CRLF_FRACTION = 0.03       # rows whose prompt and reasoning use \r\n line endings
LOOKALIKE_FRACTION = 0.01  # rows with a special-token look-alike inside the text

# Characters per Llama-3 token for each block category, measured once with
# tiktoken (the Llama-3 BPE from llama_models, the SmolLM3 vocabulary) over the
# whole seed-0 pool. Prose is ~3.8, not English's usual ~4.4, because of its
# many 3-digit numbers; LaTeX splits into short tokens; long space runs merge.
# Row-level estimate/actual on 300 rows per kind: mean 1.01, range 0.91-1.10.
CHARS_PER_TOKEN = {
    "prose": 3.80,
    "latex": 2.10,
    "code": 3.18,
    "science": 2.65,
    "unicode": 2.48,
    "space": 6.60,
}

# Share of pool blocks per category in a row's reasoning, by domain.
DOMAIN_MIX = {
    "math":    {"prose": 0.50, "latex": 0.38, "code": 0.03, "science": 0.02, "unicode": 0.04, "space": 0.03},
    "code":    {"prose": 0.47, "latex": 0.05, "code": 0.38, "science": 0.01, "unicode": 0.04, "space": 0.05},
    "science": {"prose": 0.48, "latex": 0.14, "code": 0.02, "science": 0.28, "unicode": 0.05, "space": 0.03},
    "chat":    {"prose": 0.62, "latex": 0.02, "code": 0.05, "science": 0.03, "unicode": 0.25, "space": 0.03},
}

# Number of pool blocks per category (4,000 in all, ~1 MB of text).
POOL_SIZES = {"prose": 1500, "latex": 900, "code": 600, "science": 400, "unicode": 450, "space": 150}


# ---------------------------------------------------------------------------
# Vocabulary for the pool builders.
# ---------------------------------------------------------------------------
VARS = ["x", "y", "n", "k", "m", "a", "b", "t", "p", "q", "i", "j", "r", "s"]
THINGS = [
    "the discriminant", "the base case", "the recurrence", "the boundary condition",
    "the second term", "the sum over all pairs", "the edge case where n = 0",
    "the total count", "the remaining elements", "the constraint", "the original equation",
    "the modular inverse", "the prefix sums", "the time complexity", "the expected value",
    "the probability of success", "the limiting reagent", "the net force", "the denominator",
    "the last digit", "the parity argument", "the sorted order", "the adjacency list",
    "the loop invariant", "the shortest path", "the interval endpoints", "the hypotenuse",
    "the area of the triangle", "the equilibrium constant", "the initial velocity",
    "the number of divisors", "the greatest common divisor", "the carry in the addition",
    "the overlap between the sets", "the radius of the circle", "the slope of the line",
    "the off-by-one error", "the memo table", "the answer modulo 10^9 + 7", "the sign of the root",
]
APPROACHES = [
    "dynamic programming", "a greedy strategy", "binary search on the answer",
    "the inclusion-exclusion principle", "conservation of energy", "Vieta's formulas",
    "a two-pointer sweep", "induction on n", "the Chinese remainder theorem",
    "coordinate geometry", "a BFS from the source", "complementary counting",
    "the law of cosines", "stoichiometry", "generating functions", "a segment tree",
    "memoization", "Le Chatelier's principle", "the AM-GM inequality", "modular arithmetic",
    "a union-find structure", "Fermat's little theorem", "symmetry", "a sweep line",
]
SENTENCES = [
    "Okay, so I need to figure out {thing}.",
    "Wait, let me re-check {thing}.",
    "Hmm, that doesn't seem right.",
    "So the answer is {n1}.",
    "Let me compute {n1} times {n2}, which is {prod}.",
    "That gives {n1} + {n2} = {sum}.",
    "But wait, what about {thing}?",
    "Alternatively, maybe I should use {approach}.",
    "Let me think about this differently.",
    "Actually, no: {thing} has to be at most {n1}.",
    "So if {x} = {n1}, then {thing} becomes {n2}.",
    "I think {approach} is the right way to go here.",
    "Let me verify with a small example, say {x} = {n3}.",
    "Hold on, I made a mistake in {thing}.",
    "Therefore, {thing} is {n2}.",
    "That matches the expected output, so the logic seems correct.",
    "Now, {thing} depends on {thing2}.",
    "Let me try plugging in {x} = {n3} to see if it works.",
    "Yes, that checks out.",
    "Hmm, so maybe {thing} is not needed at all.",
    "The problem says {thing} must be positive, so we discard the negative case.",
    "So the total would be {n1} * {n2} = {prod}, right?",
    "Let me recount: {n1}, {n2}, {n3}... that's three cases.",
    "First, I'll consider {thing}, then {thing2}.",
    "This is getting complicated. Let me step back.",
    "Using {approach}, {thing} simplifies nicely.",
    "Okay, that makes sense.",
    "Wait, no. I think I confused {thing} with {thing2}.",
    "So we have {n1} possibilities for {thing}.",
    "Is that correct? Let me double-check by another method.",
    "Wait, let me re-check… if {x} is {n3}, the result should be {n2}, not {n1}.",
    "Maybe there's a pattern here: {n3}, {n1}, {n2}, and so on.",
    "I remember that {approach} works well when {thing} is small.",
    "But the constraints say n can be up to {big}, so O(n^2) is too slow.",
    "Let's see. {thing} is fixed once we choose {thing2}.",
    "So {x} can't be {n3}, because then {thing} would be negative.",
    "Hmm, I'm not sure. Let me write it out more carefully.",
    "Right, so the key insight is {approach}.",
]
OPENERS = ["", "", "", "Okay, ", "Hmm. ", "Wait. ", "Alright, ", "So, ", "Let me see. ", "Now, "]

PY_TEMPLATES = [
    '''def @fn@(@arr@):
    n = len(@arr@)
    dp = [0] * (n + 1)
    for i in range(1, n + 1):
        dp[i] = max(dp[i - 1], dp[i - 1] + @arr@[i - 1])
        if dp[i] > @num@:
            dp[i] %= 1_000_000_007
    return dp[n]
''',
    '''import sys
from collections import defaultdict, deque

def @fn@():
    data = sys.stdin.read().split()
    n, m = int(data[0]), int(data[1])
    graph = defaultdict(list)
    for k in range(m):
        u, v = int(data[2 + 2 * k]), int(data[3 + 2 * k])
        graph[u].append(v)
        graph[v].append(u)
    dist = {1: 0}
    queue = deque([1])
    while queue:
        u = queue.popleft()
        for v in graph[u]:
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    print(dist.get(n, -1))

if __name__ == "__main__":
    @fn@()
''',
    '''def @fn@(@arr@, target=@num@):
    lo, hi = 0, len(@arr@) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if @arr@[mid] == target:
            return mid
        elif @arr@[mid] < target:
            lo = mid + 1
        else:
            hi = mid - 1
    return -1

print(@fn@([1, 3, 5, 7, 9, 11], @num2@))  # expected: -1 unless @num2@ is in the list
''',
    '''class @cls@:
    def __init__(self, size):
        self.parent = list(range(size))
        self.rank = [0] * size

    def find(self, x):
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if self.rank[ra] < self.rank[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.rank[ra] += self.rank[ra] == self.rank[rb]
        return True
''',
    '''from functools import lru_cache

@lru_cache(maxsize=None)
def @fn@(n, k=@num2@):
    """Number of ways to write n as an ordered sum of parts <= k."""
    if n == 0:
        return 1
    return sum(@fn@(n - p, k) for p in range(1, min(n, k) + 1)) % 998244353

for n in range(@num2@):
    print(n, @fn@(n))
''',
    '''def @fn@(s: str) -> dict[str, int]:
    counts = {}
    for ch in s.lower():
        if ch.isalpha():
            counts[ch] = counts.get(ch, 0) + 1
    # sort by frequency, then alphabetically
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
''',
]
CPP_TEMPLATES = [
    '''#include <bits/stdc++.h>
using namespace std;

int main() {
\tios::sync_with_stdio(false);
\tcin.tie(nullptr);
\tint n;
\tcin >> n;
\tvector<long long> @arr@(n);
\tfor (auto &v : @arr@) cin >> v;
\tlong long best = LLONG_MIN, cur = 0;
\tfor (int i = 0; i < n; ++i) {
\t\tcur = max(@arr@[i], cur + @arr@[i]);
\t\tbest = max(best, cur);
\t}
\tcout << best % @num@ << "\\n";
\treturn 0;
}
''',
    '''template <typename T>
struct @cls@ {
\tint n;
\tvector<T> t;
\texplicit @cls@(int n) : n(n), t(n + 1, 0) {}
\tvoid add(int i, T v) {
\t\tfor (++i; i <= n; i += i & -i) t[i] += v;
\t}
\tT sum(int i) const {  // prefix sum of [0, i)
\t\tT s = 0;
\t\tfor (; i > 0; i -= i & -i) s += t[i];
\t\treturn s;
\t}
};
''',
    '''long long @fn@(long long base, long long e, long long mod = @num@) {
    long long result = 1;
    base %= mod;
    while (e > 0) {
        if (e & 1) result = result * base % mod;
        base = base * base % mod;
        e >>= 1;
    }
    return result;
}
''',
    '''vector<int> @fn@(const vector<vector<int>>& adj, int src) {
\tvector<int> dist(adj.size(), INT_MAX);
\tpriority_queue<pair<int,int>, vector<pair<int,int>>, greater<>> pq;
\tdist[src] = 0;
\tpq.push({0, src});
\twhile (!pq.empty()) {
\t\tauto [d, u] = pq.top(); pq.pop();
\t\tif (d > dist[u]) continue;
\t\tfor (int v : adj[u]) {
\t\t\tif (dist[u] + 1 < dist[v]) {
\t\t\t\tdist[v] = dist[u] + 1;
\t\t\t\tpq.push({dist[v], v});
\t\t\t}
\t\t}
\t}
\treturn dist;
}
''',
]
FN_NAMES = ["solve", "count_ways", "max_subarray", "find_index", "min_cost", "build",
            "check", "compute", "helper", "dfs", "bfs", "process_queries", "power_mod", "dijkstra"]
ARR_NAMES = ["arr", "nums", "a", "values", "weights", "heights", "costs", "xs"]
CLS_NAMES = ["DSU", "UnionFind", "Fenwick", "BIT", "SegTree", "Solver"]

SCIENCE_SENTENCES = [
    "The molar mass of H₂SO₄ is 98.08 g/mol, so {n1} g corresponds to {mol} mol.",
    "Using F = ma with m = {n3} kg and a = {acc} m/s², we get F = {force} N.",
    "At 25 °C the ion product of water is K_w = 1.0 × 10⁻¹⁴, so pH + pOH = 14.",
    "The reaction 2H₂ + O₂ → 2H₂O is exothermic, ΔH° ≈ −{n1} kJ/mol.",
    "With λ = {n1} nm, the photon energy is E = hc/λ ≈ {ev} eV.",
    "Avogadro's number is 6.022 × 10²³ mol⁻¹, so we multiply by that.",
    "The friction coefficient μ = 0.{n3} gives a friction force of μN.",
    "A resistance of {n3} Ω with a current of 2 A dissipates P = I²R = {p} W.",
    "The bond length is about 1.{n3} Å, which is typical for a C–C single bond.",
    "ΔG° = ΔH° − TΔS°, and at T = {n1} K the sign of ΔG° decides spontaneity.",
    "The half-life t₁/₂ = ln 2 / k, so with k = 0.0{n3} s⁻¹ we get about {half} s.",
    "In the Krebs cycle, each acetyl-CoA yields 3 NADH, 1 FADH₂ and 1 GTP.",
    "The wavefunction ψ must be normalized: ∫|ψ|² dx = 1.",
    "Mitochondria are about 0.5–{n3} μm long.",
    "So the equilibrium shifts to the right, toward more NH₃ (Le Chatelier).",
    "Converting units: {n1} mL = 0.{n1} L (approximately), and 1 atm = 101.325 kPa.",
    "Wait, I should check significant figures: the data only has 3, so the answer is {mol} mol.",
]

# Multilingual snippets: accented Latin (including one decomposed NFD form),
# Greek, Cyrillic, CJK, Korean, Arabic, Hebrew, Devanagari, Thai, Vietnamese.
FOREIGN = [
    "Donc la réponse est {n}. Vérifions : l'élève a déjà résolu ce problème à l'école, où ça a été expliqué.",
    "¿Cuántos niños hay en el salón? La respuesta es {n}, según el año pasado; ¡qué difícil!",
    "Die Größe des Straßennetzes beträgt ungefähr {n} km; übrigens ist das Ergebnis schön.",
    "Não sei se a solução está correta, mas a função é contínua em todo o domínio.",
    "Cafe\u0301 et re\u0301sume\u0301 (forme décomposée NFD) — naïve façade, coöperate.",
    "Το αποτέλεσμα είναι {n}. Έστω α, β, γ οι γωνίες του τριγώνου, τότε α + β + γ = π.",
    "Следовательно, ответ равен {n}. Проверим ещё раз, всё ли правильно.",
    "所以答案是{n}。我们需要先计算三角形的面积，然后验证结果是否正确。",
    "したがって、答えは{n}です。もう一度確認してみましょう。計算は正しいはずです。",
    "따라서 답은 {n}입니다. 다시 한 번 확인해 보겠습니다.",
    "إذن الجواب هو {n}. دعنا نتحقق من ذلك مرة أخرى خطوة بخطوة.",
    "לכן התשובה היא {n}. בוא נבדוק שוב.",
    "इसलिए उत्तर {n} है। आइए फिर से जाँच करें।",
    "ดังนั้นคำตอบคือ {n} ลองตรวจสอบอีกครั้ง",
    "Vậy đáp án là {n}. Hãy kiểm tra lại một lần nữa nhé.",
    "Dolayısıyla cevap {n}. Şimdi tekrar kontrol edelim; işlem doğru görünüyor.",
    "∀ε > 0 ∃δ > 0 : |x − a| < δ ⇒ |f(x) − L| < ε, and √2 ≈ 1.414, ∑ ≤ ∞, x ≠ y.",
]
EMOJI = [
    "\U0001F44D", "\U0001F389", "\U0001F914", "\u2705", "\u274C", "\U0001F680", "\U0001F605",
    "\U0001F64F\U0001F3FD",                                             # folded hands, skin tone
    "\U0001F468\u200D\U0001F469\u200D\U0001F467\u200D\U0001F466",       # family (ZWJ sequence)
    "\U0001F469\u200D\U0001F4BB",                                       # woman technologist (ZWJ)
    "\U0001F3F3\uFE0F\u200D\U0001F308",                                 # rainbow flag (ZWJ + VS16)
    "\u2764\uFE0F\u200D\U0001F525",                                     # heart on fire (ZWJ)
    "\U0001F9D1\U0001F3FF\u200D\U0001F52C",                             # scientist, skin tone (ZWJ)
    "\U0001F1EB\U0001F1F7",                                             # flag: France (regional indicators)
    "1\uFE0F\u20E3",                                                    # keycap 1
]
CHAT_LINES = [
    "The user is writing in another language, so I should answer in the same language.",
    "They also used some emoji, which suggests a casual tone is fine.",
    "Let me translate the key sentence first to make sure I understand it.",
    "I should keep the reply friendly and concise.",
    "Hmm, the message mixes two languages; I'll mirror that.",
]

# Strings that look like special tokens but are plain text inside content
# (tokenizers must not turn them into the real special tokens). `</think>` is
# deliberately absent so each assistant message has exactly one `</think>`.
LOOKALIKES = ["<|im_end|>", "<|im_start|>assistant", "<think>", "<|begin_of_text|>",
              "<|eot_id|>", "<|end_of_text|>", "<|reserved_special_token_3|>"]

SYSTEM_PROMPTS = [
    "detailed thinking on",
    "You are a helpful assistant.",
    "You are a helpful and harmless assistant. You should think step-by-step.",
    "Your role as an assistant involves thoroughly exploring questions through a systematic "
    "long thinking process before providing the final precise and accurate solutions.",
    "You are an expert competitive programmer. Think carefully, then give a complete solution in Python.",
]


# ---------------------------------------------------------------------------
# Pool builders: each returns one block of text (no trailing blank line).
# They are slow-ish Python, but run only ~4,000 times per seed.
# ---------------------------------------------------------------------------
def _fill(rng: random.Random, template: str) -> str:
    n1, n2, n3 = rng.randint(2, 999), rng.randint(2, 999), rng.randint(2, 60)
    return template.format(
        thing=rng.choice(THINGS), thing2=rng.choice(THINGS), approach=rng.choice(APPROACHES),
        x=rng.choice(VARS), n1=n1, n2=n2, n3=n3, sum=n1 + n2, prod=n1 * n2,
        big=rng.choice(["10^5", "2 * 10^5", "10^6", "10^9", "10^{18}"]),
    )


def _prose(rng: random.Random) -> str:
    sentences = [_fill(rng, rng.choice(SENTENCES)) for _ in range(rng.randint(3, 9))]
    if rng.random() < 0.15:  # numbered steps, one per line
        return "\n".join(f"{i}. {s}" for i, s in enumerate(sentences, 1))
    return rng.choice(OPENERS) + " ".join(sentences)


def _frac(a, b) -> str:
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _latex(rng: random.Random) -> str:
    a, b, c = rng.randint(1, 12), rng.randint(-20, 20), rng.randint(-50, 50)
    p, q = rng.randint(1, 30), rng.randint(2, 40)
    v = rng.choice(["x", "y", "t", "n", "z"])
    form = rng.randrange(9)
    if form == 0:
        return (f"So we get ${a}{v}^2 + {b}{v} + {c} = 0$, and the discriminant is "
                f"$\\Delta = b^2 - 4ac = {b * b - 4 * a * c}$. "
                + ("Since it is negative, there are no real roots." if b * b < 4 * a * c
                   else f"So ${v} = " + _frac(f"{-b} \\pm \\sqrt{{{b * b - 4 * a * c}}}", 2 * a) + "$."))
    if form == 1:
        return ("\\[\n" + _frac(p, q) + " + " + _frac(a, q + 1) + " = "
                + _frac(p * (q + 1) + a * q, q * (q + 1)) + "\n\\]")
    if form == 2:
        return ("The sum of squares formula gives\n\\[\n\\sum_{k=1}^{n} k^2 = "
                + _frac("n(n+1)(2n+1)", 6) + f",\n\\]\nso for $n = {q}$ it is "
                f"${q * (q + 1) * (2 * q + 1) // 6}$.")
    if form == 3:
        return (f"Wait, by Pythagoras $x^2 + y^2 = z^2$, so with $x = {3 * a}$ and $y = {4 * a}$ "
                f"we get $z = \\sqrt{{{9 * a * a} + {16 * a * a}}} = {5 * a}$.")
    if form == 4:
        return (f"\\[\n\\int_{{0}}^{{{a}}} {v}^{{{p % 5 + 1}}} \\, d{v} = \\left[ "
                + _frac(f"{v}^{{{p % 5 + 2}}}", p % 5 + 2) + f" \\right]_0^{{{a}}} = "
                + _frac(a ** (p % 5 + 2), p % 5 + 2) + "\n\\]")
    if form == 5:
        return ("\\begin{aligned}\n"
                f"f({v}) &= {a}{v}^3 - {abs(b)}{v} + {abs(c)} \\\\\n"
                f"f'({v}) &= {3 * a}{v}^2 - {abs(b)} \\\\\n"
                f"f''({v}) &= {6 * a}{v}\n\\end{{aligned}}")
    if form == 6:
        return (f"The matrix $A = \\begin{{pmatrix}} {a} & {b} \\\\ {c} & {p} \\end{{pmatrix}}$ has "
                f"$\\det A = {a * p - b * c}$ and $\\operatorname{{tr}} A = {a + p}$. "
                f"Also $\\binom{{{q}}}{{2}} = {q * (q - 1) // 2}$.")
    if form == 7:
        return (f"Hmm, $\\lim_{{{v} \\to 0}} " + _frac(f"\\sin({a}{v})", v) + f" = {a}$, and "
                f"$\\lfloor {p}/{a} \\rfloor = {p // a}$, $ {p} \\equiv {p % q} \\pmod{{{q}}}$, "
                f"$\\theta = " + _frac("\\pi", rng.choice([2, 3, 4, 6])) + "$.")
    return f"So the answer is $\\boxed{{{p * q}}}$. Let me double-check: ${p} \\cdot {q} = {p * q}$, yes."


def _code(rng: random.Random) -> str:
    if rng.random() < 0.65:
        body, lang = rng.choice(PY_TEMPLATES), "python"
        if rng.random() < 0.15:  # some people indent Python with tabs
            body = body.replace("    ", "\t")
    else:
        body, lang = rng.choice(CPP_TEMPLATES), "cpp"
    body = (body.replace("@fn@", rng.choice(FN_NAMES)).replace("@arr@", rng.choice(ARR_NAMES))
            .replace("@cls@", rng.choice(CLS_NAMES)).replace("@num@", str(rng.choice([10**9 + 7, 998244353, 1000])))
            .replace("@num2@", str(rng.randint(3, 40))))
    intro = rng.choice(["Let me write the code.", "Here's a first attempt:", "Let me code this up:",
                        "So the code would be something like:", "Wait, let me fix the implementation:"])
    after = rng.choice(["", "", "Let me trace through this with the sample input.",
                        "This should be O(n log n).", "Hmm, but this might time out for large n."])
    return f"{intro}\n\n```{lang}\n{body}```" + (f"\n\n{after}" if after else "")


def _science(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(2, 6)):
        n1, n3 = rng.randint(100, 900), rng.randint(2, 9)
        out.append(rng.choice(SCIENCE_SENTENCES).format(
            n1=n1, n3=n3, mol=f"{n1 / 98.08:.3f}", acc=f"{rng.uniform(0.5, 9.8):.2f}",
            force=f"{n3 * 4.9:.1f}", ev=f"{1239.84 / n1:.2f}", p=4 * n3, half=f"{69.3 / n3:.1f}"))
    if rng.random() < 0.3:
        out.append(_fill(rng, rng.choice(SENTENCES)))
    return " ".join(out)


def _unicode(rng: random.Random) -> str:
    parts = [rng.choice(CHAT_LINES)]
    for _ in range(rng.randint(1, 4)):
        parts.append(rng.choice(FOREIGN).format(n=rng.randint(2, 999)))
        if rng.random() < 0.5:
            parts.append("".join(rng.choices(EMOJI, k=rng.randint(1, 3))))
    return " ".join(parts)


def _space(rng: random.Random) -> str:
    form = rng.randrange(4)
    if form == 0:  # fixed-width table padded with long space runs
        width = rng.randint(8, 40)
        lines = [f"{'n':<{width}}{'f(n)':>{width}}"]
        lines += [f"{i:<{width}}{i * i + rng.randint(0, 9):>{width}}" for i in range(1, rng.randint(4, 10))]
        return "\n".join(lines)
    if form == 1:  # ASCII tree diagram
        return "        1\n       / \\\n      2   3\n     / \\   \\\n    4   5   6\n\n\n\nSo the tree has depth 3."
    if form == 2:  # a very long run of spaces in the middle of a line, plus trailing spaces
        return ("Position:" + " " * rng.randint(16, 200) + "^" + "   \n"
                + "\t\t\t" + "value" + "\t" * rng.randint(1, 6) + str(rng.randint(0, 99)))
    return "Let me leave some room here." + "\n" * rng.randint(3, 9) + "Okay, continuing."


BUILDERS = {"prose": _prose, "latex": _latex, "code": _code,
            "science": _science, "unicode": _unicode, "space": _space}


# ---------------------------------------------------------------------------
# Prompts and answers (built per row: they are short, a few pool-free lines).
# ---------------------------------------------------------------------------
def _prompt_head(rng: random.Random, domain: str) -> str:
    a, b, n = rng.randint(2, 50), rng.randint(2, 50), rng.randint(3, 2 * 10**5)
    if domain == "math":
        head = ("Solve the following math problem. Make sure to put the answer (and only answer) "
                "inside \\boxed{}.\n\n" if rng.random() < 0.5 else "")
        return head + rng.choice([
            f"Let $f(x) = x^2 + {a}x + {b}$. Find the sum of all real $x$ such that $f(f(x)) = {a + b}$.",
            f"How many positive integers $n \\le {n}$ satisfy $n^2 \\equiv 1 \\pmod{{{a}}}$?",
            f"A triangle has sides {a}, {b} and $c$. If the angle between the first two is "
            f"$\\frac{{\\pi}}{{3}}$, find $c^2$.",
            f"Compute $\\sum_{{k=1}}^{{{a}}} \\binom{{{a}}}{{k}} k$.",
        ])
    if domain == "code":
        return rng.choice([
            f"You are given an array of n integers a_1, a_2, ..., a_n. Find the maximum sum of a "
            f"contiguous subarray.\n\nInput\n\nThe first line contains n (1 ≤ n ≤ {n}).\nThe second "
            f"line contains n integers.\n\nOutput\n\nPrint one integer.\n\nExamples\n\nInput\n\n3\n"
            f"{a} -{b} {a + b}\n\nOutput\n\n{max(a + b, a)}",
            f"Write a Python function that returns the number of ways to climb {a} stairs taking "
            f"1 or 2 steps at a time. Explain the complexity.",
            f"Implement Dijkstra's algorithm in C++ for a graph with up to {n} vertices and "
            f"{2 * n} edges.",
        ])
    if domain == "science":
        return rng.choice([
            f"Which of the following best explains why {a} g of NaCl dissolves faster in warm water?\n"
            "A) Higher entropy of the solid\nB) Faster molecular motion\nC) Lower density\nD) Stronger ionic bonds",
            f"A {a} kg block slides down a frictionless incline of angle {b}°. What is its acceleration?",
            "Explain the role of ATP synthase in oxidative phosphorylation.",
        ])
    return rng.choice([
        "Can you explain the difference between a list and a tuple in Python?",
        "Écris-moi un petit poème sur la mer, s'il te plaît. \U0001F30A",
        "我想学习机器学习，应该从哪里开始？",
        "What's a good way to stay focused while studying? \U0001F914",
        "¿Me puedes ayudar a planear un viaje de tres días a Lisboa?",
    ])


def _answer_tail(rng: random.Random, domain: str) -> str:
    if domain == "math":
        return f"**Final Answer**\n\\[\n\\boxed{{{rng.randint(0, 10**4)}}}\n\\]"
    if domain == "code":
        return "The solution runs in $O(n \\log n)$ time and $O(n)$ memory."
    if domain == "science":
        return f"The answer is **{rng.choice('ABCD')}**."
    return rng.choice(["I hope this helps! \U0001F60A", "Let me know if you have any questions.",
                       "¡Espero que te sirva! \U0001F44D"])


# ---------------------------------------------------------------------------
# The pool and row assembly.
# ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _pool(seed: int):
    """Build the block pool for a seed.

    Returns (texts, token estimates, {domain: cum_weights}, {domain: mean block estimate}).
    """
    rng = random.Random(f"synth-pool:{seed}")
    texts, est, cats = [], [], []
    for cat, count in POOL_SIZES.items():
        build, cpt = BUILDERS[cat], CHARS_PER_TOKEN[cat]
        for _ in range(count):
            t = build(rng)
            texts.append(t)
            est.append(len(t) / cpt + 1)  # +1 for the "\n\n" joining blocks
            cats.append(cat)
    cum = {}
    for domain, mix in DOMAIN_MIX.items():
        acc, cw = 0.0, []
        for cat in cats:
            acc += mix[cat] / POOL_SIZES[cat]
            cw.append(acc)
        cum[domain] = cw
    mean_est = {d: sum(e * (cum[d][i] - (cum[d][i - 1] if i else 0.0)) for i, e in enumerate(est)) / cum[d][-1]
                for d in DOMAIN_MIX}
    return texts, est, cum, mean_est


def _blocks(rng: random.Random, pool, domain: str, tokens: float) -> tuple[str, float]:
    """Join random pool blocks until their estimated tokens reach `tokens`."""
    texts, est, cum, mean_est = pool
    idx_all = range(len(texts))
    # Draw ~90% of the expected count in one go, then top up a few at a time, so a
    # row costs a handful of C-level calls whatever its length.
    idx = rng.choices(idx_all, cum_weights=cum[domain], k=max(1, int(0.9 * tokens / mean_est[domain])))
    got = sum(est[i] for i in idx)
    while got < tokens:
        more = rng.choices(idx_all, cum_weights=cum[domain], k=max(1, int((tokens - got) / mean_est[domain])))
        got += sum(est[i] for i in more)
        idx += more
    return "\n\n".join([texts[i] for i in idx]), got


def _target_tokens(rng: random.Random, spec: dict, force_long: bool) -> int:
    if force_long or rng.random() < TAIL_FRACTION:
        lo = FORCED_MIN_TOKENS if force_long else TAIL_MIN_TOKENS
        return int(math.exp(rng.uniform(math.log(lo), math.log(TAIL_MAX_TOKENS))))
    while True:
        t = rng.lognormvariate(math.log(spec["median"]), spec["sigma"])
        if MIN_ROW_TOKENS <= t <= BODY_MAX_TOKENS:
            return int(t)


def _row(rng: random.Random, pool, kind: str, force_long: bool = False) -> tuple[dict, float]:
    spec = KINDS[kind]
    domains = spec["domains"]
    domain = rng.choices(list(domains), weights=list(domains.values()))[0]
    target = _target_tokens(rng, spec, force_long)

    # Prompt: a domain question topped up with pool blocks to 50-330 tokens; the
    # last block overshoots by up to ~100 tokens, so prompts land at ~50-450.
    prompt_target = rng.randint(50, 330)
    prompt = _prompt_head(rng, domain)
    prompt_est = len(prompt) / 3.2
    if prompt_est < prompt_target:
        extra, e = _blocks(rng, pool, domain, prompt_target - prompt_est)
        prompt, prompt_est = prompt + "\n\n" + extra, prompt_est + e

    # Answer: 80-1200 tokens but at most ~25% of the row; the rest is reasoning.
    answer_target = min(rng.randint(80, 1200), 0.25 * target)
    answer_body, answer_est = _blocks(rng, pool, domain, answer_target)
    answer = answer_body + "\n\n" + _answer_tail(rng, domain)
    reasoning, reasoning_est = _blocks(rng, pool, domain, max(100.0, target - prompt_est - answer_est))

    r = rng.random()
    if r < LOOKALIKE_FRACTION:  # a special-token look-alike somewhere in the middle of the reasoning
        cut = reasoning.find(" ", rng.randrange(len(reasoning)))
        cut = cut if cut >= 0 else len(reasoning)
        reasoning = reasoning[:cut] + " " + rng.choice(LOOKALIKES) + reasoning[cut:]
    elif r < LOOKALIKE_FRACTION + CRLF_FRACTION:  # Windows line endings in prompt and reasoning
        prompt, reasoning = prompt.replace("\n", "\r\n"), reasoning.replace("\n", "\r\n")

    messages = []
    if rng.random() < SYSTEM_FRACTION:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{answer}"})
    return {"messages": messages, "source": spec["source"]}, prompt_est + answer_est + reasoning_est + 10


def rows(kind: str, num_rows: int | None = None, num_tokens: int | None = None, seed: int = 0,
         *, force_long: Iterable[int] = ()) -> Iterator[dict]:
    """Yield synthetic rows of `kind` ("nemotron" or "ot3"), deterministic for `seed`.

    Stops after `num_rows` rows or once the estimated token total reaches
    `num_tokens` (the row that crosses it is included), whichever comes first;
    with neither, the iterator is endless. Rows whose index is in `force_long`
    get a length of 56k-80k estimated tokens (make_sample.py uses this to
    guarantee rows that must be split across 32k sequences).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(KINDS)}")
    pool = _pool(seed)
    rng = random.Random(f"synth-rows:{kind}:{seed}")
    force_long = set(force_long)
    total, i = 0.0, 0
    while (num_rows is None or i < num_rows) and (num_tokens is None or total < num_tokens):
        row, est = _row(rng, pool, kind, force_long=i in force_long)
        total += est
        i += 1
        yield row


def write_jsonl(path, rows_iter: Iterable[dict]) -> int:
    """Write rows as JSON lines to `path` (gzip if it ends in .gz); return the row count.

    Writes to a temp file in the same directory and os.replace()s it, so readers
    never see a half-written file. The gzip header has no filename and mtime=0,
    so the same rows always give the same bytes.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    try:
        with open(tmp, "wb") as raw:
            # Level 6: several times faster than 9 on this text for ~1% larger files.
            out = (gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6)
                   if path.suffix == ".gz" else raw)
            batch, size = [], 0
            for row in rows_iter:
                line = json.dumps(row, ensure_ascii=False) + "\n"
                batch.append(line)
                size += len(line)
                n += 1
                if size > 4_000_000:  # write in ~4 MB chunks: few large writes are cheapest
                    out.write("".join(batch).encode("utf-8"))
                    batch, size = [], 0
            out.write("".join(batch).encode("utf-8"))
            if out is not raw:
                out.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Write synthetic smoltalk2-Mid rows as JSON lines.")
    ap.add_argument("kind", choices=sorted(KINDS))
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None, help="stop at this many estimated tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output path (.jsonl or .jsonl.gz)")
    args = ap.parse_args()
    if args.rows is None and args.tokens is None:
        sys.exit("give --rows and/or --tokens")
    count = write_jsonl(args.out, rows(args.kind, args.rows, args.tokens, args.seed))
    print(f"wrote {count} rows to {args.out}")
