"""Read raw text from files, folders or globs, in any common encoding, as a stream of normalised blocks.

    from shifu.read import read_blocks
    for block in read_blocks("corpus/*.txt"):
        print(block.source, block.offset, len(block.text))

Inputs: .txt and .md as plain text, .jsonl with one document per line (a configurable field), and
.pdf / .docx when the optional `docs` extra is installed (pypdf, python-docx). A folder gives every
supported file under it, a glob every supported file it matches (hidden files are skipped); a single
file is read as text whatever its suffix. Encodings: a BOM decides first (UTF-8, UTF-16, UTF-32);
then strict UTF-8; then strict GB18030, then Big5, whichever decodes to text that looks like text
(few control or unassigned characters, mostly the encoding's common characters); then
charset-normalizer's guess, if its text looks like text. `data.encoding` overrides. Binary: a known
file signature (PNG, JPEG, zip, ...), NUL bytes without a UTF-16/32 BOM (over 1% of valid UTF-8,
any in anything else), or a decode that is mostly control characters; in a folder such a file is
skipped with a warning, alone it is an error.
Normalisation: CRLF and CR become LF, Unicode line and paragraph separators become LF, control
characters other than LF and TAB are dropped, a BOM inside the text is dropped; full-width
punctuation is kept as written (no NFKC).
Large inputs are streamed in blocks of at most `block_chars` characters, cut at a paragraph break,
else a sentence end, else a line break or space in the second half of the block, so memory does
not grow with the size of the corpus. Offsets are character offsets into the normalised text of
each document.
"""

from __future__ import annotations

import codecs
import functools
import glob
import io
import json
import logging
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from shifu.errors import UserError

log = logging.getLogger("shifu")
TEXT_SUFFIXES = {".txt", ".md", ".text", ".markdown"}
SUFFIXES = TEXT_SUFFIXES | {".jsonl", ".pdf", ".docx"}
BLOCK_CHARS = 1 << 18  # 256K characters: big enough for fast batches, small enough to stay flat
SNIFF_BYTES = 1 << 16

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff\ufffe]")
_LINE_SEPARATORS = re.compile("[\u2028\u2029\x85]")
_GB_FAMILY = {"gb2312", "gbk", "gb18030", "hz", "cp936"}
# UTF-32 first: its little-endian BOM begins with UTF-16's.
_BOMS = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")]
_SENTENCE_END = re.compile(r"[。！？!?…]+[”’」』）)》】\"']*|[.](?=\s)")


@dataclass(frozen=True)
class Block:
    source: str  # file path, with #L<n> for a .jsonl record
    offset: int  # character offset of text[0] in the normalised document
    text: str


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def find_sources(raw_data_path: str) -> list[Path]:
    """A file, every supported file under a folder, or a glob; sorted, so runs are reproducible."""
    p = Path(raw_data_path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = [q for q in p.rglob("*") if q.is_file() and _visible(q, p)]
    else:
        files = [Path(q) for q in glob.glob(raw_data_path, recursive=True) if Path(q).is_file()]
    files = sorted(q for q in files if q.suffix.lower() in SUFFIXES)
    if not files:
        raise UserError(f"raw_data_path {raw_data_path!r}: no such file, or no .txt/.md/.jsonl/.pdf/.docx "
                        "files there; point raw_data_path at your data.txt")
    return files


def _has_control(text: str) -> bool:
    """Whether text holds a character that _CONTROL drops: one pass of numpy over UTF-16 code units,
    2x faster than the regex's own search from 32K characters on (all of _CONTROL lies in the BMP)."""
    c = np.frombuffer(text.encode("utf-16-le", "surrogatepass"), np.uint16)
    low = c < 32
    low &= c != 10
    low &= c != 9
    return bool(low.any() or ((c - 0x7F) < 0x21).any() or (c == 0xFEFF).any() or (c == 0xFFFE).any())


def normalise(text: str) -> str:
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\u2028" in text or "\u2029" in text or "\x85" in text:  # rare: skip the scan
        text = _LINE_SEPARATORS.sub("\n", text)
    # numpy's fixed cost (about 15 us) beats the regex only from about 5K characters: short .jsonl
    # records keep the regex.
    if len(text) < 4096 or _has_control(text):
        return _CONTROL.sub("", text)
    return text


class BinaryInput(UserError):
    """A file that is not text: skipped with a warning in a folder, an error when it is the only input."""


# Common file signatures: an image or archive renamed .txt may hold no NUL in its first bytes.
_SIGNATURES = {b"\x89PNG": "PNG image", b"\xff\xd8\xff": "JPEG image", b"GIF8": "GIF image", b"%PDF-": "PDF",
               b"PK\x03\x04": "zip archive (or .docx)", b"\x1f\x8b": "gzip archive", b"7z\xbc\xaf": "7z archive",
               b"Rar!\x1a\x07": "RAR archive", b"\x7fELF": "executable", b"SQLite format 3\x00": "SQLite database"}
_BAD_SHARE = 0.01  # text has almost no control, unassigned or private-use characters; binary has many
_COMMON_SHARE = 0.7  # of CJK characters decoded, those in the encoding's common set (see _common_set)
_SAMPLE_CHARS = 8192  # enough to judge a decode; a per-character pass over the whole head took 0.4 s
_BAD = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\ufffd\ue000-\uf8ff]")


