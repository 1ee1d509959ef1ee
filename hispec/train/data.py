"""Training corpora: documents from a directory of files, a JSONL file or the Python standard
library; a deterministic held-out split; packing into fixed-length sequences; seeded batches.

The held-out set is chosen by a hash of each document's name (not by position or a random
draw), so it stays the same when files are added or removed elsewhere in the corpus.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

HELDOUT_MODULUS = 50  # ~2% of documents held out
STDLIB = "stdlib"
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})


@dataclass(frozen=True)
class Document:
    name: str  # stable identifier: path relative to the corpus root, or "line-<n>" for JSONL
    text: str


@dataclass(frozen=True)
class Split:
    train: tuple[Document, ...]
    heldout: tuple[Document, ...]

    def manifest(self, source: str) -> dict:
        return {
            "source": source,
            "heldout_rule": f"sha1(name) % {HELDOUT_MODULUS} == 0",
            "train": [d.name for d in self.train],
            "heldout": [d.name for d in self.heldout],
        }


# ---- sources -------------------------------------------------------------------------------
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus() -> list[Path]:
    """The running interpreter's standard-library `.py` sources, sorted, without test suites
    (`test/`, `tests/`, `idlelib/idle_test`, `lib2to3/tests`, ...) or `site-packages`."""
    root = stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if "site-packages" in parts or "dist-packages" in parts or _TEST_DIRS.intersection(parts[:-1]):
            continue
        files.append(path)
    return sorted(files)


def load_documents(source: str | Path, pattern: str = "*.py") -> list[Document]:
    """Documents of `source`: "stdlib", a `.jsonl` file ({"text": ...} per line) or a directory
    searched recursively for `pattern`. Files that are not UTF-8 or are empty are skipped."""
    if str(source) == STDLIB:
        return _read_files(stdlib_corpus(), stdlib_root())
    path = Path(source)
    if path.is_file() and path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.is_dir():
        return _read_files(sorted(path.rglob(pattern)), path)
    raise FileNotFoundError(f"data source {source!r} is not 'stdlib', a .jsonl file or a directory")


def _read_files(files: Sequence[Path], root: Path) -> list[Document]:
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(Document(f.relative_to(root).as_posix(), text))
    return docs


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            if line.strip():
                text = json.loads(line)["text"]
                if text.strip():
                    docs.append(Document(f"line-{n}", text))
    return docs


# ---- split ---------------------------------------------------------------------------------
def _name_hash(name: str) -> int:
    return int(hashlib.sha1(name.encode("utf-8")).hexdigest(), 16)


def is_heldout(name: str) -> bool:
    return _name_hash(name) % HELDOUT_MODULUS == 0


def split_documents(docs: Sequence[Document]) -> Split:
    """Held out: documents whose name hash is 0 mod HELDOUT_MODULUS. A corpus too small to hit
    the rule holds out its single lowest-hash document, so there is always something to
    evaluate on (when there are at least two documents)."""
    heldout = [d for d in docs if is_heldout(d.name)]
    if not heldout and len(docs) > 1:
        heldout = [min(docs, key=lambda d: _name_hash(d.name))]
    names = {d.name for d in heldout}
    return Split(tuple(d for d in docs if d.name not in names), tuple(heldout))


def write_manifest(split: Split, source: str, out_dir: str | Path) -> Path:
    path = Path(out_dir) / "data_split.json"
    path.write_text(json.dumps(split.manifest(source), indent=1))
    return path


# ---- packing and batches -------------------------------------------------------------------
def encode_documents(tok: Tokenizer, docs: Sequence[Document], bos_id: int, eos_id: int) -> torch.Tensor:
    """All documents as one int64 stream: `<s> tokens </s>` per document, concatenated."""
    stream: list[int] = []
    for enc in tok.encode_batch([d.text for d in docs], add_special_tokens=False):
        stream.append(bos_id)
        stream.extend(enc.ids)
        stream.append(eos_id)
    return torch.tensor(stream, dtype=torch.int64)


def pack(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[N] tokens -> [num_seqs, seq_len + 1] non-overlapping windows (inputs + shifted targets);
    the ragged tail is dropped."""
    width = seq_len + 1
    n = stream.numel() // width
    if n == 0:
        raise ValueError(f"corpus of {stream.numel()} tokens is shorter than one sequence ({width})")
    return stream[: n * width].view(n, width)


def batch_at(sequences: torch.Tensor, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The batch for training step `step` (0-based): [batch_size, seq_len + 1].

    A pure function of (step, seed): each epoch is a seeded permutation of the sequences, so
    resuming at any step replays exactly the batches an uninterrupted run would have seen.
    """
    n = sequences.shape[0]
    rows = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(i, n)
        rows.append(int(_epoch_order(n, seed, epoch)[offset]))
    return sequences[rows]


_ORDER_CACHE: dict[tuple[int, int, int], torch.Tensor] = {}


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    key = (n, seed, epoch)
    if key not in _ORDER_CACHE:
        _ORDER_CACHE.clear()  # one or two epochs are live at a time
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _ORDER_CACHE[key] = torch.randperm(n, generator=gen)
    return _ORDER_CACHE[key]


def batches(sequences: torch.Tensor, batch_size: int, seed: int, start_step: int = 0) -> Iterator[torch.Tensor]:
    step = start_step
    while True:
        yield batch_at(sequences, step, batch_size, seed)
        step += 1
