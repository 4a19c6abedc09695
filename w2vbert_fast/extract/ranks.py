"""``extract`` under torchrun: which clips this process does, its device, the job's progress, and the end.

``torchrun --nproc-per-node G [--nnodes N ...] -m w2vbert_fast extract ...`` starts G×N processes; each reads
RANK, WORLD_SIZE and LOCAL_RANK from its environment. Without WORLD_SIZE (a plain ``python -m``) the job is one
rank and every step of :class:`Job` leaves ``extract`` exactly as it is.

One piece per job, put together by :class:`Job` in the order ``extract`` uses them:

* Membership (:func:`join`): the rendezvous, the gloo process group, this rank's device (``cuda:LOCAL_RANK`` when
  extracting on CUDA, else the CPU). Control plane: gloo on the CPU for every device; the ranks exchange only a
  few numbers and the manifest rows, so NCCL buys nothing here, and gloo honours the process group's timeout
  everywhere.
* Split (:func:`split`, :func:`assign_by_length`): every rank lists the same clips (the inputs must be the same
  paths on every machine, e.g. a shared file system); each reads the audio headers of 1/world of them, the lengths
  are exchanged, and the clips are dealt longest first onto the least-loaded rank (ties by path, then rank). The
  split depends only on the clip list and the number of ranks, so a rerun gives each rank the same clips, and
  resume (skip clips already written) works per clip as in one process.
* Heartbeat (:class:`Heartbeat`): each rank publishes its state and progress counters to the rendezvous store from
  a background thread every ``BEAT_SECONDS`` (no collective, so a rank with fewer batches never blocks the
  others); rank 0 shows their sum. At the end a rank that is done waits for the others while their beats keep
  coming; one that exited early or fell silent for ``timeout`` seconds ends the wait (a crashed rank never hangs
  the rest).
* Manifest (:func:`gather_manifest`, :func:`write_manifest`): when all are done, rank 0 writes ``OUT/manifest.json``
  from every rank's rows.
* Exit status (:func:`exit_status`): a lost rank makes every rank still running exit 1 (no manifest). Otherwise
  rank 0 exits 1 if any clip of the job failed on any rank, else 0; the other ranks exit 0, so torchrun never
  stops rank 0 halfway through its exit because another rank's non-zero status arrived first.
"""

import atexit
import hashlib
import heapq
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch

from . import ExtractError, inputs, progress, store

