"""Document and conversation sources, all from local paths (nothing here downloads).

Formats, chosen by file suffix:
  - text (.txt .md .rst .py and any other suffix not below): the whole file is one document.
    Text files are read as UTF-8 with errors="replace": a byte that is not UTF-8 becomes U+FFFD
    (source trees and web dumps hold a few such bytes; failing on them helps no one). A file that
    looks binary (NUL bytes, or mostly not UTF-8, in its first 8 KB: an image, an archive, a
    compiled file in a corpus folder) is skipped with a warning on stderr.
  - .jsonl: one JSON object per line with a string "text" field; blank lines are skipped.
  - .parquet: a string column "text" (the FineWeb layout); needs pyarrow (`pip install pyarrow`).
Chat and task files are JSONL and strict: any line that is not what it should be is a
`DataError` naming the file, the line and what to do.
"""
from __future__ import annotations

import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

from fasttrain.errors import DataError  # re-exported: `from fasttrain.data.sources import DataError` works
from fasttrain.tokenizer import ConversationError, check_conversation

PathLike = str | os.PathLike


def source_files(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """The files `iter_documents` reads, in its order: files as given, folders expanded
    recursively in sorted order (hidden files left out)."""
    return _paths(paths)


def _paths(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            if not files:
                raise DataError(f"{p}: folder has no files; point at a folder of documents")
            out += files
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return out


def _jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; errors name file and line."""
    with open(path, "rb") as f:
        n = 0
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 ({e}); re-encode the file as UTF-8") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                                "each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: a JSON {type(obj).__name__}, expected an object")
            n += 1
            yield lineno, obj
    if n == 0:
        raise DataError(f"{path}: empty file (no JSON lines); remove it or fill it")


def _field(path: Path, lineno: int | str, obj: dict, name: str, kind: type | tuple = str):
    if name not in obj:
        raise DataError(f"{path}:{lineno}: missing field \"{name}\" (has {sorted(obj)})")
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{path}:{lineno}: field \"{name}\" is a {type(value).__name__}, "
                        f"expected {want}")
    return value


def _parquet_file(path: Path, column: str = "text"):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow; `pip install pyarrow` "
                        "(or `pip install fasttrain[parquet]`)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    if column not in pf.schema_arrow.names:
        raise DataError(f"{path}: no \"{column}\" column (columns: {pf.schema_arrow.names})")
    return pf


def parquet_row_group_bytes(path: Path) -> list[int]:
    """The uncompressed size of each row group of a Parquet file (read from its footer only)."""
    meta = _parquet_file(path).metadata
    return [meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)]


def _parquet_texts(path: Path, column: str = "text", groups: tuple[int, int] | None = None) -> Iterator[str]:
    """The "text" values of row groups groups[0]..groups[1]-1 (all of them when None)."""
    pf = _parquet_file(path, column)
    first, stop = groups or (0, pf.num_row_groups)
    row = sum(pf.metadata.row_group(g).num_rows for g in range(first))
    for group in range(first, stop):
        for value in pf.read_row_group(group, columns=[column]).column(0).to_pylist():
            if not isinstance(value, str):
                raise DataError(f"{path}: row {row} of column \"{column}\" is "
                                f"{type(value).__name__}, expected a string")
            row += 1
            yield value
    if row == 0 and groups is None:
        raise DataError(f"{path}: no rows; remove the file or fill it")


def _jsonl_range(path: Path, start: int, stop: int) -> Iterator[str]:
    """The "text" of each JSONL line that starts at a byte offset in [start, stop): the ranges
    [0, a), [a, b), ... of one file give each line exactly once. Errors name the byte offset
    of the line (its number is not known without reading the file from the start)."""
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()  # the line under way at `start` belongs to the range before
        while f.tell() < stop:
            at = f.tell()
            raw = f.readline()
            if not raw:
                break
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{path}: the line at byte {at} is not UTF-8 JSON ({e}); "
                                "each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: the line at byte {at} is a JSON {type(obj).__name__}, expected an object")
            yield _field(path, f"byte {at}", obj, "text")


_SNIFF_BYTES = 8192
_warned_binary: set[Path] = set()  # warn once per file, however often a process reads the corpus


def _binary_reason(data: bytes) -> str | None:
    """Why the start of a file looks binary rather than text, or None if it looks like text."""
    head = data[:_SNIFF_BYTES]
    if b"\0" in head:
        return "NUL bytes"
    # text in another encoding (Latin-1, say) has a few bytes that are not UTF-8; most of them
    # not being UTF-8 means it is not text at all
    if head and head.decode("utf-8", errors="replace").count("\ufffd") > len(head) // 4:
        return "mostly not UTF-8"
    return None


def text_document(path: Path) -> str | None:
    """A text file as one document; None for an empty file (a package's __init__.py: nothing to
    learn from), and for one that looks binary (with one warning line)."""
    data = path.read_bytes()
    if not data.strip():
        return None
    reason = _binary_reason(data)
    if reason is None:
        return data.decode("utf-8", errors="replace")
    if path not in _warned_binary:
        _warned_binary.add(path)
        print(f"warning: {path} looks binary ({reason}); skipped", file=sys.stderr, flush=True)
    return None


def file_documents(path: Path, part: tuple[int, int] | None = None) -> Iterator[str]:
    """The documents of one file. `part` reads only a piece of a large file: a byte range
    [start, stop) of a JSONL file, or row groups [first, stop) of a Parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        if part is not None:
            yield from _jsonl_range(path, *part)
            return
        for lineno, obj in _jsonl(path):
            yield _field(path, lineno, obj, "text")
    elif suffix == ".parquet":
        yield from _parquet_texts(path, groups=part)
    else:
        text = text_document(path)
        if text is not None:
            yield text


def splittable(path: Path) -> bool:
    """Whether `file_documents` can read the file in parts (JSONL, Parquet)."""
    return path.suffix.lower() in (".jsonl", ".parquet")


def iter_documents(paths: PathLike | Iterable[PathLike]) -> Iterator[str]:
    """Every document under paths (files or folders, folders recursively in sorted order).

    A text file that looks binary is skipped with one warning line on stderr, an empty one
    silently; if every file is skipped there is nothing to train on, which is a DataError."""
    files = _paths(paths)
    skipped = 0
    for path in files:
        n = 0
        for text in file_documents(path):
            n += 1
            yield text
        skipped += n == 0 and not splittable(path)
    if files and skipped == len(files):
        raise all_binary_error(files)


def all_binary_error(files: list[Path]) -> DataError:
    shown = ", ".join(str(f) for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return DataError(f"every file given looks binary or is empty, so there is no text to train on ({shown}); "
                     "point --data at text, JSONL or Parquet files")


def check_not_empty(paths: PathLike | Iterable[PathLike]) -> None:
    """A DataError naming a file given by name (not found in a folder) that holds no text: an
    empty download or copy, which would otherwise be skipped unnoticed."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for p in map(Path, paths):
        if p.is_file() and p.stat().st_size < 4096 and not p.read_bytes().strip():
            raise DataError(f"{p}: empty file (no text); remove it from --data or fill it")


def default_corpus_files() -> list[Path]:
    """The running interpreter's standard-library .py files, sorted (~31 MB on CPython 3.11).

    Everything under the stdlib folder except site-packages / dist-packages (installed packages
    differ between machines); the test suites are kept, they are ordinary Python code.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "dist-packages")]
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    files.sort()
    if not files:
        raise DataError(f"{root}: no standard-library .py files found (a zipped or stripped "
                        "Python install); pass training text paths instead")
    return files


# --- conversations ----------------------------------------------------------------------------


def _messages(path: Path, lineno: int, messages) -> list[dict]:
    """The conversation of one line, checked by the rules the tokenizer renders it by (a user turn
    first, user/assistant alternating, an assistant reply last, no empty message), so a bad line
    is reported here with its file and line rather than when training reaches it."""
    try:
        check_conversation(messages, ending="assistant")
    except ConversationError as e:
        raise DataError(f"{path}:{lineno}: {e}") from None
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def iter_conversations(path: PathLike) -> Iterator[list[dict]]:
    """Chat JSONL: one {"messages": [{"role": ..., "content": ...}, ...]} per line."""
    path = Path(path)
    for lineno, obj in _jsonl(path):
        yield _messages(path, lineno, _field(path, lineno, obj, "messages", list))


def iter_gsm8k(path: PathLike) -> Iterator[list[dict]]:
    """GSM8K-style JSONL ({"question", "answer"}, the answer ending in "#### <number>") as chats.

    The assistant reply is the worked solution, then "The answer is <number>." (the "####" line
    replaced); GSM8K's "<<48/2=24>>" calculator notes are kept as they are.
    """
    path = Path(path)
    for lineno, obj in _jsonl(path):
        question = _field(path, lineno, obj, "question").strip()
        answer = _field(path, lineno, obj, "answer")
        if "####" not in answer:
            raise DataError(f"{path}:{lineno}: \"answer\" has no \"#### <final answer>\" line; "
                            "GSM8K answers end with one")
        work, final = answer.rsplit("####", 1)
        final = final.strip()
        if not final or not question:
            raise DataError(f"{path}:{lineno}: empty question or final answer")
        reply = (work.strip() + "\n" if work.strip() else "") + f"The answer is {final}."
        yield [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


LETTERS = "ABCDEFGHIJ"


def render_multiple_choice(question: str, choices: list[str]) -> str:
    """The prompt text of a multiple-choice question: the question, then "A. ..." lines."""
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question}\n{options}\nAnswer with the letter."


def iter_multiple_choice(path: PathLike) -> Iterator[list[dict]]:
    """MMLU/ARC-style JSONL ({"question", "choices": [...], "answer": index or letter}) as chats.

    The user message is `render_multiple_choice(question, choices)`; the reply is the letter.
    """
    path = Path(path)
    for lineno, obj in _jsonl(path):
        question = _field(path, lineno, obj, "question").strip()
        choices = _field(path, lineno, obj, "choices", list)
        if not 2 <= len(choices) <= len(LETTERS) or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{path}:{lineno}: \"choices\" must be 2 to {len(LETTERS)} strings")
        answer = _field(path, lineno, obj, "answer", (int, str))
        if isinstance(answer, str):
            if len(answer.strip()) != 1 or answer.strip().upper() not in LETTERS[:len(choices)]:
                raise DataError(f"{path}:{lineno}: \"answer\" {answer!r} is not one of the letters "
                                f"{LETTERS[:len(choices)]}")
            answer = LETTERS.index(answer.strip().upper())
        if not 0 <= answer < len(choices):
            raise DataError(f"{path}:{lineno}: \"answer\" index {answer} is outside 0.."
                            f"{len(choices) - 1}")
        yield [{"role": "user", "content": render_multiple_choice(question, choices)},
               {"role": "assistant", "content": LETTERS[answer]}]
