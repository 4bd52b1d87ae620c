"""The run folder: the one module that knows its layout, writes its files and reads them back.

    run.json          what was asked (the fingerprint: model, thresholds, dtype, request, the prompts' content
                      hash) and the command that made it
    parts/            one set of files per finished batch and rank: heads-, sweep-, acts- (per-token arrays), then
                      prompts- last, so a batch counts as done only when all of its files are there
    heads.parquet, prompts.parquet, sweep.parquet    the finished tables
    activations.npz   per-token arrays of a result saved from memory (a scan's own are read from parts/)
    summary.json      settings, versions and the headline numbers
    figures/          the scan's pictures
    views/            per-token pictures of one prompt, for the report (catchtag scan writes them)
    ablate/           interventions on tags (catchtag ablate): attribution, ablation and release tables

Every file is written beside its final name and renamed into place, so an interrupted write never leaves a
half file under a real name. A resumed scan drops a batch whose files do not read back (they are redone); a load
that meets a broken or missing file says which, and the command that repairs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from catchtag.cache import ActivationCache
from catchtag.distributed import Dist
from catchtag.errors import CatchtagError

# Every file each job writes under its --out (glob patterns, relative to --out): a job writes nothing else there
# (tests/test_analyses.py holds every command to it). catchtag.lock is the writer lock (WriterLock).
ARTIFACTS = {
    "scan": ("run.json", "parts/*", "heads.parquet", "prompts.parquet", "sweep.parquet", "activations.npz",
             "summary.json", "figures/*.png", "views/*", "catchtag.lock", "catchtag-r*.lock", "catchtag.files"),
    "ablate": ("ablate/run.json", "ablate/parts/*.parquet", "ablate/attribution.parquet", "ablate/ablation.parquet",
               "ablate/release.parquet", "ablate/tag_or_bias.csv", "ablate/summary.json", "ablate/ablation.png",
               "ablate/release.png", "ablate/catchtag.lock", "ablate/catchtag.files"),
    "release": ("release_decoding.csv", "summary.json", "release_decoding.png", "catchtag.lock"),
    "probe": ("scan/*", "scan/*/*", "model_answers.parquet", "probes.parquet", "heads.csv", "selected_heads.md",
              "summary.json", "probe_heatmap.png", "catchtag.lock"),
    "steer": ("steering.parquet", "steering.json", "steering.png", "catchtag.lock"),
    "pca": ("pca_L*H*.png", "pca_L*H*.json", "catchtag.lock"),
    "geometry": ("geometry_pairs.csv", "geometry_tag_vs_token.csv", "geometry.png", "geometry.json", "catchtag.lock"),
    "compare": ("compare_summary.csv", "compare_per_layer.csv", "compare_per_head.csv", "compare.png", "compare.json",
                "catchtag.lock"),
    "sweep": ("sweep.csv", "sweep.png", "sweep.json", "scan-*/*", "scan-*/*/*", "catchtag.lock"),
    "generate": ("run.json", "parts/*.parquet", "prompts.parquet", "steps.parquet", "sinks.parquet", "final.parquet",
                 "summary.json", "sink_timeline.png", "generation.html", "view.html", "scan/*", "scan/*/*",
                 "catchtag.lock", "catchtag.files"),
    "taxonomy": ("taxonomy_tokens_*.csv", "taxonomy_kinds_*.csv", "taxonomy.png", "taxonomy.json", "catchtag.lock"),
}
# What a scan writes into its folder, by top-level name (--overwrite removes these and nothing else).
RUN_ENTRIES = tuple(dict.fromkeys(p.split("/")[0] for p in ARTIFACTS["scan"] if "*" not in p.split("/")[0])) + (
    "ablate",)


def unlisted_files(folder: Path, *jobs: str) -> list[str]:
    """Files under ``folder`` that none of ``jobs`` lists in ARTIFACTS (relative paths): what they must never
    write (a scan's folder may also hold ablate's results: unlisted_files(run, "scan", "ablate"))."""
    import fnmatch

    folder = Path(folder)
    patterns = [pat for job in jobs for pat in ARTIFACTS[job]]
    return sorted(rel for rel in (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
                  if not any(fnmatch.fnmatchcase(rel, pat) and rel.count("/") == pat.count("/") for pat in patterns))
# run.json keys that do not define the run: the same prompts (prompts_sha1) are the same run however the data file
# is spelled and whatever command line asked for it, so these never block a resume.
NOT_COMPARED = ("data", "command")


# ---- atomic writes ---------------------------------------------------------------------------------------------
def _json(obj):
    if isinstance(obj, dict):
        return {str(k): _json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _json(obj.tolist())
    return obj


MANIFEST = "catchtag.files"  # every file catchtag wrote into a run (or an ablate/ folder), one relative path a line
_RECORDING = threading.Lock()
_ROOTS: dict[Path, bool] = {}  # folder -> holds catchtag's run.json (a folder, once a run, stays one)


def _is_run_manifest(path: Path) -> bool:
    """Whether ``path`` is a run.json catchtag wrote (a scan's or an ablation's fingerprint), not a user's file of
    that name."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and ("catchtag" in data or "prompts_sha1" in data)


