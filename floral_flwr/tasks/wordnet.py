"""WordNet 3.0 noun definitions labelled by supersense: the data of the text tasks.

Source: Debian's ``wordnet-base`` (``/usr/share/wordnet/data.noun``, installs offline: ``apt-get
install -y --no-install-recommends wordnet-base``). Each synset line of ``data.noun`` reads
``offset lex_filenum ss_type ... | gloss``; ``lex_filenum`` (field 2) is the synset's supersense
(the lexicographer file, ``LEXNAMES`` below: Debian ships no ``lexnames`` file) and the gloss is
the definition followed by quoted examples (``; "..."``), which are dropped.

    python -m floral_flwr.data prepare wordnet DIR [--from PATH/data.noun]

writes ``DIR/wordnet-nouns.tsv`` (offset, lex_filenum, lexname, definition; one synset a line,
file order) and ``DIR/manifest.json`` (source, row count, SHA-256 of the TSV), atomically;
:func:`load_definitions` reads a prepared directory back (checking the digest) or, without one,
the installed Debian file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from floral_flwr.fileio import atomic_write_bytes

DEBIAN_DATA_NOUN = "/usr/share/wordnet/data.noun"
TSV_NAME = "wordnet-nouns.tsv"
MANIFEST_NAME = "manifest.json"
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


def _tsv_bytes(rows: list[Definition]) -> bytes:
    lines = ["offset\tlex_filenum\tlexname\tdefinition"]
    lines += [f"{r.offset}\t{r.lexfile}\t{r.lexname}\t{r.text}" for r in rows]
    return ("\n".join(lines) + "\n").encode("utf-8")


def prepare_wordnet(out_dir: str | os.PathLike, source: Optional[str] = None) -> tuple[Path, int]:
    """Write the prepared directory (see the module doc); returns (directory, rows)."""
    src = Path(source or DEBIAN_DATA_NOUN)
    if src.is_dir():
        src = src / "data.noun"
    rows = parse_data_noun(src)
    data = _tsv_bytes(rows)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise WordNetError(f"{out}: exists and is not a directory")
    atomic_write_bytes(out / TSV_NAME, data, fsync=False)
    manifest = {"dataset": "wordnet-nouns", "source": "WordNet 3.0 data.noun (Debian wordnet-base)",
                "rows": len(rows), "sha256": hashlib.sha256(data).hexdigest(), "file": TSV_NAME}
    atomic_write_bytes(out / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode(), fsync=False)
    return out, len(rows)


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
    tsv, manifest = root / TSV_NAME, root / MANIFEST_NAME
    if not tsv.is_file() or not manifest.is_file():
        raise WordNetError(f"data-dir {str(root)!r} has no prepared WordNet ({TSV_NAME} + {MANIFEST_NAME}); "
                           f"run 'python -m floral_flwr.data prepare wordnet {root}' first ({INSTALL_HINT})")
    data = tsv.read_bytes()
    meta = json.loads(manifest.read_text())
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise WordNetError(f"{tsv}: its SHA-256 differs from {manifest}'s: the file changed after "
                           f"'prepare'; prepare the directory again")
    rows = []
    for line in data.decode("utf-8").splitlines()[1:]:
        offset, lexfile, _, text = line.split("\t", 3)
        rows.append(Definition(int(offset), int(lexfile), text))
    return rows


def clear_cache() -> None:
    _LOADED.clear()
