"""Side by side with the tools users would otherwise pick, on the same input, in one run, as ratios.

    .venv/bin/pip install -e '.[bench]' torch==2.13.0          # trl, datatrove, psutil, orjson
    .venv/bin/python scripts/bench_peers.py                     # 50M tokens, 3 repeats (~30 min on 2 quiet cores)
    .venv/bin/python scripts/bench_peers.py --tokens 5e6 --repeats 1 --train-steps 3   # a quick check

One generated corpus in the smoltalk2 `Mid` schema (scripts/bench_prep.py's: Nemotron-like and
OpenThoughts-like rows with realistic lengths, ~1.5% longer than 32k), one tokenizer (SmolLM3's,
saved to a local directory every peer loads), seq-len 32768. Then:
  1. prep, jsonl.gz -> training-ready files, each peer a subprocess (wall time, peak RSS of its
     whole process tree, tokens/s):
       ours:      `prep build --mix nemotron=0.5,ot3=0.5`
       TRL:       what SFTTrainer does for the alignment-handbook recipe: `load_dataset("json")`,
                  `map(apply_chat_template(tokenize=True))` and `pack_dataset(strategy="bfd")`, both
                  with num_proc = cores, then `save_to_disk`
       datatrove: `JsonlReader` (an adapter renders the same ChatML text from `messages`) ->
                  `DocumentTokenizer`, tasks = workers = cores
  2. training data path: one ready batch (input_ids, position_ids, labels) of one 32k sequence:
     our `train.data.Loader.build` on the memory-mapped shards vs TRL's Trainer path, the dataset's
     `__getitems__` then `DataCollatorForLanguageModeling(padding_free=True)`, on its packed dataset.
  3. training on CPU: our trainer vs SFTTrainer (padding-free), tiny SmolLM3, same init, same packed
     rows (ours, seq-len 1024, built from the same corpus) in the same order: scripts/bench_train.py's
     runs, reused; tokens/s, peak RSS and the losses step by step.
Every number is the median of --repeats runs, interleaved so a slow moment of the machine hits all
peers alike. Outputs, logs and results.json go to --work; the ratios to a PNG chart (--chart).
"""

import argparse
import gzip
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import bench_prep  # noqa: E402
import synth  # noqa: E402

SEQ_LEN = 32768
KINDS = ("nemotron", "ot3")
# Set for every child: peers never reach the hub here, and without these datasets/transformers retry it for ~25-50 s.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


# ---------------------------------------------------------------------------------------------
# Measuring a subprocess
# ---------------------------------------------------------------------------------------------