def _run_root(path: Path) -> Path | None:
    """The run folder ``path`` lies in (the nearest of its three parents holding catchtag's run.json), or None."""
    for parent in list(path.parents)[:3]:
        if parent not in _ROOTS or not _ROOTS[parent]:
            manifest = parent / "run.json"
            _ROOTS[parent] = manifest.is_file() and (manifest == path or _is_run_manifest(manifest))
        if _ROOTS[parent]:
            return parent
    return None


def _record(path: Path) -> None:
    """Add ``path`` to its run's list of files catchtag wrote (what --overwrite may remove)."""
    root = _run_root(path)
    if root is None:
        return
    rel = path.relative_to(root).as_posix()
    with _RECORDING:
        listed = root / MANIFEST
        known = set(listed.read_text().split("\n")) if listed.is_file() else set()
        if rel not in known:
            with open(listed, "a", encoding="utf-8") as f:
                f.write(rel + "\n")


def _atomic(path: Path, write) -> Path:
    """Write a file beside ``path`` and rename it into place, creating the folder; a failed write leaves no half
    file behind (the temporary one is removed); the file joins its run's list of what catchtag wrote."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _record(path)
    return path


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (beside it, then renamed), creating the folder."""
    return _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: dict) -> Path:
    """JSON (numpy numbers and non-finite floats made plain) written atomically."""
    return write_text(path, json.dumps(_json(data), indent=1, ensure_ascii=False))


def write_table(table, path: Path) -> Path:
    """A DataFrame or Arrow table to parquet, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(tmp):
        if isinstance(table, pa.Table):
            pq.write_table(table, tmp)
        else:
            table.to_parquet(tmp, index=False)

    return _atomic(path, write)


def write_csv(df: pd.DataFrame, path: Path, **kwargs) -> Path:
    """A DataFrame as CSV, atomically (kwargs as for DataFrame.to_csv; the index is left out)."""
    return write_text(path, df.to_csv(index=False, **kwargs))


def write_arrays(arrays: dict, path: Path) -> Path:
    return _atomic(path, lambda tmp: np.savez(tmp, **arrays))


def save_figure_file(fig, path: Path, dpi: int | None = None) -> Path:
    """A matplotlib figure as PNG (at its own resolution unless ``dpi`` says otherwise), atomically."""
    return _atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi or fig.dpi, format="png"))


def versions() -> dict:
    """The versions a run was made with (summary.json, the report)."""
    import platform

    import torch
    import transformers

    from catchtag import __version__

    return {"catchtag": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


# ---- the fingerprint -------------------------------------------------------------------------------------------
def prompts_sha1(prompts) -> str:
    """The prompts' identity by content (their token ids): the same prompts however the data was named."""
    return hashlib.sha1(json.dumps([p.input_ids for p in prompts]).encode()).hexdigest()


