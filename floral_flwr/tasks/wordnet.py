"""WordNet 3.0 noun definitions labelled by supersense: the data of the text tasks.

Source: Debian's ``wordnet-base`` (``/usr/share/wordnet/data.noun``, installs offline: ``apt-get
install -y --no-install-recommends wordnet-base``). Each synset line of ``data.noun`` reads
``offset lex_filenum ss_type ... | gloss``; ``lex_filenum`` (field 2) is the synset's supersense
(the lexicographer file, ``LEXNAMES`` below: Debian ships no ``lexnames`` file) and the gloss is
the definition followed by quoted examples (``; "..."``), which are dropped.

    python -m floral_flwr.data prepare wordnet DIR [--from PATH/data.noun]

(:mod:`.prepare`, the command that prepares the image data too) writes ``DIR/wordnet-nouns.tsv``
(offset, lex_filenum, lexname, definition; one synset a line, file order) and
``DIR/manifest.json`` in the prepared-data format of :mod:`.manifest` (dataset
``wordnet-nouns``, one split ``all`` with the SHA-256 of the decoded definitions and supersense
numbers, the source file's SHA-256), atomically; :func:`load_definitions` reads a prepared
directory back (checking the checksums) or, without one, the installed Debian file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .manifest import MANIFEST_NAME, read_manifest, verify_text_split

DEBIAN_DATA_NOUN = "/usr/share/wordnet/data.noun"
TSV_NAME = "wordnet-nouns.tsv"
#: the ``dataset`` a prepared WordNet directory's manifest names; its one split
DATASET = "wordnet-nouns"
SPLIT = "all"
INSTALL_HINT = ("install the Debian package wordnet-base (apt-get install -y "
                "--no-install-recommends wordnet-base), or pass --from PATH/data.noun")

#: WordNet's 45 lexicographer files (supersenses), in file-number order (WordNet 3.0 ``lexnames``).
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl",
)


class WordNetError(ValueError):
    """The WordNet source or a prepared directory is missing or malformed (one readable line)."""


@dataclass(frozen=True)
class Definition:
    offset: int
    lexfile: int
    text: str

    @property
    def lexname(self) -> str:
        return LEXNAMES[self.lexfile]


def definition_of(gloss: str) -> str:
    """The definition part of a gloss: the text before the first quoted example."""
    text = gloss.strip()
    cut = text.find('; "')
    if cut >= 0:
        text = text[:cut]
    elif text.startswith('"'):
        return ""  # examples only
    return " ".join(text.split()).rstrip(";").strip()


def parse_data_noun(path: str | os.PathLike) -> list[Definition]:
    """Every synset of a ``data.noun`` file with a non-empty definition, in file order."""
    p = Path(path)
    if not p.is_file():
        raise WordNetError(f"{p}: WordNet's data.noun is not there; {INSTALL_HINT}")
    out: list[Definition] = []
    with p.open(encoding="latin-1") as f:  # WordNet 3.0 files are 8-bit (a few Latin-1 bytes)
        for number, line in enumerate(f, 1):
            if line.startswith("  "):  # the license header
                continue
            head, sep, gloss = line.partition(" | ")
            fields = head.split()
            if not sep or len(fields) < 3 or not fields[0].isdigit() or not fields[1].isdigit():
                raise WordNetError(f"{p}:{number}: not a WordNet synset line (offset lex_filenum "
                                   f"ss_type ... | gloss): {line[:60]!r}")
            lexfile = int(fields[1])
            if not 0 <= lexfile < len(LEXNAMES):
                raise WordNetError(f"{p}:{number}: lex_filenum {lexfile} is not one of WordNet's "
                                   f"{len(LEXNAMES)} supersenses")
            text = definition_of(gloss)
            if text:
                out.append(Definition(int(fields[0]), lexfile, text.replace("\t", " ")))
    if not out:
        raise WordNetError(f"{p}: no synset lines; is this WordNet's data.noun?")
    return out


def tsv_bytes(rows: list[Definition]) -> bytes:
    """The prepared file: a header, then offset, lex_filenum, lexname, definition per synset."""
    lines = ["offset\tlex_filenum\tlexname\tdefinition"]
    lines += [f"{r.offset}\t{r.lexfile}\t{r.lexname}\t{r.text}" for r in rows]
    return ("\n".join(lines) + "\n").encode("utf-8")


def read_tsv(path: Path) -> list[Definition]:
    """The definitions of a prepared ``wordnet-nouns.tsv``."""
    rows = []
    for number, line in enumerate(Path(path).read_bytes().decode("utf-8").splitlines()[1:], 2):
        parts = line.split("\t", 3)
        if len(parts) != 4 or not parts[0].isdigit() or not parts[1].isdigit():
            raise WordNetError(f"{path}:{number}: not a prepared WordNet line (offset, lex_filenum, "
                               f"lexname, definition); prepare the directory again")
        rows.append(Definition(int(parts[0]), int(parts[1]), parts[3]))
    return rows


def checksum_arrays(rows: list[Definition]) -> tuple[list[str], np.ndarray]:
    """What the manifest's checksums cover: the definitions and their supersense numbers."""
    return [r.text for r in rows], np.array([r.lexfile for r in rows], dtype=np.int64)


_LOADED: dict[str, list[Definition]] = {}


def load_definitions(data_dir: Optional[str]) -> list[Definition]:
    """The definitions of a prepared directory (digest checked), or of the installed Debian
    file when ``data_dir`` is None; cached per process."""
    key = str(data_dir) if data_dir else DEBIAN_DATA_NOUN
    if key in _LOADED:
        return _LOADED[key]
    if not data_dir:
        if not Path(DEBIAN_DATA_NOUN).is_file():
            raise WordNetError(f"the WordNet tasks need WordNet's noun definitions: {INSTALL_HINT}; "
                               f"then run 'python -m floral_flwr.data prepare wordnet DIR' and set "
                               f"data-dir=DIR (or leave data-dir empty to read {DEBIAN_DATA_NOUN})")
        rows = parse_data_noun(DEBIAN_DATA_NOUN)
    else:
        rows = _read_prepared(Path(data_dir))
    _LOADED[key] = rows
    return rows


def _read_prepared(root: Path) -> list[Definition]:
    try:
        doc = read_manifest(root)
    except ValueError as e:
        raise WordNetError(str(e)) from e
    tsv = root / TSV_NAME
    if doc is None or not tsv.is_file():
        raise WordNetError(f"data-dir {str(root)!r} has no prepared WordNet ({TSV_NAME} + {MANIFEST_NAME}); "
                           f"run 'python -m floral_flwr.data prepare wordnet {root}' first ({INSTALL_HINT})")
    if doc["dataset"] != DATASET:
        raise WordNetError(f"data-dir {str(root)!r} holds prepared {doc['dataset']!r} data "
                           f"({doc['variant']}), not WordNet; point data-dir at the directory "
                           f"'python -m floral_flwr.data prepare wordnet DIR' wrote")
    rows = read_tsv(tsv)
    verify_text_split(root, SPLIT, *checksum_arrays(rows), doc)
    return rows


def clear_cache() -> None:
    _LOADED.clear()
