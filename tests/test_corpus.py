"""mupfast.data.corpus: listing a corpus and streaming its documents, against real files."""

from __future__ import annotations

import collections
import gzip
import io
import json
import os
import sysconfig
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from mupfast.data.corpus import BAD_RECORD_REASONS, CorpusFile, corpus_files, corpus_listing, read_documents
from mupfast.errors import DataError

TEXTS = [
    "plain words",
    "ünïcödé — 日本語 — emoji 🚀",
    'quotes " and \' and a backslash \\ and {"braces": [1]}',
    "embedded\nnewlines\r\nand\ttabs\n",
    "",
    "\u2028 a line separator, NUL \x00 and a BOM \ufeff inside",
]


def old_corpus_files(corpus: str) -> list[tuple[str, Path]]:
    """prepare.corpus_files as it was before this module (verbatim but for the error): the reference."""
    stdlib_excluded = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"}
    if corpus == "stdlib":
        root, suffixes, skip = Path(sysconfig.get_paths()["stdlib"]), {".py"}, stdlib_excluded
    else:
        root, suffixes, skip = Path(corpus), {".txt", ".md", ".py", ".rst"}, set()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        for name in filenames:
            if Path(name).suffix in suffixes and not name.startswith((".", "_sysconfigdata")):
                path = Path(dirpath) / name
                files.append((path.relative_to(root).as_posix(), path))
    return sorted(files)


def old_read_corpus(files: list[tuple[str, Path]]) -> list[str]:
    """prepare.read_corpus as it was (without the byte cap): the reference document format."""
    return [
        f"# file: {rel}\n{path.read_bytes().decode('utf-8', errors='replace').rstrip()}\n\n"
        for rel, path in files
    ]


def write_jsonl(path: Path, lines: list[bytes]) -> Path:
    data = b"".join(line + b"\n" for line in lines)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    elif path.name.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    else:
        path.write_bytes(data)
    return path


def records(texts: list[str], field: str = "text") -> list[bytes]:
    return [json.dumps({"id": i, field: t}, ensure_ascii=False).encode() for i, t in enumerate(texts)]


def only_file(path: Path) -> CorpusFile:
    (f,) = corpus_files(str(path))
    return f


def docs(f: CorpusFile, **kw) -> list[tuple[int, str]]:
    return list(read_documents(f, **kw))


# ----------------------------------------------------------------------------------------------
# JSON Lines


@pytest.mark.parametrize(
    "name, compression", [("d.jsonl", "none"), ("d.json.gz", "gzip"), ("d.jsonl.zst", "zstd")]
)
def test_jsonl_plain_gzip_zstd_give_the_texts_back_exactly(tmp_path, name, compression):
    f = only_file(write_jsonl(tmp_path / name, records(TEXTS)))
    assert (f.format, f.compression) == ("jsonl", compression)
    assert docs(f) == [(i + 1, t) for i, t in enumerate(TEXTS)]


