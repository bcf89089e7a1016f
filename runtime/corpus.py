"""`pianolm corpus`: transcribe a whole collection on Ray Data, resumable (the scale extra).

    list inputs -> read + resample (Ray CPU tasks) -> transcribe (a pool of actors, each opening
    the model once; segments of the files in one call share decoder batches) -> MIDI written
    atomically by the actor -> one results row per input, merged into OUT/results.parquet

Re-running skips every input whose MIDI exists and whose row says ok with the same model
(manifest sha256); --retry also re-runs the failed ones. A bad file is a failed row with its
one-line error, never a crashed job. The rows are flushed to results.parquet every few seconds,
so a killed run loses at most those seconds' rows (their MIDI files are whole; a re-run redoes
them). Without --ray-address a local Ray starts on this machine. docs/scale-out.md: clusters.
"""

from __future__ import annotations

import math
import os
import re
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .manifest import MANIFEST_FILE, model_sha256
from .sustain import SOUNDING

RESULTS = "results.parquet"
COLUMNS = ("path", "status", "error", "audio_s", "notes", "wall_s", "actor", "model_sha256")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
DEFAULT_GLOB = "**/*.{wav,flac,ogg,mp3}"
FLUSH_EVERY_S = 5.0
READ_CPUS = 0.5  # per read task


class CorpusError(Exception):
    """A usage error (missing input folder, unreadable list, ...): one line, exit 2."""


@dataclass(frozen=True)
class CorpusConfig:
    """What the actors need to transcribe and write (CLI flags of `pianolm corpus`)."""

    out_dir: str
    model: str | None = None
    backend: str = "cpu"
    batch: int = 4  # decoder rows per batch inside an actor
    threads: int = 1  # CPU threads per actor (ONNX Runtime intra-op)
    decoder: str | None = None
    notes: str | None = None  # also write the notes table: tsv | json
    sustain: str = SOUNDING  # note offsets (runtime/sustain.py OFFSETS)


# ---------------------------------------------------------------------------------------------
# Inputs and the results table (driver side)


def expand_braces(pattern: str) -> list[str]:
    """'**/*.{wav,flac}' -> ['**/*.wav', '**/*.flac'] (pathlib's glob has no braces)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [p for alt in m.group(1).split(",") for p in expand_braces(head + alt + tail)]


def list_inputs(source: str, pattern: str = DEFAULT_GLOB) -> tuple[Path, list[str]]:
    """(root, relative paths): every file under a folder matching the glob, or the paths of a
    text list (one per line) or Parquet list (a `path` column), relative to the list's folder."""
    src = Path(source)
    if src.is_dir():
        found = {p.relative_to(src).as_posix() for g in expand_braces(pattern)
                 for p in src.glob(g) if p.is_file()}
        return src, sorted(found)
    if not src.is_file():
        raise CorpusError(f"{source}: no such folder or list of paths")
    if src.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            paths = [str(p) for p in pq.read_table(src, columns=["path"])["path"].to_pylist()]
        except Exception as e:
            raise CorpusError(f"{source}: cannot read a `path` column ({e})") from None
    else:
        paths = [line.strip() for line in src.read_text().splitlines() if line.strip()]
    return src.parent, sorted(dict.fromkeys(paths))


def read_results(out_dir: Path) -> dict[str, dict]:
    """The rows of an earlier run, by input path (empty if none)."""
    path = out_dir / RESULTS
    if not path.is_file():
        return {}
    import pyarrow.parquet as pq

    return {row["path"]: row for row in pq.read_table(path).to_pylist()}