def measure(cmd: list[str], log: Path) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (MB) summed over the process tree, and the largest single process's
    peak RSS (ru_maxrss from os.wait4) of one command. The tree matters: TRL and datatrove fork
    num_proc workers, and what the machine must hold is their sum (a slight overcount: forked
    workers share some pages with their parent). The sampling every 50 ms can miss a short spike,
    so the tree's peak is at least ru_maxrss. ru_maxrss counts the RSS of *this* process at fork
    time too (Linux carries the high-water mark across exec), which is why this process never
    imports torch, transformers or datasets itself. Each command starts after an `os.sync()`: ours
    fsyncs its shards, and on ext4 an fsync can wait for the previous peer's unwritten data
    (TRL's and datatrove's outputs and caches, hundreds of MB) to reach the disk first."""
    import psutil

    os.sync()  # outside the clock: the previous command's writes reach the disk before this one runs
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        peak, done = [0], threading.Event()

        def sample():
            root = psutil.Process(proc.pid)
            while not done.is_set():
                total = 0
                try:
                    for p in [root, *root.children(recursive=True)]:
                        try:
                            total += p.memory_info().rss
                        except psutil.Error:
                            pass
                except psutil.Error:
                    pass
                peak[0] = max(peak[0], total)
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    if status != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed (status {status}); its output is in {log}:\n"
                 + log.read_text()[-3000:])
    return seconds, max(peak[0] / 2**20, usage.ru_maxrss / 1024), usage.ru_maxrss / 1024


def median_runs(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


# ---------------------------------------------------------------------------------------------
# The corpus: the same documents for every peer
# ---------------------------------------------------------------------------------------------

def tokenizer_dir(work: Path) -> Path:
    """SmolLM3's tokenizer with the recipe's ChatML template, saved where every peer loads it from
    (by a child process: this one stays small, see `measure`)."""
    path = work / "tokenizer"
    if not (path / "tokenizer.json").exists():
        subprocess.run([sys.executable, __file__, "--child", "tokenizer", "--out", str(path)], check=True)
    return path


def prep_cmd(corpus: dict[str, Path], num_tokens: int, tok: Path, out: Path, seq_len: int = SEQ_LEN) -> list[str]:
    return [*bench_prep.prep_command(corpus, num_tokens, out), "--tokenizer", str(tok), "--seq-len", str(seq_len)]


def same_documents(work: Path, num_tokens: int, tok: Path) -> dict[str, Path]:
    """jsonl.gz files holding exactly the rows `prep build --max-tokens` mixes from bench_prep's
    corpus (it reads a little of each source beyond what it keeps), so that every peer reads
    whole files and all three see the same documents."""
    corpus_dir = work / f"corpus-{num_tokens}"
    paths = {kind: corpus_dir / f"{kind}.jsonl.gz" for kind in KINDS}
    if all(p.exists() for p in paths.values()):
        return paths
    full = bench_prep.make_corpus(work, num_tokens, ".jsonl.gz")
    out = work / "calibrate"
    measure(prep_cmd(full, num_tokens, tok, out), work / "calibrate.log")
    manifest = json.loads((out / "manifest.json").read_text())
    corpus_dir.mkdir(parents=True, exist_ok=True)
    for source in manifest["sources"]:  # synth is deterministic: the first rows_read rows again
        rows = synth.rows(source["name"], num_tokens=num_tokens // 2 + 2_000_000, seed=1)
        synth.write_jsonl(paths[source["name"]], itertools.islice(rows, source["rows_read"]))
    shutil.rmtree(out)
    return paths


# ---------------------------------------------------------------------------------------------
# The peers, each run as `bench_peers.py --child NAME` in its own process
# ---------------------------------------------------------------------------------------------

def peer_trl(corpus: list[str], tok: str, out: Path) -> dict:
    """The alignment-handbook path, as SFTTrainer._prepare_dataset runs it (num_proc = cores), minus
    its `build_labels` map (a per-token Python loop that only copies input_ids when there is no
    assistant mask): leaving it out makes TRL faster, never slower."""
    import pyarrow.compute as pc
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import pack_dataset

    tokenizer = AutoTokenizer.from_pretrained(tok)
    num_proc = os.cpu_count()
    ds = load_dataset("json", data_files=corpus, split="train", cache_dir=str(out.with_name(out.name + "-cache")))

    def tokenize(example):  # what SFTTrainer's tokenize_fn does for a conversational row
        return {"input_ids": tokenizer.apply_chat_template(example["messages"], tokenize=True,
                                                           return_dict=True)["input_ids"]}

    ds = ds.map(tokenize, remove_columns=ds.column_names, num_proc=num_proc)
    packed = pack_dataset(ds, SEQ_LEN, strategy="bfd", map_kwargs={"num_proc": num_proc})
    packed.save_to_disk(str(out))
    kept = pc.list_flatten(packed.data.column("seq_lengths"))
    return {"documents": len(ds), "tokens_in": pc.sum(pc.list_value_length(ds.data.column("input_ids"))).as_py(),
            "tokens": pc.sum(kept).as_py(), "sequences": len(packed),
            "truncated": pc.sum(pc.greater(pc.list_value_length(ds.data.column("input_ids")), SEQ_LEN)).as_py()}


def chatml_adapter(self, data: dict, path: str, id_in_file) -> dict:
    """datatrove reads a `text` field; render the row's messages to the recipe's ChatML text."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in data["messages"])
    return {"text": text, "id": f"{path}/{id_in_file}", "metadata": {}}