BEAT_SECONDS = 1.0
MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------------------------- membership
@dataclass(frozen=True)
class Membership:
    """This process's place in the job. ``store``: the job's rendezvous store (keys of this attempt only), None
    for a single process."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    store: Optional[Any] = None

    @property
    def distributed(self) -> bool:
        return self.store is not None


def join(device, timeout) -> Membership:
    """A single rank unless WORLD_SIZE is set (torchrun); then joins the job: gloo process group with ``timeout``,
    device ``cuda:LOCAL_RANK`` when ``device`` is CUDA."""
    if "WORLD_SIZE" not in os.environ:
        return Membership(device)
    import torch.distributed as dist

    if timeout <= 0:
        raise ExtractError(f"--rank-timeout must be positive, got {timeout}")
    device = rank_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    wait = timedelta(seconds=timeout)
    root, rank, world_size = next(dist.rendezvous("env://", timeout=wait))
    # the same store prefix as init_process_group's own env:// path, so torch's keys and ours never meet
    dist.init_process_group("gloo", store=dist.PrefixStore("default_pg", root), rank=rank, world_size=world_size,
                            timeout=wait)
    # keys per attempt: torchrun --max-restarts may hand a restarted job the store of the attempt before
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return Membership(device, rank, world_size, dist.PrefixStore(f"w2vbert_fast/{attempt}", root))


def rank_device(device, local_rank) -> torch.device:
    """``cuda:LOCAL_RANK`` for a CUDA run (made the current device), else ``device``."""
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ExtractError(f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK; give --device "
                           f"cuda (or leave it out) and choose GPUs with CUDA_VISIBLE_DEVICES")
    if local_rank >= torch.cuda.device_count():
        raise ExtractError(f"LOCAL_RANK {local_rank} but this machine shows {torch.cuda.device_count()} CUDA "
                           f"device(s): --nproc-per-node must be at most the number of GPUs")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


# ---------------------------------------------------------------------------------------------------- split
def assign_by_length(paths, seconds, world_size):
    """[[clip indices] per rank]: longest first onto the least-loaded rank (ties: fewer clips, then the lower
    rank; clips of equal length in path order), each rank's list in input order. Deterministic: the same paths,
    lengths and world size give the same split."""
    order = sorted(range(len(paths)), key=lambda i: (-seconds[i], paths[i]))
    loads = [(0.0, 0, rank) for rank in range(world_size)]  # a heap: (seconds assigned, clips assigned, rank)
    shares = [[] for _ in range(world_size)]
    for i in order:
        load, count, rank = heapq.heappop(loads)
        shares[rank].append(i)
        heapq.heappush(loads, (load + seconds[i], count + 1, rank))
    return [sorted(share) for share in shares]


def split(membership, clips, failures):
    """This rank's clips (in input order) and the input failures it reports (rank 0 reports them all)."""
    if not membership.distributed:
        return clips, failures
    import torch.distributed as dist

    rank, world_size = membership.rank, membership.world_size
    paths = [clip.path for clip in clips]
    digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()
    mine = {i: inputs.seconds_or_zero(clips[i]) for i in range(rank, len(paths), world_size)}
    gathered = [None] * world_size
    dist.all_gather_object(gathered, (digest, mine))
    if any(other != digest for other, _ in gathered):
        raise ExtractError("the ranks found different clip lists: under torchrun every machine must see the same "
                           "input paths (a shared file system, the same --list)")
    seconds = [0.0] * len(paths)
    for _, part in gathered:
        for i, length in part.items():
            seconds[i] = length
    share = assign_by_length(paths, seconds, world_size)[rank]
    return [clips[i] for i in share], failures if rank == 0 else []


