"""``mupfast prepare-data`` on a JSON Lines corpus: tokens/s against the tokenizer alone, and memory.

A corpus of ``--mb`` MB of JSON Lines (8 files; documents cut from the running Python's stdlib
sources, so nothing is downloaded) and a byte-level BPE trained here (vocabulary 8,192, saved as a
tokenizer.json, used as a user's existing tokenizer). Measured side by side on this machine:

- ``encode_batch``: the same tokenizer's ``encode_batch`` over the same texts already in memory, in
  one process on one core (``RAYON_NUM_THREADS=1``): the peer, the speed of tokenizing alone;
- ``prepare-data --workers 1`` and ``--workers 2``: reading, decompressing, tokenizing, holding out
  validation documents and writing shards, each worker on one core.

``per_core_vs_encode_batch`` is prepare's tokens/s per core over the peer's (target ≥ 0.8);
``peak_rss_mb`` the largest resident memory of the whole process tree while it ran, sampled every
50 ms, for the corpus and for a ``--small-mb`` one (target: under 1 GB, and not growing with the corpus).

    python -m benchmarks.bench_prepare                     # 200 MB and 50 MB corpora
    python -m benchmarks.bench_prepare --smoke --out /tmp/x  # a 2 MB corpus
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from benchmarks.common import bench_parser, publish

ROOT = Path(__file__).resolve().parents[1]
FILES = 8


def write_corpus(out: Path, megabytes: float) -> int:
    """JSON Lines files of about ``megabytes`` MB of documents (1–8 KB slices of stdlib sources)."""
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [p.read_text(errors="replace") for p in sources]
    out.mkdir(parents=True, exist_ok=True)
    handles = [open(out / f"part-{k:02d}.jsonl", "w") for k in range(FILES)]
    written, n, target = 0, 0, int(megabytes * 2**20)
    while written < target:
        text = texts[n % len(texts)]
        start = (n * 7919) % max(1, len(text) - 1024)
        doc = text[start : start + 1024 + (n * 104729) % 7168]
        line = json.dumps({"id": n, "text": doc}) + "\n"
        handles[n % FILES].write(line)
        written += len(line)
        n += 1
    for h in handles:
        h.close()
    return n


def train_tokenizer(corpus: Path, out: Path, vocab: int) -> Path:
    from mupfast.data import BPETokenizer

    def sample():  # the first 4 MB of text
        size = 0
        with open(corpus / "part-00.jsonl") as f:
            for line in f:
                text = json.loads(line)["text"]
                size += len(text)
                yield text
                if size > 4 * 2**20:
                    return

    out.mkdir(parents=True, exist_ok=True)
    BPETokenizer.train(sample(), vocab).save(out / "tokenizer.json")
    return out


PEER = """
import json, sys, time
from pathlib import Path
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[2])
texts = [json.loads(l)["text"] for p in sorted(Path(sys.argv[1]).glob("*.jsonl")) for l in open(p)]
t0 = time.perf_counter(); n = 0
for i in range(0, len(texts), 1024):
    n += sum(len(e.ids) for e in tok.encode_batch(texts[i : i + 1024], add_special_tokens=False))
print(json.dumps({"tokens": n, "seconds": time.perf_counter() - t0}))
"""


def run_tree(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """Run ``cmd``; its wall time, the peak RSS (MiB) of its whole process tree, and its stdout."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} … failed ({proc.returncode}): {err[-2000:]}")
    return time.perf_counter() - t0, peak / 2**20, out


def main() -> Path:
    ap = bench_parser(__doc__, warmup=None, reps=None, smoke="a 2 MB corpus")
    ap.add_argument("--mb", type=float, default=200.0, help="corpus size in MB (default %(default)s)")
    ap.add_argument("--small-mb", type=float, default=50.0, help="the second corpus, for memory")
    args = ap.parse_args()
    sizes = [2.0] if args.smoke else [args.mb, args.small_mb]
    vocab = 512 if args.smoke else 8192
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for k, mb in enumerate(sizes):
            corpus = tmp / f"corpus{k}"
            docs = write_corpus(corpus, mb)
            tok_dir = train_tokenizer(corpus, tmp / f"tokenizer{k}", vocab)
            on_disk = sum(p.stat().st_size for p in corpus.iterdir()) / 2**20
            peer = None
            if k == 0:  # the peer on the main corpus
                secs, rss, out = run_tree(
                    [sys.executable, "-c", PEER, str(corpus), str(tok_dir / "tokenizer.json")], env
                )
                peer = json.loads(out)
                rate = peer["tokens"] / peer["seconds"]
                rows.append(
                    {
                        "run": "encode_batch (tokenizer alone)",
                        "corpus_mb": round(on_disk, 1),
                        "documents": docs,
                    }
                    | {
                        "workers": 1,
                        "tokens": peer["tokens"],
                        "seconds": peer["seconds"],
                        "tokens_per_s": rate,
                    }
                    | {"per_core_vs_encode_batch": 1.0, "peak_rss_mb": rss}
                )
            for workers in (1, 2) if k == 0 else (2,):
                out_dir = tmp / f"data{k}-{workers}"
                cmd = [sys.executable, "-m", "mupfast.cli", "prepare-data", f"data.corpus={corpus}"]
                cmd += [f"data.tokenizer={tok_dir}", f"data.dir={out_dir}", "--workers", str(workers)]
                secs, rss, _ = run_tree(cmd, env)
                (meta_path,) = out_dir.glob("*/meta.json")
                meta = json.loads(meta_path.read_text())
                tokens = meta["train_tokens"] + meta["val_tokens"] - meta["documents"]  # the EOS aside
                row = {
                    "run": f"prepare-data --workers {workers}",
                    "corpus_mb": round(on_disk, 1),
                    "documents": docs,
                }
                row |= {"workers": workers, "tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs}
                base = rows[0]["tokens_per_s"]
                row |= {"per_core_vs_encode_batch": tokens / secs / workers / base, "peak_rss_mb": rss}
                rows.append(row)
    notes = (
        f"BPE vocabulary {vocab}; {FILES} JSON Lines files; each worker and the peer on one core "
        "(RAYON_NUM_THREADS=1); prepare's seconds include the interpreter start, reading, writing shards"
    )
    return publish("prepare", rows, notes, args, smoke="a 2 MB corpus")


if __name__ == "__main__":
    main()