def fingerprint(model_name, data_name, settings, prompts, dtype, request, command: str | None = None) -> dict:
    """What makes two scans the same run: by content (the prompts' token ids), not by how the inputs were named."""
    digest = prompts_sha1(prompts)
    return {"catchtag": "scan", "model": model_name, "data": data_name, "eps": settings.eps,
            "min_rows": settings.min_rows,
            "sweep_eps": list(settings.all_eps) if settings.sweep_eps else [], "dtype": str(dtype),
            "n_prompts": len(prompts), "prompts_sha1": digest,
            "request": None if request is None else repr((request.layers, request.heads, request.positions,
                                                         request.space, tuple(request.hidden_states),
                                                         tuple(request.attention_maps), request.sink_attention)),
            "command": command or cli_command()}


def cli_command() -> str | None:
    """The command line that is running, when it is catchtag's CLI (for repair hints)."""
    prog = Path(sys.argv[0]) if sys.argv else Path("")
    if (prog.name == "catchtag" or prog.parts[-2:] == ("catchtag", "__main__.py")) and len(sys.argv) > 1:
        return " ".join(shlex.quote(a) for a in ["catchtag", *sys.argv[1:]])
    return None


# ---- one writer at a time -------------------------------------------------------------------------------------
def _is_lock(name: str) -> bool:
    """A writer lock of catchtag's (catchtag.lock, catchtag-r<rank>.lock)."""
    import re

    return re.fullmatch(r"catchtag(-r\d+)?\.lock", name) is not None


class WriterLock:
    """An exclusive lock on a run folder (``catchtag.lock`` in it, one per rank under torchrun), held while a job
    writes there: a second process that would write the same run stops at once with one line instead of doubling
    its rows. The operating system releases it when the process ends, however it ends (a kill included)."""

    def __init__(self, folder: Path, what: str = "run", rank: int = 0):
        import fcntl

        self.made = [p for p in (folder, *folder.parents) if not p.exists()]  # folders this lock creates
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / ("catchtag.lock" if rank == 0 else f"catchtag-r{rank}.lock")
        self.new_file = not self.path.exists()
        for _ in range(3):
            self._file = open(self.path, "a")  # never written to: the lock is the file's, not its content's
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._file.close()
                raise CatchtagError(f"{folder} is being written by another catchtag process (a {what} with the same "
                                    f"--out is running). Fix: wait for it to finish, or choose another --out") \
                    from None
            if self._holds_the_path():
                return
            self._file.close()  # the last holder removed the file as it finished (release(remove=True)): again
        raise CatchtagError(f"{folder} keeps changing writers. Fix: wait for the other catchtag processes to finish")

    def _holds_the_path(self) -> bool:
        """The locked file is still the one at the path (not one a finishing writer has just removed)."""
        try:
            return os.fstat(self._file.fileno()).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def release(self, undo: bool = False, remove: bool = False) -> None:
        """Release the lock; ``remove``: also remove the lock file when this lock created it (a job's output folder
        is left as the job wrote it; a later writer that opened the old file sees it is gone and locks a new one);
        ``undo`` (the job failed before writing anything): also remove the lock file and the folders this lock
        created, where they are empty, so a refused command leaves nothing behind."""
        if remove and self.new_file and not self._file.closed:  # a lock file that was there before stays
            self.path.unlink(missing_ok=True)  # while still held: nobody can take it between the two steps
        if not self._file.closed:
            self._file.close()  # closing the file releases the lock
        if undo:
            if self.new_file:
                self.path.unlink(missing_ok=True)
            for folder in self.made:  # innermost first
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()