def write_results(out_dir: Path, rows: dict[str, dict]) -> None:
    """All rows, sorted by path, written atomically (a temp file, then rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{c: rows[p].get(c) for c in COLUMNS} for p in sorted(rows)],
                                 schema=pa.schema([("path", pa.string()), ("status", pa.string()),
                                                   ("error", pa.string()),
                                                   ("audio_s", pa.float64()),
                                                   ("notes", pa.int64()), ("wall_s", pa.float64()),
                                                   ("actor", pa.string()),
                                                   ("model_sha256", pa.string())]))
    tmp = out_dir / f".{RESULTS}.{os.getpid()}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, out_dir / RESULTS)


def output_path(out_dir: str | Path, rel: str) -> Path:
    """OUT/<the input's relative path>.mid: the output mirrors the input's layout."""
    return Path(out_dir) / Path(rel).with_suffix(".mid")


def corpus_model_sha256(model: str | None) -> str:
    """The sha256 results rows are keyed on: --model's, or the shipped model's."""
    from .transcriber import default_model_dir

    folder = Path(model) if model else default_model_dir()
    if not (folder / MANIFEST_FILE).is_file():
        raise CorpusError(f"{folder}: not a model folder (no {MANIFEST_FILE})")
    return model_sha256(folder)


def plan(rels: list[str], out_dir: Path, previous: dict[str, dict], sha: str, retry: bool
         ) -> tuple[list[str], list[str]]:
    """(to do, skipped): an input is skipped when its MIDI exists and its row says ok with this
    model, or (without --retry) when it failed with this model before."""
    todo, skipped = [], []
    for rel in rels:
        row = previous.get(rel)
        same = row is not None and row.get("model_sha256") == sha
        done = same and row["status"] == "ok" and output_path(out_dir, rel).is_file()
        failed_before = same and row["status"] == "failed" and not retry
        (skipped if done or failed_before else todo).append(rel)
    return todo, skipped


# ---------------------------------------------------------------------------------------------
# The pipeline's stages (Ray workers)


def read_task(row: dict, root: str) -> dict:
    """Ray CPU task: decode and resample one file (decoding never blocks an actor)."""
    from .audio import SAMPLE_RATE, AudioError, load_audio

    t0 = time.perf_counter()
    try:
        audio = load_audio(os.path.join(root, row["path"]))
        return {**row, "audio": audio, "rate": SAMPLE_RATE, "error": "",
                "read_s": time.perf_counter() - t0}
    except AudioError as e:
        return {**row, "audio": np.zeros(0, np.float32), "rate": SAMPLE_RATE,
                "error": str(e).replace(root.rstrip("/") + "/", ""),
                "read_s": time.perf_counter() - t0}


class TranscribeActor:
    """Ray actor: one Transcriber, opened once; each call transcribes a batch of files."""

    def __init__(self, config: CorpusConfig, sha: str) -> None:
        from .transcriber import Transcriber

        self.config = config
        self.sha = sha
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.transcriber = Transcriber(config.model, backend=config.backend, batch=config.batch,
                                       threads=config.threads, decoder=config.decoder,
                                       sustain=config.sustain)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from .transcriber import Failure

        t0 = time.perf_counter()
        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["path"]))]
        good = [r for r in rows if not r["error"]]
        results = self.transcriber.transcribe_many(
            [(np.asarray(r["audio"], np.float32), int(r["rate"])) for r in good], keep_going=True)
        out = {r["path"]: self._row(r, "failed", r["error"]) for r in rows if r["error"]}
        for row, result in zip(good, results):
            if isinstance(result, Failure):
                out[row["path"]] = self._row(row, "failed", result.error.replace("<array>",
                                                                               row["path"]))
                continue
            try:
                self._write(row["path"], result)
                out[row["path"]] = self._row(row, "ok", "", result.duration_s,
                                             len(result.notes))
            except OSError as e:
                out[row["path"]] = self._row(row, "failed", f"{row['path']}: cannot write "
                                                            f"its output ({e.strerror or e})")
        wall = (time.perf_counter() - t0) / max(len(rows), 1)
        ordered = [out[r["path"]] for r in rows]
        for r, src in zip(ordered, rows):
            r["wall_s"] = wall + float(src["read_s"])
        return {c: [r[c] for r in ordered] for c in COLUMNS}

    def _write(self, rel: str, result) -> None:
        midi = output_path(self.config.out_dir, rel)
        midi.parent.mkdir(parents=True, exist_ok=True)
        if self.config.notes:
            result.write_notes(midi.with_suffix(f".{self.config.notes}"), self.config.notes)
        result.write_midi(midi)  # last: its presence means the input is done

    def _row(self, row: dict, status: str, error: str, audio_s: float | None = None,
             notes: int | None = None) -> dict:
        return {"path": row["path"], "status": status, "error": error,
                "audio_s": audio_s if audio_s is not None else float(len(row["audio"])) / 16000,
                "notes": notes if notes is not None else 0, "wall_s": 0.0, "actor": self.name,
                "model_sha256": self.sha}


# ---------------------------------------------------------------------------------------------
# The run (driver side)


@dataclass
class Summary:
    ok: int
    failed: int
    skipped: int
    failed_before: int  # of the skipped: inputs that failed in an earlier run (--retry)
    audio_s: float
    wall_s: float

    def format(self) -> str:
        rate = self.audio_s / self.wall_s if self.wall_s > 0 else 0.0
        before = (f" ({self.failed_before} failed before: --retry runs them again)"
                  if self.failed_before else "")
        return (f"{self.ok} ok, {self.failed} failed, {self.skipped} skipped{before}; "
                f"{self.audio_s / 3600:.3f} h of audio in {self.wall_s:.1f} s "
                f"({rate:.2f} audio s per s, real-time factor "
                f"{self.wall_s / self.audio_s if self.audio_s else 0:.3f})")


def start_ray(address: str | None, need: dict[str, float] | None = None) -> None:
    """Join `address`, or start a local Ray sized to this machine (and to `need`, what the run's
    actors and read tasks take: resources(), so a setting that asks for more threads than the
    machine has cores still runs, oversubscribed as asked): no dashboard, and only its errors
    on our stderr (the CLI prints one line per failed input and a summary). A Ray that cannot
    hold `need` at once is a one-line CorpusError, not a pipeline that waits forever."""
    import logging

    import ray

    need = need or {}
    if not ray.is_initialized():
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
        kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        if address:
            _reachable(address)
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(need.get("CPU", 0))), **kwargs)
    have = ray.cluster_resources()
    short = [f"{amount:g} {name}" for name, amount in need.items() if have.get(name, 0) < amount]
    if short:
        raise CorpusError(f"the actors and their read tasks need {' and '.join(short)} at once; "
                          f"this Ray has {', '.join(f'{have.get(n, 0):g} {n}' for n in need)} "
                          f"(use fewer --actors or --threads-per-actor)")


def resources(actors: int, threads: int, gpu: bool) -> dict[str, float]:
    """What a run holds at once: each actor its threads (and a GPU with a GPU backend), plus
    one read task. Every actor holds its CPUs while it waits for audio, so without room for a
    read task beside them nothing would ever reach them."""
    need = {"CPU": actors * threads + READ_CPUS}
    return {**need, "GPU": float(actors)} if gpu else need


def _reachable(address: str, timeout_s: float = 10.0) -> None:
    """A HOST:PORT that nothing answers on is one line now (Ray itself retries for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise CorpusError(f"--ray-address {address}: no Ray cluster answers there "
                          f"({e.strerror or e})") from None


def run_corpus(source: str, config: CorpusConfig, *, glob: str = DEFAULT_GLOB,
               actors: int = 1, ray_address: str | None = None, retry: bool = False,
               on_plan: Callable[[int, int], None] | None = None,
               on_row: Callable[[dict], None] | None = None) -> Summary:
    """Transcribe every input of `source` (a folder or a list) into config.out_dir.
    on_plan(to do, skipped) once the inputs are listed; on_row(row) as each one finishes."""
    root, rels = list_inputs(source, glob)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sha = corpus_model_sha256(config.model)
    rows = read_results(out_dir)
    todo, skipped = plan(rels, out_dir, rows, sha, retry)
    if on_plan:
        on_plan(len(todo), len(skipped))
    t0 = time.perf_counter()
    counts = {"ok": 0, "failed": 0, "audio_s": 0.0}
    if todo:
        last_flush = time.perf_counter()
        for row in _pipeline(todo, str(root), config, sha, actors, ray_address):
            rows[row["path"]] = row
            counts[row["status"]] += 1
            counts["audio_s"] += row["audio_s"] if row["status"] == "ok" else 0.0
            if on_row:
                on_row(row)
            if time.perf_counter() - last_flush > FLUSH_EVERY_S:
                write_results(out_dir, rows)
                last_flush = time.perf_counter()
    write_results(out_dir, rows)
    failed_before = sum(rows[rel]["status"] == "failed" for rel in skipped)
    return Summary(counts["ok"], counts["failed"], len(skipped), failed_before,
                   counts["audio_s"], time.perf_counter() - t0)


def _pipeline(todo: list[str], root: str, config: CorpusConfig, sha: str, actors: int,
              ray_address: str | None) -> Iterator[dict]:
    """The Ray Data pipeline over the inputs to do; yields each input's results row."""
    import ray.data

    start_ray(ray_address, resources(actors, config.threads, config.backend != "cpu"))
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the CLI draws its own (files, audio hours)
    context.print_on_execution_start = False
    gpu = {"num_gpus": 1} if config.backend != "cpu" else {}
    blocks = min(len(todo), 200)
    warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
    dataset = (ray.data.from_items([{"path": rel} for rel in todo], override_num_blocks=blocks)
               # its own (fractional) CPUs keep reading a separate task, not fused into an actor
               .map(read_task, fn_kwargs={"root": root}, num_cpus=READ_CPUS)
               .map_batches(_bound_actor(config, sha), batch_size=max(2, config.batch),
                            batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=actors),
                            num_cpus=config.threads, **_no_restarts(), **gpu))
    for row in dataset.iter_rows():
        yield {c: _plain(row[c]) for c in COLUMNS}


def _no_restarts() -> dict:
    """An actor that dies fails its files' rows (a re-run redoes them); Ray restarting it
    from object-store arguments is what its core worker warns about on every run. max_restarts
    has no named parameter in Ray Data 2.60, only the deprecated **ray_remote_args."""
    return {"max_restarts": 0}


def _bound_actor(config: CorpusConfig, sha: str) -> type:
    """TranscribeActor with its arguments built in: pickled with the class, not handed to Ray
    as constructor arguments in the object store (which Ray warns about for restartable
    actors)."""

    class Actor(TranscribeActor):
        def __init__(self) -> None:
            super().__init__(config, sha)

    return Actor


def _plain(value: object) -> object:
    """numpy scalars from Ray's blocks -> Python values for the results table."""
    return value.item() if isinstance(value, np.generic) else value
