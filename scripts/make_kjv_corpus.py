"""Builds data/kjv.jsonl.zst, the bundled corpus, from the output of Debian's `bible` program.

Source: the King James Version of the Bible (1611, public domain), as packaged by Debian in
`bible-kjv-text`. Usage (on Debian): `apt-get install bible-kjv && bible "Gen1:1-Rev22:21" > kjv.txt`,
then `python scripts/make_kjv_corpus.py kjv.txt data/kjv.jsonl.zst`. One JSON line per chapter, in the
SlimPajama layout: {"text": ..., "meta": {"source": "kjv", "chapter": "Genesis 1"}}.
"""
import json
import re
import sys

import zstandard

_CHAPTER = re.compile(r"^(\S.*\s\d+)$")
_VERSE = re.compile(r"^\s+\d+\s+")


def chapters(lines: list[str]):
  """Yields (title, text) per chapter; verse numbers are dropped and wrapped lines joined."""
  title, verses = None, []
  for line in lines:
    line = line.rstrip("\n")
    if _CHAPTER.match(line):
      if title is not None:
        yield title, "\n".join(verses)
      title, verses = line.strip(), []
    elif _VERSE.match(line):
      verses.append(_VERSE.sub("", line).strip())
    elif line.strip() and verses:
      verses[-1] += " " + line.strip()
  if title is not None:
    yield title, "\n".join(verses)


def main(src: str, dst: str) -> None:
  with open(src, encoding="utf-8") as f:
    docs = [json.dumps({"text": text, "meta": {"source": "kjv", "chapter": title}})
            for title, text in chapters(f.readlines())]
  with open(dst, "wb") as f:
    f.write(zstandard.ZstdCompressor(level=19).compress(("\n".join(docs) + "\n").encode()))
  print(f"{len(docs)} documents -> {dst}")


if __name__ == "__main__":
  main(*sys.argv[1:3])