# ------------------------------------------------------------------------------------------------ heartbeat
class Heartbeat:
    """This rank's record in the job's store — ``{state, beat, snapshot}``, state running | done | exited —
    published every BEAT_SECONDS by a thread, the other ranks' records, and the end-of-job wait on them.

    ``counters()`` gives this rank's progress for each record; ``show(snapshots, final)`` (rank 0, once set by
    :meth:`show_progress`) writes the job's progress line from every rank's."""

    def __init__(self, store, rank, world_size, timeout, counters=progress.Snapshot):
        self.store, self.rank, self.world_size, self.timeout = store, rank, world_size, timeout
        self.counters = counters
        self.show = None
        self.state = "running"
        self.lock = threading.Lock()  # state and the progress line: once this rank is done the wait shows it
        self.stopped = threading.Event()

    def start(self):
        self.publish()
        threading.Thread(target=self.beat, name="w2vbert_fast heartbeat", daemon=True).start()
        atexit.register(self.exit_early)

    def show_progress(self, show):
        with self.lock:
            self.show = show

    def publish(self):
        record = dict(state=self.state, beat=time.monotonic_ns(), snapshot=self.counters().__dict__)
        self.store.set(f"rank{self.rank}", json.dumps(record))

    def read_all(self, ranks=None):
        """{rank: record} of those ``ranks`` (default all) that have published; never blocks on one that has not."""
        records = {}
        for rank in range(self.world_size) if ranks is None else ranks:
            key = f"rank{rank}"
            if self.store.check([key]):
                records[rank] = json.loads(self.store.get(key))
        return records

    def beat(self):
        while not self.stopped.wait(BEAT_SECONDS):
            try:
                self.publish()
                if self.show is not None:
                    records = self.read_all()
                    with self.lock:
                        if self.state == "running":
                            self.show(snapshots(records))
            except Exception:  # noqa: BLE001 - the store is gone (job torn down): the main thread will see it
                return

    def exit_early(self):
        """atexit: a rank leaving before it is done (an error) tells the others at once instead of falling silent."""
        if self.state == "running":
            self.stopped.set()
            self.state = "exited"
            try:
                self.publish()
            except Exception:  # noqa: BLE001 - nobody left to tell
                pass

    def done(self):
        with self.lock:
            self.state = "done"
        self.publish()

    def stop(self):
        self.stopped.set()

    def wait_for_all(self):
        """[description of each lost rank]; empty once every rank is done. Rank 0 watches every rank, keeps the
        progress line going and publishes its verdict; the others wait for that verdict and watch rank 0 alone.
        So all ranks decide alike, and the store serves O(ranks) reads a beat rather than O(ranks²)."""
        watched = list(range(self.world_size)) if self.rank == 0 else [0]
        last_beat, last_change = {}, dict.fromkeys(watched, time.monotonic())
        while True:
            if self.rank != 0 and self.store.check(["verdict"]):
                return json.loads(self.store.get("verdict"))
            records = self.read_all(watched)
            now = time.monotonic()
            lost = []
            for rank in watched:
                record = records.get(rank)
                beat = record["beat"] if record else None
                if beat != last_beat.get(rank):
                    last_beat[rank], last_change[rank] = beat, now
                if record and record["state"] == "exited":
                    lost.append(f"rank {rank} exited before finishing")
                elif now - last_change[rank] > self.timeout:  # done ranks beat too, until the verdict
                    lost.append(f"rank {rank} silent for {self.timeout:g} s (crashed? see --rank-timeout)")
            if self.rank == 0:
                done = len(records) == self.world_size and all(r["state"] == "done" for r in records.values())
                if self.show is not None and (done or not lost):
                    with self.lock:
                        self.show(snapshots(records), final=done)
                if done or lost:
                    self.store.set("verdict", json.dumps(lost))
                    return lost
            elif lost:
                return lost
            time.sleep(BEAT_SECONDS)


def snapshots(records):
    return [progress.Snapshot(**record["snapshot"]) for record in records.values()]


# ------------------------------------------------------------------------------------------------- manifest
def gather_manifest(membership, rows, failures):
    """Every rank's manifest rows and failures, on rank 0 ([(rows, failed)] per rank); None on the others."""
    import torch.distributed as dist

    failed = [dict(clip=path, error=message) for path, message in failures]
    gathered = [None] * membership.world_size if membership.rank == 0 else None
    dist.gather_object((rows, failed), gathered, dst=0)
    return gathered


def write_manifest(out_dir, world_size, gathered, layout="clips"):
    """OUT/manifest.json from every rank's (rows, failed), both lists sorted by clip, outputs relative to OUT;
    written to a partial file of this process's own and renamed, so a reader never sees half of one."""
    rows = sorted((row for part, _ in gathered for row in part), key=lambda row: row["clip"])
    failed = sorted((row for _, part in gathered for row in part), key=lambda row: row["clip"])
    manifest = dict(world_size=world_size, layout=layout, clips=rows, failed=failed)
    path = os.path.join(out_dir, MANIFEST)
    os.makedirs(out_dir, exist_ok=True)
    partial = f"{path}.{store.run_tag()}.partial"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    os.replace(partial, path)


# ---------------------------------------------------------------------------------------------- exit status
def exit_status(rank, failed_in_job) -> int:
    """Rank 0 carries the job's status (1 if any clip of the job failed); the others exit 0, so torchrun never
    stops rank 0 mid-exit for another rank's status."""
    return 1 if rank == 0 and failed_in_job else 0