# ---- the folder --------------------------------------------------------------------------------------------------
def check_overwrite(folder: Path) -> bool:
    """Refuse (CatchtagError) an --overwrite that would remove what is not a scan's: a folder that is not a catchtag
    run, one that also holds files a scan did not write, one holding ablate's results. True: there is a run whose
    listed files can go; False: nothing to remove (no folder, or an empty one). Cheap: the CLI calls it before the
    model loads, RunFolder again before removing anything."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    manifest = folder / "run.json"
    if not manifest.is_file() or not _is_run_manifest(manifest):
        if any(not _is_lock(p.name) for p in folder.iterdir()):
            what = "no run.json" if not manifest.is_file() else "its run.json is not one catchtag wrote"
            raise CatchtagError(f"--overwrite refused: {folder} is not a catchtag run ({what}), so nothing "
                                f"in it was removed. Fix: choose an empty or new --out")
        return False
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in RUN_ENTRIES and not _is_lock(p.name))
    if foreign:
        raise CatchtagError(f"--overwrite refused: {folder} also holds files a scan did not write "
                            f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}), so nothing was "
                            f"removed. Fix: move them away, or choose another --out")
    if (folder / "ablate").exists():
        raise CatchtagError(f"--overwrite refused: {folder} also holds catchtag ablate's results (ablate/), "
                            f"made on the run being replaced; nothing was removed. Fix: move "
                            f"{folder / 'ablate'} away (or delete it), then --overwrite")
    return True


class RunFolder:
    """A scan's folder (the layout in the module docstring). Opening one checks it: a folder holding another run, or
    something that is not a run, is refused; a resumed run drops batches whose files do not read back."""

    def __init__(self, folder: str | Path, fingerprint: dict, overwrite: bool = False, dist: Dist = Dist()):
        self.folder = Path(folder)
        self.parts = self.folder / "parts"
        self.rank = dist.rank
        manifest = self.folder / "run.json"
        if self.folder.exists() and not self.folder.is_dir():
            raise CatchtagError(f"--out {self.folder} is a file, not a folder. Fix: choose a folder for the run")
        self.lock = WriterLock(self.folder, "scan", self.rank)
        try:
            self._open(manifest, fingerprint, overwrite, dist)
        except BaseException:  # refused or failed: leave nothing behind that this scan made
            self.lock.release(undo=True)
            raise

    def close(self) -> None:
        """The scan is done writing: release the folder for the next writer."""
        self.lock.release()

    def _open(self, manifest: Path, fingerprint: dict, overwrite: bool, dist: Dist) -> None:
        if dist.is_main:  # one rank checks and prepares the folder; the others check after the barrier
            discarded = False
            if overwrite and self.folder.is_dir():  # a file given as --out is refused by _check
                self._discard()
                discarded = True  # what is left (the user's files in figures/, parts/, ...) is not a reason to refuse
            self._check(manifest, fingerprint, discarded)
            self.parts.mkdir(parents=True, exist_ok=True)
            if manifest.is_file():  # keep the first command line: it is the one that repairs the run
                fingerprint = {**fingerprint, "command": json.loads(manifest.read_text()).get("command")
                               or fingerprint.get("command")}
            write_json(manifest, fingerprint)
            for stale in self.parts.glob("*.tmp*"):
                stale.unlink()
            self._drop_broken_batches()
        dist.barrier()
        if not dist.is_main:
            self._check(manifest, fingerprint)

    def _discard(self) -> None:
        """--overwrite: remove the files this run's list says catchtag wrote (catchtag.files), and nothing else: a
        folder that is not a catchtag run (no run.json that catchtag wrote), one that holds files of its own beside
        the run's, or one that holds another job's results (ablate/) is refused and left as it is; a file of the
        user's inside figures/, views/ or parts/ stays, with its folder."""
        if not check_overwrite(self.folder):
            return
        listed = self.folder / MANIFEST
        if listed.is_file():
            names = [n for n in listed.read_text(encoding="utf-8").split("\n") if n]
        else:  # a run made before catchtag kept the list: the files a scan writes, by their names
            names = [p.relative_to(self.folder).as_posix() for name in RUN_ENTRIES
                     for p in ([self.folder / name] if (self.folder / name).is_file() else
                               (self.folder / name).rglob("*") if (self.folder / name).is_dir() else [])
                     if p.is_file() and not _is_lock(p.name)]
        for rel in names:
            path = self.folder / rel
            if path.is_file() and not path.is_symlink() and self.folder in path.resolve().parents:
                path.unlink()
        for name in RUN_ENTRIES:  # folders left empty go too; a folder that still holds a file of the user's stays
            path = self.folder / name
            if path.is_dir() and not path.is_symlink():
                for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    if not any(sub.iterdir()):
                        sub.rmdir()
                if not any(path.iterdir()):
                    path.rmdir()
        listed.unlink(missing_ok=True)
        _ROOTS.pop(self.folder, None)

    def _check(self, manifest: Path, fingerprint: dict, discarded: bool = False) -> None:
        if self.folder.exists() and not self.folder.is_dir():
            raise CatchtagError(f"--out {self.folder} is a file, not a folder. Fix: choose a folder for the run")
        if manifest.is_file():
            try:
                old = json.loads(manifest.read_text())
            except (ValueError, UnicodeDecodeError):
                raise CatchtagError(f"{manifest} is corrupt. Fix: --overwrite to start the run again, or another "
                                    f"--out") from None
            old = {k: v for k, v in old.items() if k not in NOT_COMPARED}
            new = {k: v for k, v in fingerprint.items() if k not in NOT_COMPARED}
            if old != new:
                changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise CatchtagError(f"{self.folder} holds a run with other settings ({', '.join(changed)} differ). "
                                    f"Fix: use another --out, or --overwrite to start it again")
        elif self.folder.exists() and not discarded and any(not _is_lock(p.name) for p in self.folder.iterdir()):
            raise CatchtagError(f"{self.folder} exists and is not a catchtag run. Fix: choose an empty or new --out")

    # ---- batches -------------------------------------------------------------------------------------------
    def part_files(self, kind: str) -> list[Path]:
        """Finished part files of every rank (names: KIND-r<rank>-<n>.parquet)."""
        return sorted(f for f in self.parts.glob(f"{kind}-*.parquet") if ".tmp" not in f.name)

    def _batches(self) -> list[str]:
        return [f.name[len("prompts-"):-len(".parquet")] for f in self.part_files("prompts")]

    def _batch_files(self, tag: str) -> list[Path]:
        return [p for p in (self.parts / f"{k}-{tag}.{ext}" for k, ext in
                            (("heads", "parquet"), ("sweep", "parquet"), ("acts", "npz"), ("prompts", "parquet")))
                if p.exists()]

    def _drop_broken_batches(self) -> None:
        """A batch with a file that does not read back (a disk error, a copy cut short) is removed, files and all
        (the scan wrote them), so that resuming redoes its prompts."""
        for tag in self._batches():
            files = self._batch_files(tag)
            bad = [f for f in files if not _readable(f)]
            if not (self.parts / f"heads-{tag}.parquet").exists():
                bad.append(self.parts / f"heads-{tag}.parquet")
            if bad:
                import warnings

                warnings.warn(f"{bad[0]} is broken or missing: that batch will be scanned again", stacklevel=2)
                for f in files:
                    f.unlink()

    def done_ids(self) -> set[int]:
        done: set[int] = set()
        for f in self.part_files("prompts"):
            done.update(pd.read_parquet(f, columns=["prompt_id"])["prompt_id"].tolist())
        return done

    def elapsed(self) -> float:
        return float(sum(pd.read_parquet(f, columns=["seconds"])["seconds"].iloc[0]
                         for f in self.part_files("prompts")))

    def write_part(self, heads, sweep, prompts: pd.DataFrame, acts: dict | None):
        """Write one batch's rows; the prompts file goes last, so a batch counts as done only when complete."""
        n = 0
        while (self.parts / f"prompts-r{self.rank}-{n:05d}.parquet").exists():
            n += 1
        tag = f"r{self.rank}-{n:05d}"
        write_table(heads, self.parts / f"heads-{tag}.parquet")
        if sweep is not None:
            write_table(sweep, self.parts / f"sweep-{tag}.parquet")
        if acts:
            write_arrays(acts, self.parts / f"acts-{tag}.npz")
        write_table(prompts, self.parts / f"prompts-{tag}.parquet")

    def read_parts(self):
        """(heads, prompts, sweep or None, [per-batch activation dicts]) from every finished batch."""
        return read_parts(self.folder)