def test_jsonl_blank_lines_crlf_bom_and_no_final_newline(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\n   \r\n{"text": "b"}\n{"text": "c"}')
    assert docs(only_file(path)) == [(1, "a"), (4, "b"), (5, "c")]


def test_jsonl_custom_text_field(tmp_path):
    f = only_file(write_jsonl(tmp_path / "d.jsonl", records(TEXTS[:3], field="content")))
    assert docs(f, text_field="content") == [(1, TEXTS[0]), (2, TEXTS[1]), (3, TEXTS[2])]
    with pytest.raises(DataError, match="no field 'text' \\(fields: id, content\\)"):
        docs(f)


BAD_LINES = [
    (b'\xff{"text": "x"}', "not_utf8", "not UTF-8 (invalid start byte at position 0)"),
    (b'{"text": "caf\xc3"}', "not_utf8", "not UTF-8 (invalid continuation byte at position 13)"),
    (b'{"text": "x"', "bad_json", None),
    (b'{"text": "x"} trailing', "bad_json", None),
    (b'["an", "array"]', "missing_field", "no field 'text' (the record is an array)"),
    (b'"a string"', "missing_field", "no field 'text' (the record is a string)"),
    (b'{"body": "x", "id": 1}', "missing_field", "no field 'text' (fields: body, id)"),
    (b"{}", "missing_field", "no field 'text' (fields: none)"),
    (b'{"text": 5}', "not_string", "field 'text' is a number, not a string"),
    (b'{"text": 1.5}', "not_string", "field 'text' is a number, not a string"),
    (b'{"text": true}', "not_string", "field 'text' is a bool, not a string"),
    (b'{"text": null}', "not_string", "field 'text' is null, not a string"),
    (b'{"text": ["a"]}', "not_string", "field 'text' is an array, not a string"),
    (b'{"text": {"a": "b"}}', "not_string", "field 'text' is an object, not a string"),
    (b'{"text": "\\ud800 lone"}', "not_utf8", None),
]


@pytest.mark.parametrize("bad_line, reason, message", BAD_LINES)
@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.jsonl.zst"])
def test_jsonl_bad_record_raises_naming_file_and_line_or_is_skipped(
    tmp_path, name, bad_line, reason, message
):
    path = write_jsonl(tmp_path / name, [b'{"text": "before"}', bad_line, b'{"text": "after"}'])
    f = only_file(path)
    with pytest.raises(DataError) as exc:
        docs(f)
    text = str(exc.value)
    assert text.startswith(f"{path}:2: ") and "\n" not in text
    if message:
        assert text == f"{path}:2: {message}"
    elif reason == "bad_json":
        assert text.startswith(f"{path}:2: not valid JSON (") and text.endswith(")")
    skipped: collections.Counter = collections.Counter()
    assert docs(f, on_bad_record="skip", skipped=skipped) == [(1, "before"), (3, "after")]
    assert skipped == {reason: 1}


def test_jsonl_skip_counts_every_reason_exactly(tmp_path):
    lines = [
        b'{"text": "a"}',
        b"\xfe\xff",
        b"not json",
        b'{"text": "b"}',
        b'{"other": 1}',
        b"[1]",
        b'{"text": 3}',
        b'{"text": "\\udc00"}',
        b"",
        b'{"text": "c"}',
    ]
    f = only_file(write_jsonl(tmp_path / "d.jsonl.zst", lines))
    skipped: collections.Counter = collections.Counter({"earlier": 7})  # counts add to what is there
    assert docs(f, on_bad_record="skip", skipped=skipped) == [(1, "a"), (4, "b"), (10, "c")]
    assert skipped == {"earlier": 7, "not_utf8": 2, "bad_json": 1, "missing_field": 2, "not_string": 1}
    assert set(skipped) - {"earlier"} == set(BAD_RECORD_REASONS)
    assert docs(f, on_bad_record="skip") == [(1, "a"), (4, "b"), (10, "c")]  # no counter: fine


def test_json_array_file_gets_a_hint(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=1))
    with pytest.raises(DataError, match=r"d\.json:1: not valid JSON \(.*\); mupfast reads JSON Lines \(one"):
        docs(only_file(path))
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    with pytest.raises(
        DataError, match=r":1: no field 'text' \(the record is an array\); mupfast reads JSON"
    ):
        docs(only_file(path))


