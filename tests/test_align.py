"""Teacher-to-student alignment on hand-made cases, and the on-disk target files."""

import numpy as np
import pytest

from shifu.align import Targets, TargetWriter, align, student_vocab
from shifu.models import token_bytes_table


def run(answer, s_pieces, t_tokens, cands, vocab, width=4, t_lp=None):
    s_ids = [vocab[p] for p in s_pieces]
    t_lp = np.asarray(t_lp if t_lp is not None else [-0.1] * len(t_tokens), np.float32)
    k = max(len(row) for row in cands)
    cand = [[c for c, _ in row] + [b""] * (k - len(row)) for row in cands]
    cand_lp = np.asarray([[lp for _, lp in row] + [-np.inf] * (k - len(row)) for row in cands], np.float32)
    return align(answer.encode(), [p for p in s_pieces], s_ids, t_tokens, t_lp, cand, cand_lp, vocab, width)


def test_same_tokenization_maps_every_candidate_exactly():
    vocab = {b"\xe4\xbd\xa0": 0, b"\xe5\xa5\xbd": 1, b"!": 2, b"?": 3}
    pieces = ["你".encode(), "好".encode(), b"!"]
    cands = [[("你".encode(), -0.1), ("好".encode(), -2.5)], [("好".encode(), -0.2), (b"?", -1.8)],
             [(b"!", -0.05), (b"?", -3.0)]]
    ids, lps = run("你好!", pieces, pieces, cands, vocab)
    assert ids[:, 0].tolist() == [0, 1, 2]
    assert ids[1, :2].tolist() == [1, 3] and lps[1, 1] == pytest.approx(-1.8)
    assert (ids[:, 2:] == -1).all()


def test_student_token_over_two_teacher_tokens_gets_chain_probability():
    vocab = {b"ab": 7, b"a": 1, b"b": 2}
    ids, lps = run("ab", [b"ab"], [b"a", b"b"], [[(b"a", -0.5)], [(b"b", -0.25)]], vocab, t_lp=[-0.5, -0.25])
    assert ids[0, 0] == 7 and lps[0, 0] == pytest.approx(-0.75)
    assert (ids[0, 1:] == -1).all()


def test_misaligned_positions_fall_back_to_ce():
    # student: "ab" "c"; teacher: "a" "bc" -> "ab" ends inside "bc", "c" starts inside it
    vocab = {b"ab": 0, b"c": 1}
    ids, _ = run("abc", [b"ab", b"c"], [b"a", b"bc"], [[(b"a", -0.1)], [(b"bc", -0.1)]], vocab)
    assert (ids == -1).all()


def test_candidates_landing_on_the_same_id_merge_and_unknown_go_to_tail():
    vocab = {b" x": 5, b"y": 6}
    table = {b" x": 5}
    # two spellings map to one id through the vocab dict (same bytes) -> merged by logaddexp
    ids, lps = run(" x", [b" x"], [b" x"], [[(b" x", -1.0), (b" x", -1.0), (b"zzz", -0.3)]], {**vocab, **table})
    assert ids[0, 0] == 5 and lps[0, 0] == pytest.approx(np.logaddexp(-1.0, -1.0), abs=1e-6)
    assert (ids[0, 1:] == -1).all()  # b"zzz" is not in the student's vocabulary


def test_emoji_split_across_byte_tokens():
    emoji = "🙂".encode()  # 4 bytes
    vocab = {emoji[:2]: 0, emoji[2:]: 1, emoji: 2}
    # teacher has the emoji as one token, student as two byte tokens: no 1:1 boundary at byte 2
    ids, _ = run("🙂", [emoji[:2], emoji[2:]], [emoji], [[(emoji, -0.1)]], vocab)
    assert ids[0, 0] == -1  # student token 1 ends inside the teacher token
    assert ids[1, 0] == -1  # and token 2 starts inside it
    # the other way round: teacher splits, student whole -> chain probability
    ids, lps = run("🙂", [emoji], [emoji[:2], emoji[2:]], [[(emoji[:2], -0.2)], [(emoji[2:], -0.3)]], vocab,
                   t_lp=[-0.2, -0.3])
    assert ids[0, 0] == 2 and lps[0, 0] == pytest.approx(-0.5)


def test_whitespace_tokens_and_leading_space_of_teacher_output():
    vocab = {b"  ": 0, b"\n": 1, b"hi": 2}
    # the stored output is stripped; the teacher's tokens include the leading newline
    ids, _ = run("hi  ", [b"hi", b"  "], [b"\n", b"hi", b"  "],
                 [[(b"\n", -0.1)], [(b"hi", -0.1)], [(b"  ", -0.1), (b"\n", -2.0)]], vocab)
    assert ids[0, 0] == 2 and ids[1].tolist()[:2] == [0, 1]


def test_sentencepiece_leading_space_and_truncated_student_answer():
    vocab = {b" ab": 0, b"c": 1, b"ab": 2}
    ids, _ = run("abc", [b" ab"], [b"ab", b"c"], [[(b"ab", -0.1)], [(b"c", -0.1)]], vocab)
    assert ids[0, 0] == 0  # " ab" aligned after the SentencePiece space; the answer was cut after it


def test_chinese_with_real_tokenizer_tables(tiny_student):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_student)
    table = token_bytes_table(tok)
    text = "孔乙己着了慌，伸开五指将碟子罩住。🙂 Hello!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert b"".join(table[i] for i in ids) == text.encode()
    vocab = student_vocab(table, set(tok.all_special_ids))
    pieces = [table[i] for i in ids]
    cands = [[(p, -0.1)] for p in pieces]
    got, _ = align(text.encode(), pieces, ids, pieces, np.full(len(ids), -0.1, np.float32),
                   [[c for c, _ in r] for r in cands], np.full((len(ids), 1), -0.1, np.float32), vocab, 2)
    assert got[:, 0].tolist() == ids  # same tokenizer: every position exact


def test_target_files_round_trip(tmp_path):
    w = TargetWriter(tmp_path, capacity=10, width=3)
    w.add(0, np.array([[1, 2, -1], [-1, -1, -1]], np.int32), np.array([[-0.1, -2, -np.inf]] * 2, np.float32))
    w.add(2, np.array([[5, -1, -1]], np.int32), np.array([[-0.3, -np.inf, -np.inf]], np.float32))
    meta = w.close()
    assert meta["covered"] == 2 and meta["total"] == 3
    t = Targets(tmp_path)
    assert t.get(1) is None
    ids, lps = t.get(2)
    assert ids.tolist() == [[5, -1, -1]] and lps[0, 0] == pytest.approx(-0.3)
    assert t.coverage == pytest.approx(2 / 3)