class PhaseParts:
    """The resumable folder of a job that works batch by batch in phases (ablate: the attribution of every head,
    then the ablations): FOLDER/run.json holds the job's settings and a folder holding other settings is refused;
    each finished batch of a phase is one table per kind in FOLDER/parts (KIND-<n>.parquet, written atomically), and
    a batch counts as done only when every table of its phase is there and reads back, so an interruption at any
    point loses at most the batch that was running and never doubles a row."""

    def __init__(self, folder: Path, manifest: dict, what: str = "a run"):
        self.folder = Path(folder)
        self.parts = self.folder / "parts"
        run_json = self.folder / "run.json"
        if run_json.is_file():
            try:
                old = json.loads(run_json.read_text())
            except (ValueError, UnicodeDecodeError):
                raise CatchtagError(f"{run_json} is corrupt. Fix: move {self.folder} away and run again") from None
            if old != _json(manifest):
                changed = sorted(k for k in set(old) | set(manifest) if old.get(k) != _json(manifest).get(k))
                raise CatchtagError(f"{self.folder} holds {what} with other settings ({', '.join(changed)} differ). "
                                    f"Fix: another --out, or move it away")
        write_json(run_json, manifest)

    def run(self, kinds, batches: list, compute, desc: str, progress: bool = True):
        """compute(batch) -> a table per kind for each batch not yet done; the tables of all batches, concatenated
        (one table when ``kinds`` is one name, else a tuple in the order of ``kinds``)."""
        from catchtag.progress import progress_bar

        single = isinstance(kinds, str)
        kinds = (kinds,) if single else tuple(kinds)
        bar = progress_bar(total=len(batches), desc=desc, unit="batch", disable=not progress)
        for k, batch in enumerate(batches):
            paths = [self.parts / f"{kind}-{k:05d}.parquet" for kind in kinds]
            if not all(p.is_file() and _readable(p) for p in paths):
                tables = compute(batch)
                for table, path in zip((tables,) if single else tables, paths):
                    write_table(table, path)
            bar.update(1)
        bar.close()
        tables = tuple(pd.concat([pd.read_parquet(self.parts / f"{kind}-{k:05d}.parquet") for k in range(len(batches))],
                                 ignore_index=True) for kind in kinds)
        return tables[0] if single else tables


