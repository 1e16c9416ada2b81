"""Throughput and peak memory of shifu's chunk stage, side by side with semantic-text-splitter.

    .venv/bin/python bench/chunk_throughput.py                  # writes its section of docs/BENCHMARKS.md
    .venv/bin/python bench/chunk_throughput.py --synthetic-mb 20 --no-write   # a quick look

Not part of the test suite. Every measurement runs in a fresh child process pinned to one CPU, so
its peak RSS (VmHWM) is its own and it uses one core; each row is the best of --repeat runs (5),
timed by CPU time and by wall time. An input under 10 MB is run twice in its process and the second
run is timed (the first is reported beside it): the first also pays for growing the process's memory,
a cost per process, not per byte. Inputs:
- ../shared/corpus (or --corpus): the Chinese files (luxun_*.txt) and english.txt, separately;
- a synthetic corpus of --synthetic-mb MB (100 by default) written to a temp folder as 10 files:
  copies of the three corpus files in turn; in each copy 90% of the paragraphs are rebuilt from as
  many sentences drawn at random (seeded) from the whole file, and 10% are kept verbatim. Rebuilt
  paragraphs make new chunks (shuffling sentences in place would not: MinHash ignores order), the
  verbatim ones are real duplicates for dedup to remove.
Rows:
- shifu stage: `run_chunk` as the pipeline runs it: read, split (chunk_size 500 characters), remove
  exact and near duplicates, write chunks.jsonl;
- shifu split: the same reader and splitter, no dedup and no writing;
- semantic-text-splitter: `TextSplitter(500).chunk_indices` on the same blocks from shifu's reader
  (on one huge string it is quadratic, see ../shared/BASELINES.md), no dedup;
- unless --no-tokens: the same three in token mode (256 tokens) on the corpus, with a byte-level BPE
  tokenizer of 8,000 tokens trained on the corpus by this script (no model hub offline).
Boundary quality: chunks that end mid-sentence, that is neither at a sentence end (。！？… or .!?,
with closing quotes) nor at a paragraph break, counting every chunk but the last of each block;
sentences longer than the limit force a few such cuts on any splitter.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- chunk_throughput:start -->", "<!-- chunk_throughput:end -->"
SIZE, TOKENS = 500, 256
_SENTENCE_END = re.compile(r"[。！？!?.…][”’」』）)》】\"']*$")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


# ---- inputs -------------------------------------------------------------------------------------

def _sentences(paragraph: str) -> list[str]:
    from shifu.chunk import LEVELS

    cuts = [m.end() for m in LEVELS[2].finditer(paragraph)]
    return [paragraph[a:b] for a, b in zip([0, *cuts], [*cuts, len(paragraph)]) if b > a]


def _variation(paragraphs: list[list[str]], pool: list[str], sep: str, rng: random.Random) -> str:
    """One copy of a text: 90% of its paragraphs rebuilt from as many sentences drawn at random from
    the whole text, 10% kept verbatim (the duplicates dedup should find)."""
    out = []
    for sentences in paragraphs:
        if rng.random() < 0.9:
            sentences = rng.choices(pool, k=len(sentences))
        out.append("".join(s if s[-1:].isspace() else s + sep for s in sentences).rstrip())
    return "\n\n".join(out)


def make_synthetic(corpus: list[Path], folder: Path, total_mb: float, files: int = 10) -> None:
    texts = [[_sentences(p) for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()] for path in corpus]
    pools = [[s for para in text for s in para] for text in texts]
    from shifu.dedup import language

    seps = ["" if language("".join(pool[:200])) == "zh" else " " for pool in pools]
    rng = random.Random(20261129)
    per_file = total_mb * 1e6 / files
    copy = 0
    for k in range(files):
        with open(folder / f"part{k:02d}.txt", "w", encoding="utf-8") as f:
            while f.tell() < per_file:
                t = copy % len(texts)
                f.write(_variation(texts[t], pools[t], seps[t], rng) + "\n\n")
                copy += 1


def train_tokenizer(corpus: list[Path], folder: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([p.read_text(encoding="utf-8") for p in corpus], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tk).save_pretrained(folder)
    return folder


# ---- one measurement, in a child process ---------------------------------------------------------

def _ends_well(text: str, end: int) -> bool:
    """A cut at `end` (whitespace on either side ignored) follows a sentence end or lies in a blank line."""
    i, j = end, end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    while j < len(text) and text[j].isspace():
        j += 1
    return bool(_BLANK_LINE.search(text, i, j) or _SENTENCE_END.search(text[max(0, i - 8):i]))


def _quality(text: str, spans: list[tuple[int, int]]) -> int:
    """Chunks of one block that end mid-sentence, all but the last."""
    return sum(not _ends_well(text, b) for _, b in spans[:-1])


def child(spec: dict) -> dict:
    os.sched_setaffinity(0, {spec["cpu"]})
    from shifu.chunk import Chars, Tokens, split_text  # imported before the clock starts, like numpy
    from shifu.config import config_from_dict

    tok = None
    if spec["unit"] == "tokens":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    size = TOKENS if tok else SIZE
    from semantic_text_splitter import TextSplitter

    from shifu.dedup import Deduper

    tree = {"raw_data_path": spec["path"], "chunk_size": size, "work_dir": spec["work"],
            "model_name": spec.get("tokenizer") or "unused", "data": {"chunk_unit": spec["unit"]}}
    cfg = config_from_dict(tree)
    splitter = TextSplitter.from_huggingface_tokenizer(tok.backend_tokenizer, size) if tok else TextSplitter(size)
    # Warm up both: numpy imports some modules on first use (np.unique pulls in numpy.ma, 25 ms).
    warm = "孔乙己是站着喝酒而穿长衫的唯一的人。Alice was beginning to get very tired. " * 40
    Deduper(0.85).keep([warm[:300], warm[300:]])
    split_text(warm, size, Tokens(tok) if tok else Chars())
    splitter.chunk_indices(warm)
    base_rss = _peak_rss_mb()
    first = _once(spec, cfg, splitter, tok, size)
    # A small input is run again and the second run timed: the first pays once per process for growing
    # its memory (page faults), which a large corpus amortises and a 0.2 MB file does not.
    out = _once(spec, cfg, splitter, tok, size) if spec["warm"] else dict(first)
    out.update(first_cpu=first["cpu"], peak_rss_mb=_peak_rss_mb(), base_rss_mb=base_rss)
    return out


def _once(spec: dict, cfg, splitter, tok, size: int) -> dict:
    """One timed run of the row's work on the row's input."""
    from shifu.chunk import Chars, Tokens, run_chunk, split_text
    from shifu.dedup import Deduper
    from shifu.read import read_blocks

    out: dict = {}
    t0, c0 = time.perf_counter(), time.process_time()
    if spec["what"] == "shifu stage":
        dedup = Deduper(cfg.data.dedup_threshold)
        stats = run_chunk(cfg, dedup)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        out.update(chunks=stats["chunks"], exact=dedup.exact_dups, near=dedup.near_dups,
                   index_mb=dedup.nbytes() / 1e6, index_per_chunk=dedup.nbytes() / max(1, dedup.count))
    else:
        measure = Tokens(tok) if tok else Chars()
        chunks = mid = 0
        seconds = cpu = 0.0
        for block in read_blocks(spec["path"]):
            if spec["what"] == "semantic-text-splitter":
                spans = [(a, a + len(c)) for a, c in splitter.chunk_indices(block.text)]
            else:
                spans = split_text(block.text, size, measure)
            # The clocks count the reader and the splitter, not the quality count.
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            chunks += len(spans)
            mid += _quality(block.text, spans)
            t0, c0 = time.perf_counter() - seconds, time.process_time() - cpu
        out.update(chunks=chunks, mid_sentence=mid)
    out.update(seconds=seconds, cpu=cpu)
    return out


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent."""
    line = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def run_child(spec: dict, repeat: int) -> dict:
    """The best of `repeat` runs (least CPU time): the machine is shared, and noise only ever slows."""
    runs = []
    for _ in range(repeat):
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                              text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            raise SystemExit(f"child failed for {spec['what']} on {spec['path']}:\n{proc.stderr[-3000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return min(runs, key=lambda r: r["cpu"])


# ---- the report ---------------------------------------------------------------------------------

def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next((int(line.split()[1]) / 1e6 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in
                         ("numpy", "tokenizers", "semantic-text-splitter", "charset-normalizer"))
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GB RAM; Python {platform.python_version()}, {versions}; "
            f"each run pinned to one core")


def _row(res: dict) -> str:
    r, mb = res["r"], res["mb"]
    quality = f"{r['mid_sentence']:,} of {r['chunks']:,}" if "mid_sentence" in r else "as shifu split"
    dedup = f"{r['exact']:,} exact + {r['near']:,} near" if "exact" in r else "none"
    return (f"| {res['label']} | {res['what']} | {res['limit']} | {mb:.1f} | {r['chunks']:,} | **{mb / r['cpu']:.1f}** "
            f"| {mb / r['first_cpu']:.1f} | {mb / r['seconds']:.1f} | {r['peak_rss_mb']:.0f} ({r['base_rss_mb']:.0f}) "
            f"| {dedup} | {quality} |")


def _per_chunk_us(r: dict) -> float:
    """CPU time of the stage per chunk it produced or dropped as a duplicate."""
    return 1e6 * r["cpu"] / max(1, r["chunks"] + r["exact"] + r["near"])


def _report(results: list[dict], args, load: tuple[float, float]) -> str:
    stage = [res for res in results if res["what"] == "shifu stage"]
    speeds = {res["label"]: res["mb"] / res["r"]["cpu"] for res in stage if res["limit"].endswith("chars")}
    missed = [label for label, speed in speeds.items() if speed < 10]
    verdict = (f"Target (at least 10 MB/s on one core for the chunk stage, {SIZE} characters a chunk): "
               f"**{'missed on ' + ', '.join(missed) if missed else 'met on every input'}**; "
               + ", ".join(f"{label} {speed:.1f}" for label, speed in speeds.items()) + " MB/s of CPU time.")
    command = ".venv/bin/python bench/chunk_throughput.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in (("synthetic_mb", args.synthetic_mb), ("repeat", args.repeat))
        if v != {"synthetic_mb": 100, "repeat": 5}[k])
    return "\n".join([
        "## Chunk stage throughput (`bench/chunk_throughput.py`)",
        "",
        f"Command: `{command}`, run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {_machine()}. Load average {load[0]:.2f} before the run and {load[1]:.2f} after: other work",
        "shared the machine, so each row is the best of "
        f"{args.repeat} runs.",
        "",
        verdict,
        "",
        "| input | splitter | limit | MB | chunks | MB/s (CPU time) | first run in the process | MB/s (wall) "
        "| peak RSS MB (at start) | duplicates removed | chunks ending mid-sentence |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|",
        *[_row(res) for res in results],
        "",
        "- *shifu stage* is `run_chunk`: read, split, drop exact and near duplicates (MinHash), write chunks.jsonl.",
        "  *shifu split* and *semantic-text-splitter* read the same blocks and split them, nothing else.",
        "- MB/s counts the input's UTF-8 bytes, over the process's CPU time (what one core does) and over wall",
        "  time (which also counts waiting for a core on a shared machine). Inputs under 10 MB are run twice in",
        "  one process and the second run is timed (the first, shown beside it, also pays for growing the",
        "  process's memory: page faults that a large corpus pays once); the synthetic corpus is run once.",
        "- Peak RSS is the child process's own (VmHWM), Python and numpy included; at start is the figure",
        "  after imports and a small warm-up call, before reading (transformers makes the token rows' high).",
        "- Much of the stage's cost comes per chunk, not per byte: "
        + "; ".join(f"{res['label']}: {_per_chunk_us(res['r']):.0f} µs a chunk"
                    for res in stage if res["limit"].endswith("chars"))
        + ". So MB/s depends on the bytes in a chunk: 500 characters are about 1.5 KB of Chinese but 0.5 KB",
        "  of English, which makes English the slowest input per MB; in token mode the",
        "  tokenizer sets the pace.",
        "- Memory: reader and splitter hold one block (at most 256K characters) at a time, so *shifu split*",
        "  stays flat from 0.2 to 100 MB. The dedup index grows with every kept chunk: "
        + "; ".join(f"{res['label']} ({res['limit']}): {res['r']['index_mb']:.1f} MB, "
                    f"{res['r']['index_per_chunk']:.0f} B per kept chunk" for res in stage)
        + " (on small inputs mostly the first allocation). Merging its sorted runs briefly takes about",
        "  as much again; the block in hand and its numpy temporaries make the rest of the stage's peak.",
        "- Chunks ending mid-sentence: not after 。！？… or .!? (with closing quotes) nor at a blank line, last",
        "  chunk of each block excluded; a sentence longer than the limit has to be cut somewhere.",
        f"- Synthetic corpus: {args.synthetic_mb:g} MB in 10 files, copies of the three corpus files in turn; in each",
        "  copy 90% of the paragraphs are rebuilt from as many sentences drawn at random (seeded) from the whole",
        "  file and 10% are kept verbatim, so dedup has real duplicates to remove but not the whole corpus.",
        "- Token rows: a byte-level BPE tokenizer (8,000 tokens) trained on the corpus by the script, since the",
        "  model hub is offline; semantic-text-splitter gets the same tokenizer. Tokenizing itself runs at",
        "  1-2 MB/s here, which bounds both.",
    ])