# ------------------------------------------------------------------------------------------------------ job
class Job:
    """This process's part of the extraction, the pieces above in the order ``extract`` uses them: join, split,
    count progress, finish. For a single process every step leaves ``extract`` as it is."""

    def __init__(self, membership, timeout=300.0):
        self.membership = membership
        self.device, self.rank, self.world_size = membership.device, membership.rank, membership.world_size
        self.tally = progress.Tally()
        self.display = None
        self.clips = []  # this rank's clips, after split()
        self.heartbeat = None
        if membership.distributed:
            self.heartbeat = Heartbeat(membership.store, membership.rank, membership.world_size, timeout,
                                       counters=self.tally.snapshot)

    @classmethod
    def join(cls, device, timeout=300.0):
        job = cls(join(device, timeout), timeout)
        if job.heartbeat is not None:
            job.heartbeat.start()
        return job

    @property
    def distributed(self):
        return self.membership.distributed

    def split(self, clips, failures):
        self.clips, failures = split(self.membership, clips, failures)
        return self.clips, failures

    def start_progress(self, batches, clips, seconds, quiet=False, stream=None):
        """Count this rank's work; rank 0 shows the job's progress (under torchrun, from its heartbeat thread)."""
        self.tally.start(batches, clips, seconds)
        if self.rank == 0:
            self.display = progress.Display(stream or sys.stderr, quiet=quiet)
            if self.heartbeat is not None:
                self.heartbeat.show_progress(self.display.show)

    def update(self, batches_done, clips_done, seconds_done, failed, clips=None, seconds=None, final=None):
        """After each batch; ``clips`` and ``seconds``: the totals, less the clips that failed; ``final``: the
        last update (default: when every batch is done)."""
        snapshot = self.tally.update(batches_done, clips_done, seconds_done, failed, clips=clips, seconds=seconds)
        if self.heartbeat is None and self.display is not None:
            self.display.show([snapshot], final=batches_done == snapshot.batches if final is None else final)

    def finish(self, failures, out_dir, rows=None, layout="clips") -> int:
        """Writes OUT/manifest.json (``rows``: this rank's clips whose outputs exist; None: no manifest) and
        returns the exit status. One process: 1 if any clip failed, else 0. Under torchrun: waits for every rank,
        then rank 0 writes the manifest of the whole job and returns 1 if any clip of the job failed (on any rank),
        the other ranks 0; if a rank was lost, every rank still running returns 1 (and no manifest is written)."""
        if not self.distributed:
            if rows is not None:
                failed = [dict(clip=path, error=message) for path, message in failures]
                write_manifest(out_dir, 1, [(rows, failed)], layout)
            return 1 if failures else 0
        import torch.distributed as dist

        lost = self.wait_for_the_others()
        if lost:
            print(f"extract: rank {self.rank} stops waiting: {'; '.join(lost)}. No manifest written; rerun the same "
                  f"command to finish the job (clips already written are skipped).", file=sys.stderr, flush=True)
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - the group may be broken by the lost rank; exiting anyway
                pass
            return 1
        gathered = gather_manifest(self.membership, rows or [], failures)
        if self.rank == 0:
            write_manifest(out_dir, self.world_size, gathered, layout)
        count = torch.tensor([len(failures)], dtype=torch.int64)
        dist.all_reduce(count)  # also the barrier: nobody exits (and torchrun stops nobody) before the manifest
        dist.destroy_process_group()
        if self.rank == 0:
            print(f"extract: {self.world_size} ranks done, {int(count)} clip(s) failed in all; manifest "
                  f"{os.path.join(out_dir, MANIFEST)}", file=sys.stderr, flush=True)
        return exit_status(self.rank, int(count))

    def wait_for_the_others(self):
        """[lost ranks] once this rank is done: the heartbeat's wait, or the store itself gone."""
        try:
            self.heartbeat.done()
            return self.heartbeat.wait_for_all()
        except RuntimeError as error:  # torch.distributed.DistError: the process hosting the store is gone
            return [f"the job's rendezvous store stopped answering ({str(error).splitlines()[0]})"]
        finally:
            self.heartbeat.stop()
