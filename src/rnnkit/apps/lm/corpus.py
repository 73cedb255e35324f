"""Text for language models: built-in corpora, user files read with clear errors, vocabularies.

Built-in corpora come from what every Python installation has, so nothing is downloaded:

- ``"prose"``: English prose, the language reference topics of the standard library's help
  system (``pydoc_data.topics``, about 460 k characters);
- ``"python"``: Python source code, the standard library's own ``.py`` files in sorted order, up
  to 2 M characters.
"""

from __future__ import annotations

import re
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

CORPORA = ("prose", "python")
LEVELS = ("char", "word")
PYTHON_CORPUS_CHARS = 2_000_000
UNKNOWN = "\ufffd"  # the replacement character stands for every symbol outside the vocabulary

# Words, runs of spaces, and single other characters: joining the tokens gives the text back.
_WORD_PATTERN = re.compile(r"\w+|\s+|[^\w\s]")


def builtin_corpus(name: str) -> str:
    """The text of a built-in corpus (see the module docstring)."""
    if name == "prose":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key] for key in sorted(topics))
    if name == "python":
        library = Path(sysconfig.get_paths()["stdlib"])
        pieces, total = [], 0
        for path in sorted(library.glob("*.py")):
            text = path.read_text(encoding="utf-8", errors="replace")
            pieces.append(text)
            total += len(text)
            if total >= PYTHON_CORPUS_CHARS:
                break
        return "".join(pieces)[:PYTHON_CORPUS_CHARS]
    raise ValueError(f"corpus must be one of {', '.join(CORPORA)}, got {name!r}")


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file's content; a clear ``ValueError`` for anything that is not one."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"text file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"text file {str(path)!r} is not a regular file")
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"text file {str(path)!r} is empty; give a file with text in it")
    if b"\x00" in data[:65536]:
        raise ValueError(
            f"text file {str(path)!r} looks binary (it contains NUL bytes); give a UTF-8 text "
            "file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"text file {str(path)!r} is not valid UTF-8 (byte {error.start}: "
            f"{data[error.start:error.start + 1]!r}); convert it, e.g. iconv -t UTF-8") from None


def tokenize(text: str, level: str) -> list[str]:
    """Characters, or words with the spaces and punctuation between them kept as tokens."""
    if level == "char":
        return list(text)
    if level == "word":
        return _WORD_PATTERN.findall(text)
    raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")


@dataclass(frozen=True)
class Vocabulary:
    """Tokens by id; id 0 is `UNKNOWN`, which every token outside the vocabulary maps to."""

    tokens: tuple[str, ...]
    level: str

    def __post_init__(self) -> None:
        # Refused here, not at the first sampled token: ids index `tokens`, and id 0 must exist.
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        if len(self.tokens) < 1:
            raise ValueError("a vocabulary needs at least 1 token (id 0, the unknown token), "
                             "got 0")
        odd = [t for t in self.tokens if not isinstance(t, str)]
        if odd:
            raise ValueError(f"vocabulary tokens must be strings, got {type(odd[0]).__name__} "
                             f"{odd[0]!r}")

    @classmethod
    def build(cls, text: str, level: str, max_size: int | None = None) -> Vocabulary:
        """The tokens of ``text`` by frequency (ties by first appearance), at most ``max_size``."""
        counts = Counter(tokenize(text, level))
        counts.pop(UNKNOWN, None)
        ranked = [token for token, _ in counts.most_common(None if max_size is None
                                                           else max_size - 1)]
        return cls((UNKNOWN, *ranked), level)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> tuple[Tensor, int]:
        """Token ids ``(L,)`` int64 and the number of tokens that were unknown."""
        index = {token: i for i, token in enumerate(self.tokens)}
        ids = [index.get(token, 0) for token in tokenize(text, self.level)]
        unknown = sum(1 for i in ids if i == 0)
        return torch.tensor(ids, dtype=torch.int64), unknown

    def decode(self, ids) -> str:
        return "".join(self.tokens[int(i)] for i in ids)