def _bad_share(text: str) -> float:
    """Share of characters text never holds: controls (not tab, newlines, form feed), private use,
    replacement and unassigned characters, in the first _SAMPLE_CHARS."""
    text = text[:_SAMPLE_CHARS]
    if not text:
        return 0.0
    unassigned = sum(n for ch, n in Counter(text).items()  # per distinct character: a tenth of the calls
                     if ch >= "\u0370" and unicodedata.category(ch) in ("Cn", "Cs"))
    return (len(_BAD.findall(text)) + unassigned) / len(text)


@functools.lru_cache(maxsize=2)
def _common_set(encoding: str) -> frozenset[str]:
    """The encoding's common characters: GB2312 (lead bytes A1-F7) for GB18030, Big5's
    frequently-used block (lead bytes A4-C6) for Big5. Text decoded with the wrong one of the two
    is mostly rare characters."""
    leads = range(0xA1, 0xF8) if encoding == "gb18030" else range(0xA4, 0xC7)
    trails = range(0xA1, 0xFF) if encoding == "gb18030" else [*range(0x40, 0x7F), *range(0xA1, 0xFF)]
    pairs = b"".join(bytes((lead, trail)) for lead in leads for trail in trails)
    return frozenset(pairs.decode(encoding, errors="ignore"))


def _looks_like(head: bytes, encoding: str) -> bool:
    try:
        text = codecs.getincrementaldecoder(encoding)().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    common = _common_set(encoding)
    cjk = [ch for ch in text[:_SAMPLE_CHARS] if ch >= "\u2e80"]
    share = sum(ch in common for ch in cjk) / len(cjk) if cjk else 1.0
    return _bad_share(text) < _BAD_SHARE and share >= _COMMON_SHARE


def _binary(path: Path, why: str) -> BinaryInput:
    return BinaryInput(f"{path}: looks binary ({why}); give a text file, or set data.encoding if it is text "
                       "(e.g. utf-16-le)")