def _readable(path: Path) -> bool:
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.read_metadata(path)
        else:
            with zipfile.ZipFile(path) as z:
                return z.testzip() is None
        return True
    except Exception:  # noqa: BLE001 - any failure to read back is a broken file
        return False


def repair_command(folder: Path) -> str:
    """How to finish or repair the run in ``folder``: "run `<the command that made it>` again", or, when that is not
    recorded (a scan started from Python), the same in words."""
    manifest = Path(folder) / "run.json"
    try:
        command = json.loads(manifest.read_text()).get("command") if manifest.is_file() else None
    except ValueError:
        command = None
    if command:
        return f"run `{_with_out(command, folder)}` again"
    return f"run the scan that made it again, with the same arguments and --out {folder}"


def _with_out(command: str, folder: Path) -> str:
    """The recorded command with its --out naming where the run is now (it may have been moved since)."""
    try:
        args = shlex.split(command)
    except ValueError:
        return command
    for i, arg in enumerate(args):
        if arg in ("--out", "-o") and i + 1 < len(args):
            args[i + 1] = str(folder)
        elif arg.startswith("--out="):
            args[i] = f"--out={folder}"
    return " ".join(shlex.quote(a) for a in args)


def read_parts(folder: Path):
    parts = Path(folder) / "parts"

    def read(path: Path):
        try:
            return pd.read_parquet(path) if path.suffix == ".parquet" else dict(np.load(path))
        except Exception as exc:  # noqa: BLE001
            raise CatchtagError(f"{path} is broken ({type(exc).__name__}). Fix: {repair_command(folder)}: it redoes "
                                f"that batch") from None

    done = [f.name[len("prompts-"):-len(".parquet")] for f in sorted(parts.glob("prompts-*.parquet"))
            if ".tmp" not in f.name]
    missing = [parts / f"heads-{t}.parquet" for t in done if not (parts / f"heads-{t}.parquet").exists()]
    if missing:
        raise CatchtagError(f"{missing[0]} is missing. Fix: {repair_command(folder)}: it redoes that batch")
    if not done:
        raise CatchtagError(f"{folder} has no finished batch. Fix: {repair_command(folder)}")
    heads = pd.concat([read(parts / f"heads-{t}.parquet") for t in done], ignore_index=True)
    prompts = pd.concat([read(parts / f"prompts-{t}.parquet") for t in done], ignore_index=True)
    sweeps = [parts / f"sweep-{t}.parquet" for t in done if (parts / f"sweep-{t}.parquet").exists()]
    sweep = pd.concat([read(f) for f in sweeps], ignore_index=True) if sweeps else None
    acts = [read(parts / f"acts-{t}.npz") for t in done if (parts / f"acts-{t}.npz").exists()]
    return heads, prompts, sweep, acts


