"""Reading: every input kind and encoding, normalisation, clear errors, and streaming in flat memory."""

from __future__ import annotations

import codecs
import json
import random
import tracemalloc
from pathlib import Path

import pytest
from conftest import SAMPLE_EN, SAMPLE_ZH

from shifu.errors import UserError
from shifu.read import BLOCK_CHARS, detect_encoding, find_sources, normalise, read_blocks

ZH = SAMPLE_ZH.read_text(encoding="utf-8")[:600]
EN = SAMPLE_EN.read_text(encoding="utf-8")[:600]
# 《孔乙己》 opening in traditional characters, as Big5 files carry it.
TRAD = ("魯鎮的酒店的格局，是和別處不同的：都是當街一個曲尺形的大櫃檯，櫃裡面預備著熱水，可以隨時溫酒。"
        "做工的人，傍午傍晚散了工，每每花四文銅錢，買一碗酒。只有穿長衫的，才踱進店面隔壁的房子裡，要酒要菜，慢慢地坐喝。"
        "孔乙己是站著喝酒而穿長衫的唯一的人。他身材很高大；青白臉色，皺紋間時常夾些傷痕；一部亂蓬蓬的花白的鬍子。\n")


def read_all(path, **kw) -> str:
    return "".join(b.text for b in read_blocks(str(path), **kw))


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---- encodings ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bom", [b"", codecs.BOM_UTF8])
def test_utf8_with_and_without_bom(tmp_path, bom):
    path = write(tmp_path / "a.txt", bom + ZH.encode("utf-8"))
    assert detect_encoding(path) == ("utf-8-sig" if bom else "utf-8")
    assert read_all(path) == ZH  # the BOM never reaches the text


@pytest.mark.parametrize("codec", ["gbk", "gb18030"])
def test_gbk_and_gb18030_are_detected(tmp_path, codec):
    path = write(tmp_path / "gb.txt", ZH.encode(codec))
    assert detect_encoding(path) == "gb18030"  # the superset decodes GBK as well
    assert read_all(path) == ZH


def test_big5_traditional_chinese_is_detected(tmp_path):
    path = write(tmp_path / "big5.txt", (TRAD * 3).encode("big5"))
    assert detect_encoding(path).replace("-", "").lower() in ("big5", "big5hkscs", "cp950")
    assert read_all(path) == TRAD * 3


