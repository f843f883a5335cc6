"""A ``--data`` folder that holds data files rather than a ``save_to_disk`` dataset: a copy of a
hub dataset's repository (``data/train-00000-of-00002.parquet``, ...) or a folder of shards.

Its data files (every supported extension, in subfolders too, hidden ones skipped) are read in
name order, as if each were passed. Two things would silently train on the wrong text, so they
are refused with the files to pass instead: files of more than one kind (a ``LICENSE.txt`` or a
``dataset_info.json`` beside the ``.parquet`` shards), and files of more than one split (a test
split trained on).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

from lorakit.errors import DataError

# a word in a file's or a folder's name -> the split it names (the hub's own naming)
SPLIT_WORDS = {"train": "train", "training": "train", "test": "test", "testing": "test",
               "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
               "eval": "validation"}
_WORDS = re.compile(r"[a-z]+")
_HUB_SHARD = re.compile(r"^([A-Za-z0-9_.]+)-\d{5}-of-\d{5}$")  # how the hub names a split's parquet files
_SHOWN = 4
# which kind of file, of as many, is more likely the data: READMEs and licences are .txt, dataset cards' infos .json
_LIKELY_DATA = [".parquet", ".jsonl", ".csv", ".json", ".txt"]


def is_saved_dataset(folder: Path) -> bool:
    """What `datasets.Dataset.save_to_disk` (or a DatasetDict's) writes first."""
    return (folder / "state.json").exists() or (folder / "dataset_dict.json").exists()


def data_files_in(folder: Path, extensions) -> list[Path]:
    """The folder's data files to read, in name order; DataError where that would be ambiguous."""
    files = sorted(_files_under(folder, {e.lower() for e in extensions}), key=lambda p: str(p.relative_to(folder)))
    if not files:
        raise DataError(f"{folder} holds no data files ({', '.join(sorted(extensions))}) and is not a dataset "
                        "saved with datasets' save_to_disk (no state.json or dataset_dict.json); pass the data "
                        "files, or the folder save_to_disk wrote")
    _refuse_mixed_kinds(folder, files)
    _refuse_mixed_splits(folder, files)
    return files


def folder_notices(paths, extensions) -> list[str]:
    """`data folder hub/: 2 .parquet files read in name order (data/train-0.parquet, ...)` for each
    folder of files given (the run prints it: a stray file read as data would otherwise go unseen)."""
    notices = []
    for path in map(Path, paths):
        if path.is_dir() and not is_saved_dataset(path):
            files = data_files_in(path, extensions)
            names = ", ".join(str(p.relative_to(path)) for p in files[:_SHOWN])
            names += ", ..." if len(files) > _SHOWN else ""
            notices.append(f"data folder {path}/: {len(files)} {files[0].suffix.lower()} "
                           f"file{'s' * (len(files) != 1)} read in name order ({names})")
    return notices


def _files_under(folder: Path, extensions: set[str]):
    visited = set()
    for root, dirs, names in os.walk(folder, followlinks=True):  # a linked folder's files are the folder's too
        real = os.path.realpath(root)
        if real in visited:  # a link back up the tree
            dirs[:] = []
            continue
        visited.add(real)
        if root != str(folder) and is_saved_dataset(Path(root)):  # its state.json is no record
            raise DataError(f"{folder} holds a dataset saved with datasets' save_to_disk in {root}; pass that "
                            "folder itself as --data")
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .git, .cache, .ipynb_checkpoints
        for name in names:
            path = Path(root) / name
            if not name.startswith(".") and path.suffix.lower() in extensions and path.is_file():
                yield path


def _refuse_mixed_kinds(folder: Path, files: list[Path]) -> None:
    kinds = Counter(p.suffix.lower() for p in files)
    if len(kinds) == 1:
        return
    counts = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
    most = max(kinds, key=lambda kind: (kinds[kind], -_LIKELY_DATA.index(kind)))
    raise DataError(f"{folder} holds data files of {len(kinds)} kinds ({counts}), and some may not be training "
                    f"data (a README.txt, a dataset_info.json); pass the files to train on, e.g. --data "
                    f"{_shown([path for path in files if path.suffix.lower() == most])}")


def _refuse_mixed_splits(folder: Path, files: list[Path]) -> None:
    splits = {path: split_of(path.relative_to(folder)) for path in files}
    named = Counter(splits.values())
    if len(named) == 1:
        return
    listed = ", ".join(f"{split or 'no split named'} ({count} file{'s' * (count != 1)})"
                       for split, count in sorted(named.items(), key=lambda item: item[0] or ""))
    train = [path for path, split in splits.items() if split == "train"]
    example = f"--data {_shown(train)}" if train else "--data with that split's files"
    raise DataError(f"{folder} holds files of several splits: {listed}; pass one split's files, e.g. {example} "
                    "(and another's to --eval-data)")


def split_of(relative: Path) -> str | None:
    """The split a file's name, else its nearest folder's name, says it holds; None if none does.
    A hub shard (`train_sft-00000-of-00003.parquet`) names its split whole: train_sft and
    train_gen are two datasets, not one train split."""
    shard = _HUB_SHARD.match(relative.stem)
    if shard:
        return shard.group(1).lower()
    for part in [relative.stem, *reversed(relative.parent.parts)]:
        found = {SPLIT_WORDS[word] for word in _WORDS.findall(part.lower()) if word in SPLIT_WORDS}
        if len(found) == 1:
            return found.pop()
    return None


def _shown(files: list[Path]) -> str:
    names = " ".join(str(p) for p in files[:_SHOWN])
    return names if len(files) <= _SHOWN else f"{names} ... ({len(files)} files)"
