"""Golden-token tests of the 29-token alphabet (docs/paper_notes.md section 1)."""

import numpy as np
import pytest

from protein_performer import vocab


def test_golden_ids():
    assert vocab.VOCAB_SIZE == 29
    assert vocab.TOKENS[:20] == tuple("ACDEFGHIKLMNPQRSTVWY")
    assert [vocab.TOKENS.index(c) for c in "BOUXZ"] == [20, 21, 22, 23, 24]
    assert (vocab.BOS, vocab.EOS, vocab.PAD, vocab.MASK) == (25, 26, 27, 28)
    assert vocab.encode("MKV").tolist() == [10, 8, 17]
    assert vocab.encode(b"ACDEFGHIKLMNPQRSTVWYBOUXZ").tolist() == list(range(25))


def test_encode_is_uint8_and_case_insensitive():
    ids = vocab.encode("mkvLAy")
    assert ids.dtype == np.uint8
    assert ids.tolist() == vocab.encode("MKVLAY").tolist()


def test_decode_round_trip_and_specials():
    seq = "MKTAYIAKQRQISFVKSHFSRQBOUXZ"
    assert vocab.decode(vocab.encode(seq)) == seq
    assert vocab.decode([vocab.BOS, 0, vocab.EOS, vocab.PAD, vocab.MASK]) == "^A$_#"
    with pytest.raises(ValueError, match="token ids must lie"):
        vocab.decode([29])


def test_unknown_letter_policies():
    # positions count from 1, as in prep and as biologists count
    with pytest.raises(vocab.UnknownLetterError, match=r"'J' at position 3"):
        vocab.encode("ACJD")
    assert vocab.encode("ACJ*", unknown="x").tolist() == [0, 1, vocab.X, vocab.X]
    assert vocab.encode("ACJD", unknown="reject") is None
    assert vocab.encode("ACD", unknown="reject").tolist() == [0, 1, 2]
    assert vocab.count_unknown("AC1*jD") == 3
    with pytest.raises(ValueError, match="unknown policy"):
        vocab.encode("J", unknown="drop")
