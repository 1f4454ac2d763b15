"""The demo model's text: the King James Version of the Bible, from Debian's ``bible-kjv-text`` package.

Source and licence: Debian packages ``bible-kjv`` (the ``bible`` program, GPL-2+) and ``bible-kjv-text`` (the
text; the King James Version of 1611 is in the public domain). ``apt-get install bible-kjv`` installs both. The
text is printed verse by verse with ``bible -f Gen1:1-Rev22:21`` (about 4.4 MB); the reference at the start of
each verse ("Ge1:1 ") is dropped, and each book's verses are joined into paragraphs of one chapter each.

Two books are held out of training: Ruth (validation: picks the checkpoint) and Jonah (the test text whose
perplexity is the project's quality yardstick, committed as tests/data/kjv_jonah.txt).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")
VALIDATION_BOOK = "Ruth"
TEST_BOOK = "Jonah"


@dataclass(frozen=True)
class Corpus:
    train: list[str]  # one chapter per line
    validation: list[str]
    test: list[str]


def bible_text() -> str:
    """The whole KJV, one verse a line, as the ``bible`` program prints it."""
    if shutil.which("bible") is None:
        raise RuntimeError("the 'bible' program is missing: apt-get install bible-kjv (Debian's KJV text)")
    return subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True).stdout


def split_chapters(text: str) -> dict[str, list[str]]:
    """book -> its chapters, each a line of space-joined verses (references removed)."""
    books: dict[str, list[str]] = {}
    chapter_key: tuple[str, str] | None = None
    for line in text.splitlines():
        match = VERSE.match(line.strip())
        if match is None:  # a verse continued on the next line (the -f formatting wraps long verses)
            if line.strip() and chapter_key is not None:
                books[chapter_key[0]][-1] += " " + line.strip()
            continue
        book, chapter, _, words = match.groups()
        if chapter_key != (book, chapter):
            books.setdefault(book, []).append(words)
            chapter_key = (book, chapter)
        else:
            books[book][-1] += " " + words
    return books


def load_corpus(text: str | None = None) -> Corpus:
    books = split_chapters(bible_text() if text is None else text)
    if VALIDATION_BOOK not in books or TEST_BOOK not in books:
        raise RuntimeError(f"the KJV text lacks {VALIDATION_BOOK} or {TEST_BOOK}: is bible-kjv-text complete?")
    train = [ch for book, chapters in books.items() if book not in (VALIDATION_BOOK, TEST_BOOK) for ch in chapters]
    return Corpus(train=train, validation=books[VALIDATION_BOOK], test=books[TEST_BOOK])
