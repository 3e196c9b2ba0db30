"""Nix base-32: spec/store-formats.md §2 vectors, round trips, rejections."""

import random

import pytest

from nixwarden.shared import base32

SMALL = [
    ("", ""),
    ("01", "01"),
    ("ff", "7z"),
    ("0001", "0080"),
    ("123456789a", "k9w5cd0j"),
]

# (hex digest, nix32) from the spec's verified hash table.
HASHES = [
    ("d41d8cd98f00b204e9800998ecf8427e", "3y8bwfr609h3lh9ch0izcqq7fl"),
    ("da39a3ee5e6b4b0d3255bfef95601890afd80709", "143xibwh31h9bvxzalr0sjvbbvpa6ffs"),
    ("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
     "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"),
    ("5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03",
     "00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq"),
    ("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
     "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"),
    ("7daba60473c6b92b848d53c87815d4b7fe5c6f8a", "i9pmrzmpshapij2kin22pff6fc2adavx"),
]


@pytest.mark.parametrize("hexdata,text", SMALL + HASHES)
def test_vectors(hexdata, text):
    data = bytes.fromhex(hexdata)
    assert base32.encode(data) == text
    assert base32.decode(text) == data


@pytest.mark.parametrize("n,length", [(0, 0), (1, 2), (16, 26), (20, 32), (32, 52), (64, 103)])
def test_encoded_length(n, length):
    assert base32.encoded_length(n) == length
    assert len(base32.encode(bytes(n))) == length


def test_encoded_length_negative():
    with pytest.raises(ValueError):
        base32.encoded_length(-1)


def test_alphabet_lacks_eotu():
    assert len(base32.ALPHABET) == 32
    assert not set("eotu") & set(base32.ALPHABET)


def test_round_trip_random():
    rng = random.Random(1234)
    for n in range(0, 70):
        data = rng.randbytes(n)
        text = base32.encode(data)
        assert base32.decode(text) == data
        assert base32.is_valid(text, n)


@pytest.mark.parametrize("text", ["e1", "0o", "0t", "0u", "0A", "0-", "0\u00e9", "00 "])
def test_rejects_bad_characters(text):
    with pytest.raises(ValueError):
        base32.decode(text)


@pytest.mark.parametrize("text", ["0", "000", "000000", "0" * 51, "0" * 54])
def test_rejects_bad_lengths(text):
    with pytest.raises(ValueError):
        base32.decode(text)


@pytest.mark.parametrize("text", ["80", "zz", "2000", "z" + "0" * 51])
def test_rejects_excess_bits(text):
    with pytest.raises(ValueError):
        base32.decode(text)


def test_is_valid():
    assert base32.is_valid("7z", 1)
    assert not base32.is_valid("7z", 2)
    assert not base32.is_valid("80", 1)