def test_truncated_or_corrupt_gzip_is_an_error_even_with_skip(tmp_path):
    good = gzip.compress(b"".join(line + b"\n" for line in records(["x" * 50] * 5000)))
    path = tmp_path / "d.jsonl.gz"
    for data in (good[: len(good) // 2], good[:-4] + b"XXXX", b"not gzip\n"):
        path.write_bytes(data)
        with pytest.raises(DataError) as exc:
            docs(only_file(path), on_bad_record="skip")
        assert str(exc.value).startswith(f"{path}: corrupt or truncated gzip stream")
        assert "\n" not in str(exc.value)


def test_zstd_several_frames_are_read_and_a_truncated_one_is_an_error(tmp_path):
    lines = [line + b"\n" for line in records([f"doc {i}" for i in range(3000)])]
    cctx = zstandard.ZstdCompressor(write_checksum=True)
    frames = [cctx.compress(b"".join(lines[:1000])), cctx.compress(b"".join(lines[1000:]))]
    streamed = io.BytesIO()  # and frames written by a streaming compressor (no content size in the header)
    with zstandard.ZstdCompressor(level=1).stream_writer(streamed, closefd=False) as w:
        w.write(b"".join(lines[:10]))
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"12345"  # metadata frame
    path = tmp_path / "d.jsonl.zst"
    path.write_bytes(frames[0] + skippable + frames[1] + streamed.getvalue())
    assert [t for _, t in docs(only_file(path))] == [f"doc {i}" for i in range(3000)] + [
        f"doc {i}" for i in range(10)
    ]
    whole = frames[0] + frames[1] + skippable
    for cut in (len(frames[0]) - 1, len(frames[0]) + 3, len(whole) - 2, len(whole) - 7, 3):
        path.write_bytes(whole[:cut])
        with pytest.raises(
            DataError, match=f"^{path}: corrupt or truncated zstd stream .*inside a zstd frame"
        ):
            docs(only_file(path), on_bad_record="skip")
    path.write_bytes(whole + b"trailing garbage")
    with pytest.raises(DataError, match=f"^{path}: corrupt or truncated zstd stream"):
        docs(only_file(path))


# ----------------------------------------------------------------------------------------------
# Parquet


def write_parquet(path: Path, columns: dict, row_group_size: int = 3) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def test_parquet_several_row_groups_in_order_and_custom_field(tmp_path):
    texts = [f"row {i} {TEXTS[i % len(TEXTS)]}" for i in range(10)]
    path = write_parquet(tmp_path / "d.parquet", {"id": list(range(10)), "text": texts, "body": texts[::-1]})
    assert pq.ParquetFile(path).num_row_groups == 4
    f = only_file(path)
    assert (f.format, f.compression) == ("parquet", "none")
    assert docs(f) == list(enumerate(texts))
    assert docs(f, text_field="body") == list(enumerate(texts[::-1]))
    large = write_parquet(tmp_path / "large.parquet", {"text": pa.array(texts, pa.large_string())})
    assert docs(only_file(large)) == list(enumerate(texts))


def test_parquet_null_is_a_bad_record_naming_row_group_and_row(tmp_path):
    texts = ["a", "b", "c", "d", None, "f", None, ""]
    path = write_parquet(tmp_path / "d.parquet", {"text": texts})
    f = only_file(path)
    with pytest.raises(DataError) as exc:
        docs(f)
    assert str(exc.value) == f"{path}: row group 1, row 1: field 'text' is null"
    skipped: collections.Counter = collections.Counter()
    assert docs(f, on_bad_record="skip", skipped=skipped) == [
        (0, "a"),
        (1, "b"),
        (2, "c"),
        (3, "d"),
        (5, "f"),
        (7, ""),
    ]
    assert skipped == {"not_string": 2}


def test_parquet_missing_or_non_string_column_is_an_error_even_with_skip(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", {"body": ["x"], "id": [1]})
    with pytest.raises(DataError) as exc:
        docs(only_file(path), on_bad_record="skip")
    assert str(exc.value) == f"{path}: no column 'text' (columns: body, id)"
    for column, type_name in ((pa.array([1]), "int64"), (pa.array([b"x"]), "binary")):
        path = write_parquet(tmp_path / f"{type_name}.parquet", {"text": column})
        with pytest.raises(DataError) as exc:
            docs(only_file(path), on_bad_record="skip")
        assert str(exc.value) == f"{path}: column 'text' is {type_name}, not a string"
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=f"^{junk}: not a readable Parquet file"):
        docs(only_file(junk))


# ----------------------------------------------------------------------------------------------
# Text files


def test_text_documents_as_read_corpus_made_them(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("hello ünï\n\n\n")
    (tmp_path / "sub" / "b.py").write_text("x = 1")
    (tmp_path / "sub" / "c.md").write_text("")
    old = old_corpus_files(str(tmp_path))
    new = corpus_files(str(tmp_path))
    assert [f.rel for f in new] == [rel for rel, _ in old] == ["a.txt", "sub/b.py", "sub/c.md"]
    assert [d for f in new for d in docs(f)] == [(0, d) for d in old_read_corpus(old)]
    assert docs(new[0]) == [(0, "# file: a.txt\nhello ünï\n\n")]


def test_text_file_not_utf8_is_a_bad_record(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"abc\xff def")
    f = only_file(path)
    with pytest.raises(DataError) as exc:
        docs(f)
    assert str(exc.value) == f"{path}: not UTF-8 (invalid start byte at position 3)"
    skipped: collections.Counter = collections.Counter()
    assert docs(f, on_bad_record="skip", skipped=skipped) == []
    assert skipped == {"not_utf8": 1}


def test_bad_on_bad_record_is_a_value_error_at_once(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", records(["a"]))
    with pytest.raises(ValueError, match="on_bad_record"):
        read_documents(only_file(path), on_bad_record="ignore")  # not even iterated


# ----------------------------------------------------------------------------------------------
# Listing


@pytest.fixture
def corpus_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "corpus"
    for rel in ["sub/deep", ".git", "sub/.cache", "empty"]:
        (root / rel).mkdir(parents=True)
    for rel in ["b.txt", "a.MD", "sub/c.py", ".hidden.txt", ".git/x.txt", "sub/.cache/y.jsonl", "notes.csv"]:
        (root / rel).write_text("text")
    write_jsonl(root / "z.jsonl", records(["z"]))
    write_jsonl(root / "sub" / "g.json.gz", records(["g"]))
    write_jsonl(root / "sub" / "deep" / "h.jsonl.zst", records(["h"]))
    write_parquet(root / "sub" / "p.parquet", {"text": ["p"]})
    (root / "empty" / "README").write_text("no suffix")
    return root


def test_directory_mixing_formats_is_recursive_sorted_and_skips_hidden(corpus_dir):
    files = corpus_files(str(corpus_dir))
    assert [(f.rel, f.format, f.compression) for f in files] == [
        ("a.MD", "text", "none"),
        ("b.txt", "text", "none"),
        ("sub/c.py", "text", "none"),
        ("sub/deep/h.jsonl.zst", "jsonl", "zstd"),
        ("sub/g.json.gz", "jsonl", "gzip"),
        ("sub/p.parquet", "parquet", "none"),
        ("z.jsonl", "jsonl", "none"),
    ]
    assert all(f.path == corpus_dir / f.rel for f in files)
    assert corpus_files("corpus") == [
        CorpusFile(f.rel, Path("corpus") / f.rel, f.format, f.compression) for f in files
    ]


def test_glob_patterns(corpus_dir):
    assert [f.rel for f in corpus_files("corpus/**/*.json*")] == [
        "corpus/sub/deep/h.jsonl.zst",
        "corpus/sub/g.json.gz",
        "corpus/z.jsonl",
    ]
    assert [f.rel for f in corpus_files("corpus/?.txt")] == ["corpus/b.txt"]
    assert [f.rel for f in corpus_files("corpus/[ab].*")] == ["corpus/a.MD", "corpus/b.txt"]
    assert [f.rel for f in corpus_files("corpus/*")] == ["corpus/a.MD", "corpus/b.txt", "corpus/z.jsonl"]
    assert [f.rel for f in corpus_files(f"{corpus_dir}/sub/*.parquet")] == [
        f"{corpus_dir.as_posix()}/sub/p.parquet"
    ]


def test_list_keeps_order_and_a_file_appears_once(corpus_dir):
    files = corpus_files(
        ["corpus/sub/p.parquet", "corpus/sub", "corpus/*.txt", "corpus/b.txt", "corpus/z.jsonl"]
    )
    assert [f.rel for f in files] == [
        "p.parquet",
        "c.py",
        "deep/h.jsonl.zst",
        "g.json.gz",
        "corpus/b.txt",
        "z.jsonl",
    ]


def test_stdlib_is_the_list_prepare_made():
    old = old_corpus_files("stdlib")
    new = corpus_files("stdlib")
    assert [(f.rel, f.path) for f in new] == old
    assert {(f.format, f.compression) for f in new} == {("text", "none")}
    assert len(corpus_files(["stdlib", "stdlib"])) == len(new)


def test_listing_errors(corpus_dir):
    cases = {
        "corpus/nope.jsonl": "data.corpus: path does not exist: corpus/nope.jsonl",
        "corpus/*.nope": "data.corpus: no file matches 'corpus/*.nope'",
        "nowhere/**/*.jsonl": "data.corpus: no file matches 'nowhere/**/*.jsonl'",
    }
    for entry, message in cases.items():
        with pytest.raises(DataError) as exc:
            corpus_files(entry)
        assert str(exc.value) == message
    with pytest.raises(
        DataError, match=r"^data.corpus: corpus/notes.csv: unsupported file type \(supported: .*"
    ):
        corpus_files(["corpus/b.txt", "corpus/notes.csv"])
    with pytest.raises(DataError, match=r"\.jsonl\.zst, .*\.parquet"):
        corpus_files("corpus/notes.csv")
    with pytest.raises(DataError, match=r"^data.corpus: 'corpus/\*.csv' matches no supported file"):
        corpus_files("corpus/*.csv")
    with pytest.raises(DataError, match=r"^data.corpus: no supported file under corpus/empty \(supported"):
        corpus_files("corpus/empty")
    for empty in ([], ""):
        with pytest.raises(DataError, match="^data.corpus: empty"):
            corpus_files(empty)


def test_corpus_listing_is_rel_size_mtime(corpus_dir):
    files = corpus_files("corpus")
    listing = corpus_listing(files)
    assert listing == [(f.rel, f.path.stat().st_size, f.path.stat().st_mtime_ns) for f in files]
    os.utime(files[0].path, ns=(0, 12345))
    assert corpus_listing(files)[0] == (files[0].rel, files[0].path.stat().st_size, 12345)


# ----------------------------------------------------------------------------------------------
# Streaming


def test_first_documents_of_a_large_file_come_without_reading_it_all(tmp_path):
    line = json.dumps({"text": "x" * 1000}).encode() + b"\n"
    data = line * (50_000_000 // len(line))  # 50 MB, and compressing 10000:1 (a decompression bomb of sorts)
    paths = [tmp_path / "big.jsonl", tmp_path / "big.jsonl.gz", tmp_path / "big.jsonl.zst"]
    paths[0].write_bytes(data)
    paths[1].write_bytes(gzip.compress(data, compresslevel=1))
    paths[2].write_bytes(zstandard.ZstdCompressor(level=1).compress(data))
    del data
    for path in paths:
        tracemalloc.start()
        start = time.perf_counter()
        it = read_documents(only_file(path))
        first = [next(it) for _ in range(10)]
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        it.close()
        assert first == [(i + 1, "x" * 1000) for i in range(10)]
        assert peak < 4_000_000, (path.name, peak)
        assert elapsed < 0.5, (path.name, elapsed)