def peer_datatrove(corpus: list[str], tok: str, out: Path) -> dict:
    """HF's pretraining path: JsonlReader -> DocumentTokenizer (its defaults, incl. the document
    shuffle), one task per input file, as many workers as cores. It writes token files and
    document ends; it doesn't pack (a loader cuts the stream at read time)."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    folder = Path(corpus[0]).parent
    assert all(Path(p).parent == folder for p in corpus)
    LocalPipelineExecutor(
        pipeline=[JsonlReader(str(folder), glob_pattern="*.jsonl.gz", adapter=chatml_adapter),
                  DocumentTokenizer(str(out), tokenizer_name_or_path=str(Path(tok) / "tokenizer.json"))],
        tasks=len(corpus), workers=os.cpu_count(), logging_dir=str(out.with_name(out.name + "-logs")),
    ).run()
    files = list(out.glob("*.ds"))
    return {"documents": sum(f.with_name(f.name + ".index").stat().st_size // 8 for f in files),
            "tokens": sum(f.stat().st_size // 4 for f in files)}  # uint32 tokens: the vocab is > 65536


def run_child(args) -> None:
    out = Path(args.out)
    if args.child == "tokenizer":
        from prep.tokenizer import load_hf_tokenizer

        return load_hf_tokenizer().save_pretrained(out)
    if args.child == "data_path":
        result = part_data_path(out, Path(args.tokenizer), args.repeats)
        return (out / "data_path.json").write_text(json.dumps(result))
    result = {"trl": peer_trl, "datatrove": peer_datatrove}[args.child](args.corpus.split(","), args.tokenizer, out)
    out.with_name(out.name + ".json").write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# Part 1: prep
# ---------------------------------------------------------------------------------------------

def part_prep(work: Path, corpus: dict[str, Path], num_tokens: int, tok: Path, repeats: int) -> dict:
    files = ",".join(str(p) for p in corpus.values())
    me = [sys.executable, str(Path(__file__).resolve())]
    cmds = {
        "ours": prep_cmd(corpus, num_tokens, tok, work / "ours"),
        "trl": me + ["--child", "trl", "--corpus", files, "--tokenizer", str(tok), "--out", str(work / "trl")],
        "datatrove": me + ["--child", "datatrove", "--corpus", files, "--tokenizer", str(tok),
                           "--out", str(work / "datatrove")],
    }
    runs = {name: [] for name in cmds}
    for rep in range(repeats):  # interleaved
        for name, cmd in cmds.items():
            for leftover in (work / name, work / f"{name}-cache", work / f"{name}-logs"):  # outside the clock
                shutil.rmtree(leftover, ignore_errors=True)
            seconds, rss, rss_max = measure(cmd, work / f"{name}-{rep}.log")
            runs[name].append({"seconds": seconds, "rss_mb": rss, "rss_max_mb": rss_max})
            print(f"  run {rep + 1}/{repeats} {name}: {seconds:.1f} s, peak RSS {rss:.0f} MB", flush=True)

    manifest = json.loads((work / "ours" / "manifest.json").read_text())
    c = manifest["counts"]
    trl = json.loads((work / "trl.json").read_text())
    dt = json.loads((work / "datatrove.json").read_text())
    input_tokens = c["tokens"] + c["truncated_tokens"] + c["dropped_tokens"]
    for kind, source in zip(KINDS, manifest["sources"]):  # every row of the corpus was used
        with gzip.open(corpus[kind], "rb") as f:
            assert source["rows_read"] == sum(1 for _ in f), f"prep build did not read all of {corpus[kind]}"
    results = {
        "ours": {"documents": c["documents"], "tokens_in": input_tokens, "tokens": c["tokens"],
                 "fill": c["tokens"] / (c["sequences"] * SEQ_LEN), "sequences": c["sequences"], "split": c["split"]},
        "trl": trl | {"fill": trl["tokens"] / (trl["sequences"] * SEQ_LEN)},
        "datatrove": dt | {"tokens_in": dt["tokens"], "fill": None},
    }
    for name, r in results.items():
        r |= median_runs(runs[name]) | {"runs": runs[name]}
        r["tokens_per_s"] = r["tokens_in"] / r["seconds"]  # tokens processed, kept or not
    for name in ("trl", "datatrove"):
        if results[name]["tokens_in"] != input_tokens or results[name]["documents"] != c["documents"]:
            print(f"WARNING: {name} saw {results[name]['documents']} documents / {results[name]['tokens_in']} tokens, "
                  f"ours {c['documents']} / {input_tokens}: not the same input")
    return results


# ---------------------------------------------------------------------------------------------
# Part 2: the training data path
# ---------------------------------------------------------------------------------------------

def part_data_path(work: Path, tok: Path, repeats: int, num_batches: int = 64) -> dict:
    """Seconds per ready batch of one 32k sequence, the median over `num_batches` random rows,
    then the median over repeats. Both read files the prep runs just wrote (in the page cache)."""
    import numpy as np
    from datasets import load_from_disk
    from transformers import AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from train.data import Loader, PackedShards

    shards = PackedShards(str(work / "ours"))
    loader = Loader(shards, batch_size=1, grad_accum=1, rank=0, world_size=1, seed=42)
    packed = load_from_disk(str(work / "trl"))
    collator = DataCollatorForLanguageModeling(pad_token_id=AutoTokenizer.from_pretrained(tok).pad_token_id,
                                               padding_free=True)
    rng = np.random.default_rng(0)

    def ours(step):
        (batch,) = loader.build(step)  # what the trainer's prefetch thread runs for every step
        return batch.input_ids.shape[1]

    def trl(i):  # what the Trainer's DataLoader runs: fetch the rows, then collate
        batch = collator(packed.__getitems__([i]))
        return batch["input_ids"].shape[1]

    runs = {"ours": [], "trl": []}
    tokens = {"ours": [], "trl": []}
    for rep in range(repeats):
        for name, fn, n in (("ours", ours, len(shards)), ("trl", trl, len(packed))):
            times = []
            for i in rng.permutation(n)[:num_batches]:
                start = time.perf_counter()
                tokens[name].append(fn(int(i)))
                times.append(time.perf_counter() - start)
            runs[name].append(statistics.median(times))
    return {name: {"seconds": statistics.median(runs[name]), "runs": runs[name],
                   "tokens_per_batch": statistics.mean(tokens[name])} for name in runs}


# ---------------------------------------------------------------------------------------------
# Part 3: training steps (scripts/bench_train.py's runs, on shards of this corpus)
# ---------------------------------------------------------------------------------------------

def part_train(work: Path, corpus: dict[str, Path], tok: Path, repeats: int, steps: int, seq_len: int) -> dict:
    """Our trainer vs SFTTrainer (padding-free), tiny SmolLM3, same init, rows and order; each in its
    own process, as bench_train.py runs them (tokens/s after 2 warm-up steps, peak RSS, losses)."""
    import bench_train

    shards = work / f"train-shards-{seq_len}"
    if not (shards / "manifest.json").exists():
        measure(prep_cmd(corpus, 300 * seq_len, tok, shards, seq_len), work / "train-shards.log")
    settings = argparse.Namespace(steps=steps, lr=3e-3, grad_accum=2)  # bench_train.py's defaults, fewer steps
    runs_dir = work / "train-runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    runs_dir.mkdir()
    runs = {"ours": [], "trl": []}
    for rep in range(repeats):  # interleaved
        for name in runs:
            start = time.perf_counter()
            r = bench_train.run_worker(name, settings, shards, runs_dir)
            runs[name].append(r)
            print(f"  run {rep + 1}/{repeats} {name} training: {time.perf_counter() - start:.1f} s, "
                  f"{r['tokens_per_s']:,.0f} tokens/s, peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
    manifest = json.loads((shards / "manifest.json").read_text())
    return {name: {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                   "tokens_per_cpu_s": statistics.median(r["tokens_per_cpu_s"] for r in rs),
                   "rss_mb": statistics.median(r["peak_rss_gb"] for r in rs) * 1e3,
                   "losses": rs[0]["losses"], "runs": rs}
            for name, rs in runs.items()} | {"settings": vars(settings) | {"seq_len": seq_len,
                                                                          "sequences": manifest["counts"]["sequences"]}}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def versions() -> str:
    from importlib.metadata import version

    names = ["torch", "transformers", "datasets", "tokenizers", "fastokens", "pyarrow", "numpy", "trl", "datatrove"]
    return ", ".join(f"{n} {version(n)}" for n in names)


def machine() -> str:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), {ram:.0f} GiB RAM, " \
           f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.2f} at start"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f} M"


def print_prep(r: dict) -> list[tuple]:
    ours = r["ours"]
    print("\n1. Prep, jsonl.gz -> training-ready files (seq-len 32768)\n")
    print("| peer | wall s | tokens/s | ours / peer | peak RSS MB (tree / largest process) | fill at 32k | tokens kept |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    names = {"ours": "ours: `prep build` (bfd)", "trl": "TRL: map + `pack_dataset(bfd)`",
             "datatrove": "datatrove: `DocumentTokenizer`"}
    for name, x in r.items():
        fill = "n/a (no packing)" if x["fill"] is None else f"{x['fill']:.2%}"
        kept = f"{x['tokens'] / x['tokens_in']:.3%}"
        if name == "trl":
            kept += f" ({x['tokens_in'] - x['tokens']:,} lost: {x['truncated']} docs > 32k truncated)"
        print(f"| {names[name]} | {x['seconds']:.1f} | {fmt_rate(x['tokens_per_s'])} | "
              f"{ours['tokens_per_s'] / x['tokens_per_s']:.2f}x | {x['rss_mb']:.0f} / {x['rss_max_mb']:.0f} | "
              f"{fill} | {kept} |")
    print(f"\nsame input: {ours['documents']:,} documents, {ours['tokens_in']:,} tokens for ours; "
          f"TRL {r['trl']['documents']:,} / {r['trl']['tokens_in']:,}; "
          f"datatrove {r['datatrove']['documents']:,} / {r['datatrove']['tokens_in']:,}")
    vs_trl = ours["tokens_per_s"] / r["trl"]["tokens_per_s"]
    vs_dt = ours["tokens_per_s"] / r["datatrove"]["tokens_per_s"]
    kept = ours["tokens"] / ours["tokens_in"]
    print(f"goals: >= 20x TRL: {verdict(vs_trl >= 20)}; >= 10x datatrove: {verdict(vs_dt >= 10)}; "
          f"fill >= TRL's bfd ({ours['fill']:.2%} vs {r['trl']['fill']:.2%}) with 100% kept: "
          f"{verdict(ours['fill'] >= r['trl']['fill'] and kept == 1)}")
    return [("prep vs TRL\n(tokens/s)", vs_trl, 20), ("prep vs datatrove\n(tokens/s)", vs_dt, 10)]


def print_data_path(r: dict) -> list[tuple]:
    print("\n2. Training data path: one ready batch (input_ids, position_ids, labels) of one 32k sequence\n")
    print("| peer | ms per batch | tokens per batch | TRL / ours |")
    print("|---|---:|---:|---:|")
    names = {"ours": "ours: `Loader.build` on the memory-mapped shards",
             "trl": "TRL: `__getitems__` + `DataCollatorForLanguageModeling(padding_free=True)`"}
    for name, x in r.items():
        print(f"| {names[name]} | {x['seconds'] * 1e3:.3f} | {x['tokens_per_batch']:,.0f} | "
              f"{x['seconds'] / r['ours']['seconds']:.1f}x |")
    ratio = r["trl"]["seconds"] / r["ours"]["seconds"]
    print(f"goals: >= 10x faster: {verdict(ratio >= 10)}; under 1 ms per sequence: {verdict(r['ours']['seconds'] < 1e-3)}")
    return [("data path vs TRL\n(batches/s)", ratio, 10)]


def print_train(r: dict) -> list[tuple]:
    st = r["settings"]
    print(f"\n3. Training on CPU: tiny SmolLM3, seq-len {st['seq_len']}, {st['steps']} steps x {st['grad_accum']} sequences, "
          f"lr {st['lr']:g}, same init, rows and order\n")
    print(f"| peer | tokens/s | ours / peer | tokens per CPU-second | ours / peer | peak RSS MB | loss after step 1 | "
          f"loss after step {st['steps']} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    names = {"ours": "ours: `python -m train`", "trl": "TRL: `SFTTrainer(padding_free=True)`"}
    for name in ("ours", "trl"):
        x = r[name]
        print(f"| {names[name]} | {x['tokens_per_s']:,.0f} | {r['ours']['tokens_per_s'] / x['tokens_per_s']:.2f}x | "
              f"{x['tokens_per_cpu_s']:,.0f} | {r['ours']['tokens_per_cpu_s'] / x['tokens_per_cpu_s']:.2f}x | "
              f"{x['rss_mb']:.0f} | {x['losses'][0]:.4f} | {x['losses'][-1]:.4f} |")
    speed = r["ours"]["tokens_per_s"] / r["trl"]["tokens_per_s"]
    memory = r["trl"]["rss_mb"] / r["ours"]["rss_mb"]
    gap = max(abs(a - b) for a, b in zip(r["ours"]["losses"], r["trl"]["losses"]))
    print(f"largest per-step loss difference: {gap:.1e}")
    print(f"goals: >= 1.2x tokens/s: {verdict(speed >= 1.2)}; no more memory: {verdict(memory >= 1)}")
    return [("training vs SFTTrainer\n(tokens/s)", speed, 1.2), ("training vs SFTTrainer\n(memory: theirs / ours)", memory, 1)]


def chart(bars: list[tuple], path: Path, title: str) -> None:
    """One horizontal bar per ratio (ours / peer, higher is better), the goal as a tick, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.9 * len(bars) + 1.4))
    labels = [b[0] for b in bars][::-1]
    ratios = [b[1] for b in bars][::-1]
    goals = [b[2] for b in bars][::-1]
    colors = ["#2a9d4b" if r >= g else "#d1495b" for r, g in zip(ratios, goals)]
    ax.barh(labels, ratios, color=colors, height=0.6)
    for y, (r, g) in enumerate(zip(ratios, goals)):
        ax.plot([g, g], [y - 0.4, y + 0.4], color="black", lw=2)
        ax.text(r * 1.04, y, f"{r:.1f}x", va="center", fontsize=11, fontweight="bold")
    ax.axvline(1, color="grey", lw=1, ls=":")
    ax.set_xscale("log")
    ax.set_xlim(0.5, max(ratios + goals) * 2.2)
    ticks = [t for t in (0.5, 1, 2, 3, 5, 10, 20, 50, 100, 200, 500) if t < max(ratios + goals) * 2.2]
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("ours / peer (higher is better; black tick = goal; green = goal met)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nchart: {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=float, default=50e6, help="corpus size in tokens (default 50M)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the median is shown")
    parser.add_argument("--work", default=str(ROOT / "bench" / "peers"), help="corpus, outputs and logs")
    parser.add_argument("--parts", default="1,2,3", help="which parts to run, e.g. 1,2")
    parser.add_argument("--train-steps", type=int, default=10, help="optimizer steps in part 3 (~12 s each on 2 cores)")
    parser.add_argument("--train-seq-len", type=int, default=1024, help="seq-len of part 3's shards (CPU training)")
    parser.add_argument("--chart", default=str(ROOT / "bench_peers.png"), help="PNG of the ratios")
    parser.add_argument("--child", choices=["trl", "datatrove", "data_path", "tokenizer"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.update(OFFLINE)
    if args.child:  # one measured piece, in its own process
        return run_child(args)
    parts = {int(p) for p in args.parts.split(",")}
    work, num_tokens = Path(args.work), int(args.tokens)
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}\nversions: {versions()}\nmedian of {args.repeats} runs each\n", flush=True)

    tok = tokenizer_dir(work)
    t = time.perf_counter()
    corpus = same_documents(work, num_tokens, tok)
    print(f"corpus: {', '.join(f'{p.name} {p.stat().st_size / 1e6:.0f} MB' for p in corpus.values())} "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    bars, results = [], {}
    save = lambda: (work / "results.json").write_text(json.dumps(results, indent=2))  # after each part
    if 1 in parts or 2 in parts:  # part 2 reads what part 1 wrote
        results["prep"] = part_prep(work, corpus, num_tokens, tok, args.repeats)
        save()
    if 2 in parts:
        subprocess.run([sys.executable, __file__, "--child", "data_path", "--out", str(work), "--tokenizer", str(tok),
                        "--repeats", str(args.repeats)], check=True)
        results["data_path"] = json.loads((work / "data_path.json").read_text())
        save()
    if 3 in parts:
        results["train"] = part_train(work, corpus, tok, args.repeats, args.train_steps, args.train_seq_len)
        save()
    if "prep" in results:
        bars += print_prep(results["prep"])
    if "data_path" in results:
        bars += print_data_path(results["data_path"])
    if "train" in results:
        bars += print_train(results["train"])
    title = f"prep and data path: {num_tokens / 1e6:.0f}M tokens, seq-len {SEQ_LEN}"
    if "train" in results:
        title += f"; training: tiny SmolLM3, seq-len {args.train_seq_len}"
    chart(bars, Path(args.chart), f"{title}\n{os.cpu_count()} CPU cores, median of {args.repeats} runs")


if __name__ == "__main__":
    main()