def detect_encoding(path: Path, override: str | None = None) -> str:
    """The override; else a BOM; else strict UTF-8; else the first of GB18030 and Big5 whose strict
    decode looks like text; else charset-normalizer's guess, if that looks like text. Short Chinese
    files are where charset detection cannot decide, so the Chinese encodings are tried first."""
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
    for signature, kind in _SIGNATURES.items():
        if head.startswith(signature):
            raise _binary(path, f"starts like a {kind}")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        utf8 = True
    except UnicodeDecodeError:
        utf8 = False
    # Text may hold a stray NUL (dropped like any control character); binary holds many.
    if head.count(0) > (len(head) // 100 if utf8 else 0):
        raise _binary(path, "NUL bytes, no UTF-16 BOM")
    if utf8:
        return "utf-8"
    for encoding in ("gb18030", "big5"):
        if _looks_like(head, encoding):
            return encoding
    return _guess(path, head)


def _guess(path: Path, head: bytes) -> str:
    from charset_normalizer import from_bytes

    best = from_bytes(head).best()
    if best is None:
        raise UserError(f"{path}: binary, or an unknown text encoding; give a text file or set "
                        "data.encoding (e.g. gb18030, big5)")
    if _bad_share(str(best)) >= _BAD_SHARE:
        raise _binary(path, f"as {best.encoding} it is mostly control or unassigned characters")
    name = best.encoding.lower().replace("-", "").replace("_", "")
    return "gb18030" if name in _GB_FAMILY else best.encoding


def _cut_point(text: str) -> int:
    """Where to end a block: in its second half, the last paragraph break, else sentence end, else line
    break (which in hard-wrapped text falls mid-sentence), else whitespace; failing all, the end."""
    half = len(text) // 2
    i = text.rfind("\n\n")
    if i >= half:
        return i + 2
    m = None
    for m in _SENTENCE_END.finditer(text, half):  # noqa: B007 (the last match is wanted)
        pass
    if m is not None:
        return m.end()
    i = max(text.rfind("\n"), text.rfind(" "), text.rfind("\t"))
    return i + 1 if i >= half else len(text)


def _blocks(read: Callable[[int], str], source: str, block_chars: int) -> Iterator[Block]:
    """Normalised blocks of at most block_chars from read(n), which returns up to n raw characters
    (fewer only at the end). A block is cut only when more text follows."""
    offset, carry = 0, ""
    while True:
        want = block_chars - len(carry)
        raw = read(want)
        text = carry + normalise(raw)
        if len(raw) < want:  # the end: what is left fits in one block
            if text:
                yield Block(source, offset, text)
            return
        cut = _cut_point(text)
        yield Block(source, offset, text[:cut])
        offset += cut
        carry = text[cut:]


def _decode_error(path: Path, encoding: str, err: UnicodeDecodeError) -> UserError:
    return UserError(f"{path}: not valid {encoding} ({err.reason}); set data.encoding to the file's encoding")


def _read_text(path: Path, encoding: str, block_chars: int) -> Iterator[Block]:
    try:
        # newline=None translates CRLF and CR even when a pair straddles two reads.
        with open(path, encoding=encoding, errors="strict", newline=None) as f:
            yield from _blocks(f.read, str(path), block_chars)
    except UnicodeDecodeError as err:
        raise _decode_error(path, encoding, err) from None


def _read_jsonl(path: Path, field: str, encoding: str, block_chars: int) -> Iterator[Block]:
    try:
        with open(path, encoding=encoding, errors="strict") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{n}: not valid JSON ({err.msg}); each line must be one JSON object"
                                    ) from None
                text = record.get(field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise UserError(f"{path}:{n}: no string field {field!r}; set data.text_field to the field "
                                    "that holds the text")
                yield from _blocks(io.StringIO(text).read, f"{path}#L{n}", block_chars)
    except UnicodeDecodeError as err:
        raise _decode_error(path, encoding, err) from None


def _read_pdf(path: Path) -> str:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError:
        raise UserError(f"{path}: reading PDF needs the docs extra: pip install 'shifu[docs]'") from None
    try:
        return "\n\n".join(page.extract_text() or "" for page in PdfReader(path).pages)
    except (PdfReadError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a readable PDF ({type(err).__name__}); export it again or convert it "
                        "to .txt") from None


def _read_docx(path: Path) -> str:
    try:
        import docx
    except ImportError:
        raise UserError(f"{path}: reading .docx needs the docs extra: pip install 'shifu[docs]'") from None
    import zipfile

    from docx.opc.exceptions import PackageNotFoundError

    try:
        document = docx.Document(str(path))
    except (PackageNotFoundError, zipfile.BadZipFile, KeyError, ValueError) as err:
        raise UserError(f"{path}: not a readable .docx ({type(err).__name__}); save it again as .docx "
                        "or .txt") from None
    parts = []
    for item in document.iter_inner_content():  # paragraphs and tables in document order
        if hasattr(item, "rows"):
            parts.extend("\t".join(cell.text for cell in row.cells) for row in item.rows)
        else:
            parts.append(item.text)
    return "\n\n".join(parts)


def read_blocks(raw_data_path: str, encoding: str | None = None, text_field: str = "text",
                block_chars: int = BLOCK_CHARS) -> Iterator[Block]:
    """Every document under raw_data_path as normalised blocks, in a reproducible order. A binary file
    among several is skipped with a warning; alone, it is an error."""
    sources = find_sources(raw_data_path)
    for path in sources:
        suffix = path.suffix.lower()
        if suffix == ".pdf":
            yield from _blocks(io.StringIO(_read_pdf(path)).read, str(path), block_chars)
            continue
        if suffix == ".docx":
            yield from _blocks(io.StringIO(_read_docx(path)).read, str(path), block_chars)
            continue
        try:
            detected = detect_encoding(path, encoding)
        except BinaryInput as err:
            if len(sources) == 1:
                raise
            log.warning("skipped: %s", err)
            continue
        if suffix == ".jsonl":
            yield from _read_jsonl(path, text_field, detected, block_chars)
        else:
            yield from _read_text(path, detected, block_chars)