@pytest.mark.parametrize("bom,codec", [(codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")])
def test_utf16_with_bom(tmp_path, bom, codec):
    text = ZH + "\n" + EN
    path = write(tmp_path / "u16.txt", bom + text.encode(codec))
    assert detect_encoding(path) == "utf-16"
    assert read_all(path) == normalise(text)


def test_encoding_override_wins_and_a_wrong_one_names_the_file(tmp_path):
    path = write(tmp_path / "latin.txt", "Café crème, naïve façade.\n".encode("latin-1"))
    assert read_all(path, encoding="latin-1") == "Café crème, naïve façade.\n"
    gbk = write(tmp_path / "gbk.txt", ZH.encode("gbk"))
    assert read_all(gbk, encoding="gb18030") == ZH
    with pytest.raises(UserError, match=r"gbk\.txt: not valid utf-8.*data\.encoding"):
        read_all(gbk, encoding="utf-8")
    with pytest.raises(UserError, match="data.encoding 'klingon' is not a known encoding"):
        read_all(gbk, encoding="klingon")


def test_binary_file_is_a_clear_error_naming_it(tmp_path):
    png = write(tmp_path / "picture.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    with pytest.raises(UserError, match=r"picture\.txt: looks binary") as err:
        read_all(png)
    assert "\n" not in str(err.value)
    zeros = write(tmp_path / "zeros.txt", b"\x00" * 1000 + b"abc")  # valid UTF-8, yet binary
    with pytest.raises(UserError, match=r"zeros\.txt: looks binary"):
        read_all(zeros)


def test_a_short_gbk_file_is_read_beside_utf8_and_big5_files_in_one_folder(tmp_path):
    # 300 characters that charset detection could not decide (it took them for binary)
    short = SAMPLE_ZH.read_text(encoding="utf-8")[2000:2300]
    write(tmp_path / "a.txt", ZH.encode("utf-8"))
    write(tmp_path / "b.txt", short.encode("gbk"))
    write(tmp_path / "c.txt", TRAD.encode("big5"))
    assert detect_encoding(tmp_path / "b.txt") == "gb18030"
    assert detect_encoding(tmp_path / "c.txt") == "big5"
    assert read_all(tmp_path) == ZH + short + TRAD


@pytest.mark.parametrize("head", [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"PK\x03\x04", b"GIF89a"])
def test_binary_without_nul_bytes_is_skipped_in_a_folder_and_an_error_alone(tmp_path, caplog, head):
    rng = random.Random(5)
    body = head + bytes(rng.randrange(1, 256) for _ in range(3000))  # no NUL anywhere
    write(tmp_path / "a.txt", ZH.encode("utf-8"))
    image = write(tmp_path / "photo.txt", body)
    with caplog.at_level("WARNING", logger="shifu"):
        assert read_all(tmp_path) == ZH
    assert any("photo.txt" in r.getMessage() and "binary" in r.getMessage() for r in caplog.records)
    with pytest.raises(UserError, match=r"photo\.txt: looks binary") as err:
        read_all(image)
    assert "\n" not in str(err.value)


def test_control_heavy_bytes_without_a_signature_are_binary_not_cp932(tmp_path):
    rng = random.Random(8)
    # What charset detection once read as cp932: high bytes and control bytes, no NUL, no signature.
    body = bytes(rng.choice([rng.randrange(1, 32), rng.randrange(0x81, 0xA0), rng.randrange(0xE0, 0xFD)])
                 for _ in range(4000))
    path = write(tmp_path / "blob.txt", body)
    with pytest.raises(UserError, match=r"blob\.txt: (looks binary|binary)"):
        read_all(path)


def test_undecodable_file_is_a_clear_error_naming_it(tmp_path):
    rng = random.Random(3)
    noise = bytes(rng.randrange(1, 256) for _ in range(4000))  # no NULs, not any encoding's text
    path = write(tmp_path / "noise.txt", noise)
    with pytest.raises(UserError, match=r"noise\.txt: .*data\.encoding"):
        read_all(path)


def test_utf8_that_breaks_after_the_sniffed_head_names_the_file(tmp_path):
    path = write(tmp_path / "late.txt", ("好" * 40000).encode("utf-8") + b"\xff\xfe bad")
    with pytest.raises(UserError, match=r"late\.txt: not valid utf-8"):
        read_all(path)


# ---- sources and kinds --------------------------------------------------------------------------

def test_folder_gives_supported_files_sorted_and_skips_hidden(tmp_path):
    for name in ["b.md", "a.txt", "sub/c.txt", ".hidden.txt", ".git/x.md", "image.png", "notes.jsonl"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text('{"text": "x"}' if name.endswith(".jsonl") else name, encoding="utf-8")
    found = [p.relative_to(tmp_path).as_posix() for p in find_sources(str(tmp_path))]
    assert found == ["a.txt", "b.md", "notes.jsonl", "sub/c.txt"]
    assert read_all(tmp_path / "sub") == "sub/c.txt"


def test_glob_and_missing_paths(tmp_path):
    for name in ["one.txt", "two.txt", "three.md", "four.png"]:
        (tmp_path / name).write_text(name, encoding="utf-8")
    assert [p.name for p in find_sources(str(tmp_path / "*.txt"))] == ["one.txt", "two.txt"]
    assert [p.name for p in find_sources(str(tmp_path / "*"))] == ["one.txt", "three.md", "two.txt"]
    with pytest.raises(UserError, match="raw_data_path .*nothing.*: no such file"):
        find_sources(str(tmp_path / "nothing*.txt"))
    single = tmp_path / "data.csv"  # a file named explicitly is read as text, whatever its suffix
    single.write_text("a,b\n", encoding="utf-8")
    assert read_all(single) == "a,b\n"


def test_markdown_is_read_as_text(tmp_path):
    md = "# 标题\n\n正文第一段。\n\n- item one\n- item two\n"
    assert read_all(write(tmp_path / "doc.md", md.encode("utf-8"))) == md


def test_jsonl_reads_the_configured_field_one_document_per_record(tmp_path):
    rows = [{"content": "第一篇。\r\n第二行。", "id": 1}, {"content": "Second document.", "id": 2}]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    blocks = list(read_blocks(str(path), text_field="content"))
    assert [(b.source, b.offset, b.text) for b in blocks] == [
        (f"{path}#L1", 0, "第一篇。\n第二行。"), (f"{path}#L2", 0, "Second document.")]


def test_jsonl_missing_field_and_bad_line_are_clear_errors(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"docs\.jsonl:2: no string field 'text'; set data\.text_field"):
        read_all(path)
    path.write_text('{"text": "ok"}\n{"text": "unterminated\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"docs\.jsonl:2: not valid JSON"):
        read_all(path)
    path.write_text('["a list, not an object"]\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"docs\.jsonl:1: no string field"):
        read_all(path)


def make_pdf(path: Path, pages: list[list[str]]) -> Path:
    """A minimal PDF by hand: one Helvetica text stream per page, with a correct xref table."""
    n = len(pages)
    objs = ["<< /Type /Catalog /Pages 2 0 R >>",
            f"<< /Type /Pages /Kids [{' '.join(f'{4 + 2 * i} 0 R' for i in range(n))}] /Count {n} >>",
            "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, lines in enumerate(pages):
        content = "BT /F1 12 Tf 72 720 Td 16 TL " + " ".join(f"({line}) Tj T*" for line in lines) + " ET"
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                    f"/Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>")
        objs.append(f"<< /Length {len(content)} >>\nstream\n{content}\nendstream")
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for k, obj in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{k} 0 obj\n{obj}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(bytes(out))
    return path


def test_pdf_text_is_extracted_page_by_page(tmp_path):
    pytest.importorskip("pypdf")
    path = make_pdf(tmp_path / "book.pdf", [["Alice was beginning to get very tired.", "She had nothing to do."],
                                             ["Down the rabbit hole she went."]])
    text = read_all(path)
    assert "Alice was beginning to get very tired." in text and "She had nothing to do." in text
    assert text.index("tired") < text.index("rabbit hole")
    assert "\n\n" in text  # pages are paragraphs


def test_docx_paragraphs_and_tables_in_order(tmp_path):
    docx = pytest.importorskip("docx")
    document = docx.Document()
    document.add_paragraph("鲁镇的酒店的格局，是和别处不同的。")
    table = document.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text, table.rows[0].cells[1].text = "茴香豆", "四文"
    document.add_paragraph("孔乙己是站着喝酒而穿长衫的唯一的人。")
    path = tmp_path / "story.docx"
    document.save(str(path))
    assert read_all(path) == "鲁镇的酒店的格局，是和别处不同的。\n\n茴香豆\t四文\n\n孔乙己是站着喝酒而穿长衫的唯一的人。"


@pytest.mark.parametrize("name", ["broken.pdf", "broken.docx"])
def test_corrupt_pdf_or_docx_is_a_clear_error(tmp_path, name):
    pytest.importorskip("pypdf")
    pytest.importorskip("docx")
    path = write(tmp_path / name, b"this is not what the suffix says")
    with pytest.raises(UserError, match=rf"{name.replace('.', '[.]')}: not a readable"):
        read_all(path)


# ---- normalisation ------------------------------------------------------------------------------

def test_line_endings_become_lf_even_across_block_boundaries(tmp_path):
    text = "第一行。\r\n第二行。\r第三行。\r\n\r\nEnd.\r"
    path = write(tmp_path / "crlf.txt", text.encode("utf-8"))
    expected = "第一行。\n第二行。\n第三行。\n\nEnd.\n"
    assert read_all(path) == expected
    for size in (3, 4, 5, 6, 7):  # every way a CRLF pair can straddle two reads
        assert read_all(path, block_chars=size) == expected


def test_control_characters_dropped_full_width_punctuation_kept(tmp_path):
    text = "Tab\there\x00\x07\x1b[0m，。！？：；（）“”「」　全角\x7f\x85end\u2028next\ufeff.\n" + EN
    path = write(tmp_path / "ctl.txt", text.encode("utf-8"))  # one stray NUL in text is not binary
    assert read_all(path) == "Tab\there[0m，。！？：；（）“”「」　全角\nend\nnext.\n" + EN


def test_the_fast_control_check_agrees_with_the_regex_on_every_bmp_character():
    from shifu.read import _CONTROL, _has_control

    for cp in range(0x10000):
        if 0xD800 <= cp < 0xE000:
            continue
        text = "ab" + chr(cp) + "中文"
        assert _has_control(text) == bool(_CONTROL.search(text)), hex(cp)
    assert normalise("a\U0001F600\x07b\ud800") == "a\U0001F600b\ud800"  # astral and lone surrogates pass


def test_blocks_respect_the_limit_cut_at_boundaries_and_keep_offsets(tmp_path):
    paragraphs = [f"第{i}段。" + "这是一句话，" * (i % 7 + 1) + "完。" for i in range(200)]
    text = "\n\n".join(paragraphs)
    path = write(tmp_path / "p.txt", text.encode("utf-8"))
    blocks = list(read_blocks(str(path), block_chars=300))
    assert "".join(b.text for b in blocks) == text
    assert all(len(b.text) <= 300 for b in blocks)
    assert all(b.text.endswith("\n\n") for b in blocks[:-1])  # paragraphs stay whole
    offsets = [b.offset for b in blocks]
    assert offsets == [sum(len(b.text) for b in blocks[:k]) for k in range(len(blocks))]


def test_hard_wrapped_text_is_cut_at_sentence_ends_not_line_breaks(tmp_path):
    wrapped = "\n".join(EN.replace("\n", " ")[i:i + 70] for i in range(0, 600, 70)) * 5  # no blank line
    path = write(tmp_path / "wrapped.txt", wrapped.encode("utf-8"))
    blocks = list(read_blocks(str(path), block_chars=400))
    assert "".join(b.text for b in blocks) == wrapped
    assert all(b.text.rstrip()[-1] in ".!?”’" for b in blocks[:-1]), [b.text[-30:] for b in blocks]


def test_a_huge_line_without_boundaries_is_still_cut_to_the_limit(tmp_path):
    path = write(tmp_path / "line.txt", ("字" * 10_000).encode("utf-8"))
    blocks = list(read_blocks(str(path), block_chars=999))
    assert all(len(b.text) <= 999 for b in blocks) and "".join(b.text for b in blocks) == "字" * 10_000


def _stream_peak(path: Path) -> tuple[int, int]:
    """(characters read, tracemalloc peak in bytes) of reading path block by block."""
    chars = 0
    tracemalloc.start()
    try:
        for block in read_blocks(str(path)):
            assert len(block.text) <= BLOCK_CHARS
            chars += len(block.text)
        return chars, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_large_input_streams_in_bounded_blocks_with_flat_memory(tmp_path):
    line = ZH.replace("\n", "") + " " + EN.replace("\n", " ") + "\n"
    sizes, peaks = [], []
    for name, target in (("small.txt", 2_000_000), ("big.txt", 20_000_000)):
        path = tmp_path / name
        with open(path, "w", encoding="utf-8") as f:
            while f.tell() < target:
                f.write(line * 50 + "\n")
        chars, peak = _stream_peak(path)
        assert chars == len(path.read_text(encoding="utf-8"))
        sizes.append(path.stat().st_size)
        peaks.append(peak)
    assert peaks[1] < sizes[1] / 3, f"peak {peaks[1] / 1e6:.1f} MB while streaming a {sizes[1] / 1e6:.0f} MB file"
    assert peaks[1] < 1.2 * peaks[0] + 1e6, f"peak grew from {peaks[0] / 1e6:.1f} to {peaks[1] / 1e6:.1f} MB"
