"""Corpora, text files and vocabularies of the language-model app."""

from __future__ import annotations

import pytest
import torch

from rnnkit.apps.lm.corpus import UNKNOWN, Vocabulary, builtin_corpus, read_text_file, tokenize


@pytest.mark.parametrize("name,expected", [("prose", "assert"), ("python", "def ")])
def test_builtin_corpora_exist_offline(name, expected):
    text = builtin_corpus(name)
    assert len(text) > 400_000 and expected in text


def test_word_tokens_give_the_text_back():
    text = "Hello, world!  It's 2026.\nNew line"
    assert "".join(tokenize(text, "word")) == text
    assert tokenize(text, "word")[:4] == ["Hello", ",", " ", "world"]


def test_vocabulary_round_trip_and_unknown_tokens():
    vocabulary = Vocabulary.build("abracadabra", "char")
    assert vocabulary.tokens[0] == UNKNOWN and vocabulary.tokens[1] == "a"  # most frequent first
    ids, unknown = vocabulary.encode("abcz!")
    assert unknown == 2 and ids.tolist()[-2:] == [0, 0]
    assert vocabulary.decode(ids) == f"abc{UNKNOWN}{UNKNOWN}"
    capped = Vocabulary.build("a a a b b c", "word", max_size=3)
    assert capped.tokens == (UNKNOWN, " ", "a")
    assert torch.equal(capped.encode("c")[0], torch.tensor([0]))


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"  \n\n ", "is empty"),
    (b"\x00\x01\x02binary", "looks binary"),
    (b"caf\xe9 latin-1", r"is not valid UTF-8 \(byte 3"),
])
def test_bad_text_files_are_named(tmp_path, content, message):
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_text_file(path)


def test_unknown_level_and_corpus():
    with pytest.raises(ValueError, match="level must be one of char, word, got 'byte'"):
        tokenize("x", "byte")
    with pytest.raises(ValueError, match="corpus must be one of prose, python, got 'poems'"):
        builtin_corpus("poems")


@pytest.mark.parametrize("tokens, level, message", [
    ((), "char", "a vocabulary needs at least 1 token"),
    (("\ufffd", 3), "char", "vocabulary tokens must be strings, got int 3"),
    (("\ufffd",), "byte", "level must be one of char, word, got 'byte'"),
])
def test_a_vocabulary_that_cannot_index_tokens_is_refused(tokens, level, message):
    with pytest.raises(ValueError, match=message):
        Vocabulary(tokens, level)