# ---- per-token arrays in files -----------------------------------------------------------------------------------
def cache_to_arrays(cache: ActivationCache) -> dict[str, np.ndarray]:
    """An ActivationCache as flat npz entries (see cache_from_batches for the names)."""
    out: dict[str, np.ndarray] = dict(cache.arrays)
    if cache.positions is not None:
        out["positions"] = cache.positions
    if cache.arrays or cache.resid_pre:
        out["layers"] = np.asarray(cache.layers, dtype=np.int64)
        out["heads"] = np.asarray(cache.heads, dtype=np.int64)
    out["prompt_id"] = np.asarray(cache.prompt_ids, dtype=np.int64)
    for layer, arr in cache.resid_pre.items():
        out[f"resid_pre_{layer}"] = arr
    for kind in ("pattern", "sink_attention"):
        for (pid, layer, head), arr in getattr(cache, kind).items():
            out[f"{kind}_{pid}_{layer}_{head}"] = arr
    return out


def cache_from_batches(parts: list[dict], heads: list[int] | None = None) -> ActivationCache:
    """Per-batch npz entries -> one ActivationCache in prompt_id order (positions padded with -1 to a common
    length). Entries: the per-head arrays by name (B, n_layers, n_heads, P, dim), positions (B, P), layers, heads,
    prompt_id (B,), resid_pre_<layer> (B, P, d_model), pattern_<pid>_<layer>_<head>, sink_attention_<...>."""
    cache = ActivationCache()
    if not parts:
        return cache
    order = np.concatenate([p["prompt_id"] for p in parts])
    sort = np.argsort(order, kind="stable")
    cache.prompt_ids = [int(x) for x in order[sort]]

    def stack(key, pad_axis):
        arrays = [p[key] for p in parts]
        width = max(a.shape[pad_axis] for a in arrays)
        padded = []
        for a in arrays:
            pad = [(0, 0)] * a.ndim
            pad[pad_axis] = (0, width - a.shape[pad_axis])
            padded.append(np.pad(a, pad, constant_values=-1 if key == "positions" else 0))
        return np.concatenate(padded, axis=0)[sort]

    for key in parts[0]:
        if key in ("prompt_id", "layers", "heads"):
            continue
        if key.startswith(("pattern_", "sink_attention_")):
            continue
        if key == "positions":
            cache.positions = stack(key, 1)
        elif key.startswith("resid_pre_"):
            cache.resid_pre[int(key.rsplit("_", 1)[1])] = stack(key, 1)
        else:
            cache.arrays[key] = stack(key, 3)
    for part in parts:
        for key, arr in part.items():
            for kind in ("pattern", "sink_attention"):
                if key.startswith(kind + "_"):
                    pid, layer, head = (int(x) for x in key[len(kind) + 1:].split("_"))
                    getattr(cache, kind)[(pid, layer, head)] = arr
    if "layers" in parts[0]:
        cache.layers = [int(x) for x in parts[0]["layers"]]
    if "heads" in parts[0]:
        cache.heads = [int(x) for x in parts[0]["heads"]]
    elif heads is not None:
        cache.heads = list(heads)
    return cache


