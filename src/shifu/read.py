"""Read raw text from files, folders or globs, in any common encoding, as a stream of normalised blocks.

    from shifu.read import read_blocks
    for block in read_blocks("corpus/*.txt"):
        print(block.source, block.offset, len(block.text))

Inputs: .txt and .md as plain text, .jsonl with one document per line (a configurable field), and
.pdf / .docx when the optional `docs` extra is installed (pypdf, python-docx). Encodings: a BOM
decides first (UTF-8, UTF-16, UTF-32); then strict UTF-8; then charset-normalizer's best guess
(GB18030 for any GB2312/GBK guess, since it is a superset; Big5; ...). `data.encoding` overrides.
Normalisation: CRLF and CR become LF, control characters other than LF and TAB are dropped, a BOM
inside the text is dropped; full-width punctuation is kept as written (no NFKC).
Large inputs are streamed in blocks of about BLOCK_CHARS characters cut at a paragraph, line or
sentence boundary, so memory does not grow with the size of the corpus.
Offsets are character offsets into the normalised text of each document.
"""

from __future__ import annotations

import codecs
import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from shifu.errors import UserError

TEXT_SUFFIXES = {".txt", ".md", ".text", ".markdown"}
SUFFIXES = TEXT_SUFFIXES | {".jsonl", ".pdf", ".docx"}
BLOCK_CHARS = 1 << 20
SNIFF_BYTES = 1 << 16

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff\ufffe]")
_GB_FAMILY = {"gb2312", "gbk", "gb18030", "hz", "cp936"}
_BOMS = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")]


@dataclass(frozen=True)
class Block:
    source: str  # file path, with #L<n> for a .jsonl record
    offset: int  # character offset of text[0] in the normalised document
    text: str


def find_sources(raw_data_path: str) -> list[Path]:
    """A file, every supported file under a folder, or a glob; sorted, so runs are reproducible."""
    p = Path(raw_data_path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in SUFFIXES)
    else:
        files = sorted(Path(q) for q in glob.glob(raw_data_path, recursive=True) if Path(q).is_file())
    if not files:
        raise UserError(f"raw_data_path {raw_data_path!r}: no such file, or no .txt/.md/.jsonl/.pdf/.docx "
                        "files there; point raw_data_path at your data.txt")
    return files


def normalise(text: str) -> str:
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text)


def detect_encoding(path: Path, override: str | None = None) -> str:
    if override:
        try:
            codecs.lookup(override)
        except LookupError:
            raise UserError(f"data.encoding {override!r} is not a known encoding; try utf-8, gb18030 or big5") from None
        return override
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    for bom, name in _BOMS:
        if head.startswith(bom):
            return name
    if not head:
        return "utf-8"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        return "utf-8"
    except UnicodeDecodeError:
        pass
    if b"\x00" in head:
        raise UserError(f"{path}: looks binary (NUL bytes, no UTF-16 BOM); give a text file, or set data.encoding")
    from charset_normalizer import from_bytes

    best = from_bytes(head).best()
    if best is None:
        raise UserError(f"{path}: cannot tell its text encoding; set data.encoding (e.g. gb18030, big5)")
    name = best.encoding.lower().replace("-", "").replace("_", "")
    return "gb18030" if name in _GB_FAMILY else best.encoding


def _cut_point(text: str) -> int:
    """Where to end a block: the last paragraph break, else line break, else sentence end, else the end."""
    for pattern in ("\n\n", "\n"):
        i = text.rfind(pattern)
        if i > len(text) // 2:
            return i + len(pattern)
    m = None
    for m in re.finditer(r"[。！？!?…]+[”’」』）)》】\"']*|[.](?=\s)", text[len(text) // 2:]):
        pass
    if m is not None:
        return len(text) // 2 + m.end()
    space = max(text.rfind(" "), text.rfind("\t"))
    return space + 1 if space > len(text) // 2 else len(text)


def _stream_text(path: Path, source: str, encoding: str, block_chars: int) -> Iterator[Block]:
    offset, carry = 0, ""
    try:
        with open(path, encoding=encoding, errors="strict", newline=None) as f:
            while piece := f.read(block_chars):
                text = carry + normalise(piece)
                cut = _cut_point(text)
                if cut:
                    yield Block(source, offset, text[:cut])
                    offset += cut
                carry = text[cut:]
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not valid {encoding} ({err.reason} at byte {err.start} of a block); "
                        "set data.encoding to the file's encoding") from None
    if carry:
        yield Block(source, offset, carry)


def _read_jsonl(path: Path, field: str, encoding: str) -> Iterator[Block]:
    with open(path, encoding=encoding) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n}: not valid JSON; each line must be one JSON object") from None
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise UserError(f"{path}:{n}: no string field {field!r}; set data.text_field to the field that holds the text")
            yield Block(f"{path}#L{n}", 0, normalise(text))


def _read_pdf(path: Path) -> str:
    try:
        from pypdf import PdfReader
    except ImportError:
        raise UserError(f"{path}: reading PDF needs the docs extra: pip install 'shifu[docs]'") from None
    return "\n\n".join(page.extract_text() or "" for page in PdfReader(path).pages)


def _read_docx(path: Path) -> str:
    try:
        import docx
    except ImportError:
        raise UserError(f"{path}: reading .docx needs the docs extra: pip install 'shifu[docs]'") from None
    return "\n\n".join(p.text for p in docx.Document(str(path)).paragraphs)


def read_blocks(raw_data_path: str, encoding: str | None = None, text_field: str = "text",
                block_chars: int = BLOCK_CHARS) -> Iterator[Block]:
    """Every document under raw_data_path as normalised blocks, in a reproducible order."""
    for path in find_sources(raw_data_path):
        suffix = path.suffix.lower()
        if suffix == ".pdf":
            yield Block(str(path), 0, normalise(_read_pdf(path)))
        elif suffix == ".docx":
            yield Block(str(path), 0, normalise(_read_docx(path)))
        elif suffix == ".jsonl":
            yield from _read_jsonl(path, text_field, detect_encoding(path, encoding))
        else:
            yield from _stream_text(path, str(path), detect_encoding(path, encoding), block_chars)