def write_section(path: Path, body: str) -> None:
    section = f"{START}\n{body.rstrip()}\n{END}"
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if START in old and END in old:
        new = old[:old.index(START)] + section + old[old.index(END) + len(END):]
    else:
        new = old.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus"))
    ap.add_argument("--synthetic-mb", type=float, default=100)
    ap.add_argument("--repeat", type=int, default=5, help="runs per row; the best is reported")
    ap.add_argument("--no-tokens", action="store_true", help="skip the token-mode rows")
    ap.add_argument("--no-write", action="store_true", help="print the section, leave docs/BENCHMARKS.md alone")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    corpus = Path(args.corpus)
    zh, en = sorted(corpus.glob("luxun_*.txt")), corpus / "english.txt"
    cpu = max(os.sched_getaffinity(0))
    load_before = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "zh").mkdir()
        for p in zh:
            (tmp / "zh" / p.name).write_bytes(p.read_bytes())
        inputs = [("corpus, Chinese", tmp / "zh"), ("corpus, English", en)]
        if args.synthetic_mb > 0:
            (tmp / "synthetic").mkdir()
            make_synthetic([*zh, en], tmp / "synthetic", args.synthetic_mb)
            inputs.append(("synthetic, zh+en", tmp / "synthetic"))
        tokenizer = None if args.no_tokens else str(train_tokenizer([*zh, en], tmp / "tokenizer"))
        for label, path in inputs:
            mb = sum(p.stat().st_size for p in ([path] if path.is_file() else path.iterdir())) / 1e6
            units = ["chars"] + (["tokens"] if tokenizer and not label.startswith("synthetic") else [])
            for unit in units:
                for what in ("shifu stage", "shifu split", "semantic-text-splitter"):
                    (tmp / "work").mkdir(exist_ok=True)
                    spec = {"what": what, "path": str(path), "unit": unit, "tokenizer": tokenizer,
                            "work": str(tmp / "work"), "cpu": cpu, "warm": mb < 10}
                    limit = f"{TOKENS} tokens" if unit == "tokens" else f"{SIZE} chars"
                    results.append({"label": label, "what": what, "limit": limit, "mb": mb,
                                    "r": run_child(spec, args.repeat)})
                    print(_row(results[-1]), flush=True)
    body = _report(results, args, (load_before, os.getloadavg()[0]))
    print(body)
    if not args.no_write:
        write_section(ROOT / "docs" / "BENCHMARKS.md", body)
        print(f"wrote {ROOT / 'docs' / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