# ---- whole results -----------------------------------------------------------------------------------------------
def save_result(result, folder: str | Path) -> Path:
    """Write a ScanResult's tables (and per-token arrays, when it has them and the folder has no parts of its own)
    into ``folder``, each file atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_table(result.heads, folder / "heads.parquet")
    write_table(result.prompts, folder / "prompts.parquet")
    if result.sweep is not None:
        write_table(result.sweep, folder / "sweep.parquet")
    if result.cache and not any((folder / "parts").glob("acts-*.npz")):
        write_arrays(cache_to_arrays(result.cache), folder / "activations.npz")
    summary = folder / "summary.json"
    if not summary.is_file():  # a job writes the full summary; a bare save keeps the settings with the tables
        write_json(summary, {"settings": result.settings})  # (result.summary() would cost as much as a batch)
    return folder


def read_run(folder: str | Path) -> dict:
    """Everything a run folder holds, as ScanResult's fields (heads, prompts, settings, sweep, cache):
    ``ScanResult.load`` is ScanResult(**read_run(folder))."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CatchtagError(f"{folder} is not a folder. Fix: give a run folder written by `catchtag scan --out`")
    heads_file = folder / "heads.parquet"
    if not heads_file.is_file():
        if (folder / "run.json").is_file():
            raise CatchtagError(f"{folder} is not a finished catchtag run: it was started but has no heads.parquet. "
                                f"Fix: {repair_command(folder)} to finish it")
        raise CatchtagError(f"{folder} is not a finished catchtag run (no heads.parquet). Run `catchtag scan "
                            f"--out {folder}` first")

    def read(path: Path):
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # noqa: BLE001
            fix = (f"{repair_command(folder)}: it rebuilds the tables from the saved batches"
                   if (folder / "parts").is_dir() else "rescan into a new folder")
            raise CatchtagError(f"{path} is broken ({type(exc).__name__}). Fix: {fix}") from None

    settings = {}
    summary_file = folder / "summary.json"
    if summary_file.is_file():
        try:
            settings = json.loads(summary_file.read_text()).get("settings", {})
        except ValueError:
            raise CatchtagError(f"{summary_file} is broken. Fix: {repair_command(folder)}") from None
    elif (folder / "run.json").is_file():
        settings = {k: v for k, v in json.loads((folder / "run.json").read_text()).items()
                    if k in ("model", "data", "eps", "min_rows", "sweep_eps")}
    sweep = read(folder / "sweep.parquet") if (folder / "sweep.parquet").is_file() else None
    cache = ActivationCache()
    if (folder / "activations.npz").is_file():
        cache = cache_from_batches([dict(np.load(folder / "activations.npz"))])
    elif any((folder / "parts").glob("acts-*.npz")):
        cache = cache_from_batches(read_parts(folder)[3])
    return {"heads": read(heads_file), "prompts": read(folder / "prompts.parquet"), "settings": settings,
            "sweep": sweep, "cache": cache}


# ---- per-token pictures of one prompt (views/) --------------------------------------------------------------------
def write_record(obj, folder: Path, name: str) -> None:
    """A dataclass of arrays, tables and plain values as NAME.npz (arrays), NAME.FIELD.parquet (tables) and NAME.json
    (the rest), each atomically; the json goes last, so a record is there only when complete."""
    import dataclasses

    folder = Path(folder)
    plain, arrays, tables = {}, {}, []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, np.ndarray):
            arrays[f.name] = value
        elif isinstance(value, pd.DataFrame):
            write_table(value, folder / f"{name}.{f.name}.parquet")
            tables.append(f.name)
        else:
            plain[f.name] = value
    if arrays:
        write_arrays(arrays, folder / f"{name}.npz")
    write_json(folder / f"{name}.json", {"fields": plain, "arrays": sorted(arrays), "tables": tables})


def read_record(cls, folder: Path, name: str):
    """The dataclass ``cls`` written by write_record, or None when the folder has no such record."""
    folder = Path(folder)
    head = folder / f"{name}.json"
    if not head.is_file():
        return None
    try:
        import dataclasses

        meta = json.loads(head.read_text())
        values = dict(meta["fields"])
        for f in dataclasses.fields(cls):  # JSON keeps no nan: write_json wrote it as null
            if f.type in ("float", float) and f.name in values and values[f.name] is None:
                values[f.name] = float("nan")
        if meta["arrays"]:
            with np.load(folder / f"{name}.npz") as z:
                values.update({k: z[k] for k in meta["arrays"]})
        for t in meta["tables"]:
            values[t] = pd.read_parquet(folder / f"{name}.{t}.parquet")
        return cls(**values)
    except Exception as exc:  # noqa: BLE001
        raise CatchtagError(f"{head.parent / name}.* is broken ({type(exc).__name__}). Fix: "
                            f"{repair_command(folder.parent)}: it writes the per-token pictures again") from None

