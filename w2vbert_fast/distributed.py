"""``extract`` under torchrun: which clips this process does, its device, the job's progress, and the end.

``torchrun --nproc-per-node G [--nnodes N ...] -m w2vbert_fast extract ...`` starts G×N processes; each reads
RANK, WORLD_SIZE and LOCAL_RANK from its environment. Without WORLD_SIZE (a plain ``python -m``) ``Ranks`` is a
single rank and every method leaves ``extract`` exactly as it is.

* Split: every rank lists the same clips (the inputs must be the same paths on every machine, e.g. a shared file
  system); each reads the audio headers of 1/world of them, the lengths are exchanged, and the clips are dealt
  longest first onto the least-loaded rank (ties by path, then rank). The split depends only on the clip list and
  the number of ranks, so a rerun gives each rank the same clips, and resume (skip clips already written) works
  per clip as in one process.
* Device: ``cuda:LOCAL_RANK`` when extracting on CUDA, else the CPU.
* Control plane: the gloo backend on the CPU for every device. The ranks exchange only a few numbers and the
  manifest rows, so NCCL buys nothing here, and gloo honours the process group's timeout everywhere.
* Progress: each rank publishes its counters to the rendezvous store from a background thread every
  ``BEAT_SECONDS`` (no collective, so a rank with fewer batches never blocks the others); rank 0 shows their sum.
  The same counters are the ranks' heartbeats.
* End: a rank that is done waits for the others while their heartbeats keep coming; one that exited early or fell
  silent for ``timeout`` seconds ends the wait (a crashed rank never hangs the rest), and then every rank exits
  with status 1. When all are done, rank 0 writes ``OUT/manifest.json`` and exits with status 1 if any clip of the
  job failed on any rank, else 0; the other ranks exit 0, so torchrun never stops rank 0 halfway through its exit
  because another rank's non-zero status arrived first.
"""

import atexit
import hashlib
import heapq
import json
import os
import sys
import threading
import time
from datetime import timedelta

import torch

from . import progress
from .cli_common import CommandError

BEAT_SECONDS = 1.0
MANIFEST = "manifest.json"


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


def clip_seconds(path):
    """Audio length from the file header; 0 for an unreadable file (the rank that gets it reports the error)."""
    from .audio import AudioError, audio_info

    try:
        info = audio_info(path)
    except AudioError:
        return 0.0
    return info.frames / info.sample_rate


def manifest_row(path, out):
    """{clip, output, frames, seconds} of an output file, read from its safetensors header (no tensor data)."""
    from safetensors import safe_open

    with safe_open(out, framework="pt") as f:
        frames = f.get_slice("hidden_states").get_shape()[0]
        metadata = f.metadata() or {}
    try:
        seconds = int(metadata["num_samples"]) / int(metadata["sample_rate"])
    except (KeyError, ValueError):
        seconds = None  # written by a version that did not record it
    return dict(clip=path, output=out, frames=frames, seconds=seconds)


class Ranks:
    """This process's place in the job; a single rank when not started by torchrun."""

    def __init__(self, device, rank=0, world_size=1, local_rank=0, store=None, timeout=300.0):
        self.device, self.rank, self.world_size, self.local_rank = device, rank, world_size, local_rank
        self.store, self.timeout = store, timeout
        self.clips = None  # this rank's [(path, name)] after split()
        self.display = None
        self.snapshot = progress.Snapshot()
        self.state = "running"  # published with each beat: running | done | exited
        self.started = time.perf_counter()
        self.lock = threading.Lock()  # the counters, written by the main thread, published by the beat thread
        self.display_lock = threading.Lock()  # one writer of the progress line at a time
        self.stop = threading.Event()

    @property
    def distributed(self):
        return self.store is not None

    # ------------------------------------------------------------------------------------------ start
    @classmethod
    def from_env(cls, device, timeout=300.0):
        """A single rank unless WORLD_SIZE is set (torchrun); then joins the job: gloo process group with
        ``timeout``, device ``cuda:LOCAL_RANK`` when ``device`` is CUDA, heartbeat thread started."""
        if "WORLD_SIZE" not in os.environ:
            return cls(device)
        import torch.distributed as dist

        if timeout <= 0:
            raise CommandError(f"--rank-timeout must be positive, got {timeout}")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            if device.index is not None:
                raise CommandError(f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK; give "
                                   f"--device cuda (or leave it out) and choose GPUs with CUDA_VISIBLE_DEVICES")
            if local_rank >= torch.cuda.device_count():
                raise CommandError(f"LOCAL_RANK {local_rank} but this machine shows {torch.cuda.device_count()} CUDA "
                                   f"device(s): --nproc-per-node must be at most the number of GPUs")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        wait = timedelta(seconds=timeout)
        store, rank, world_size = next(dist.rendezvous("env://", timeout=wait))
        # the same store prefix as init_process_group's own env:// path, so torch's keys and ours never meet
        dist.init_process_group("gloo", store=dist.PrefixStore("default_pg", store), rank=rank,
                                world_size=world_size, timeout=wait)
        # keys per attempt: torchrun --max-restarts may hand a restarted job the store of the attempt before
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        ranks = cls(device, rank, world_size, local_rank, dist.PrefixStore(f"w2vbert_fast/{attempt}", store), timeout)
        ranks.publish()
        threading.Thread(target=ranks.beat, name="w2vbert_fast progress", daemon=True).start()
        atexit.register(ranks.exit_early)
        return ranks

    def split(self, clips, failures):
        """This rank's clips (in input order) and the input failures it reports (rank 0 reports them all)."""
        self.clips = clips
        if not self.distributed:
            return clips, failures
        import torch.distributed as dist

        paths = [path for path, _ in clips]
        digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()
        mine = {i: clip_seconds(paths[i]) for i in range(self.rank, len(paths), self.world_size)}
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, (digest, mine))
        if any(other != digest for other, _ in gathered):
            raise CommandError("the ranks found different clip lists: under torchrun every machine must see the "
                               "same input paths (a shared file system, the same --list)")
        seconds = [0.0] * len(paths)
        for _, part in gathered:
            for i, length in part.items():
                seconds[i] = length
        share = assign_by_length(paths, seconds, self.world_size)[self.rank]
        self.clips = [clips[i] for i in share]
        return self.clips, failures if self.rank == 0 else []

    # --------------------------------------------------------------------------------------- progress
    def progress(self, batches, todo, quiet=False, stream=None):
        """Start counting this rank's ``todo`` clips in ``batches`` batches; rank 0 shows the job's progress."""
        with self.lock:
            self.snapshot = progress.Snapshot(batches=batches, clips=len(todo),
                                              seconds=sum(clip["seconds"] for clip in todo))
        self.started = time.perf_counter()
        if self.rank == 0:
            self.display = progress.Display(stream or sys.stderr, quiet=quiet)
        return self

    def update(self, batches_done, clips_done, seconds_done, failed):
        """After each batch. One process shows the line here; under torchrun rank 0's beat thread does."""
        with self.lock:
            self.snapshot = progress.Snapshot(batches_done, self.snapshot.batches, clips_done, self.snapshot.clips,
                                              seconds_done, self.snapshot.seconds, failed,
                                              time.perf_counter() - self.started)
        if not self.distributed and self.display is not None:
            self.display.show([self.snapshot], final=batches_done == self.snapshot.batches)

    def publish(self):
        with self.lock:
            record = dict(state=self.state, beat=time.monotonic_ns(), snapshot=self.snapshot.__dict__)
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
        while not self.stop.wait(BEAT_SECONDS):
            try:
                self.publish()
                if self.display is not None:
                    records = self.read_all()
                    with self.display_lock:  # once this rank is done, wait_for_all() shows the line
                        if self.state == "running":
                            self.display.show([progress.Snapshot(**r["snapshot"]) for r in records.values()])
            except Exception:  # noqa: BLE001 - the store is gone (job torn down): the main thread will see it
                return

    def exit_early(self):
        """atexit: a rank leaving without finish() (an error) tells the others at once instead of falling silent."""
        if self.state == "running":
            self.stop.set()
            self.state = "exited"
            try:
                self.publish()
            except Exception:  # noqa: BLE001 - nobody left to tell
                pass

    # -------------------------------------------------------------------------------------------- end
    def finish(self, failures, out_dir):
        """The exit status. One process: 1 if any clip failed, else 0. Under torchrun: waits for every rank, then
        rank 0 writes OUT/manifest.json and returns 1 if any clip of the job failed (on any rank), the other ranks
        0; if a rank was lost, every rank still running returns 1 (and no manifest is written)."""
        if not self.distributed:
            return 1 if failures else 0
        import torch.distributed as dist

        log = sys.stderr
        with self.display_lock:
            self.state = "done"
        try:
            self.publish()
            lost = self.wait_for_all(log)
        except RuntimeError as error:  # torch.distributed.DistError: the process hosting the store is gone
            lost = [f"the job's rendezvous store stopped answering ({str(error).splitlines()[0]})"]
        self.stop.set()
        if lost:
            print(f"extract: rank {self.rank} stops waiting: {'; '.join(lost)}. No manifest written; rerun "
                  f"the same command to finish the job (clips already written are skipped).", file=log, flush=True)
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - the group may be broken by the lost rank; exiting anyway
                pass
            return 1
        rows = [manifest_row(path, out) for path, out in
                ((path, os.path.join(out_dir, name + ".safetensors")) for path, name in self.clips or [])
                if os.path.exists(out)]
        failed = [dict(clip=path, error=message) for path, message in failures]
        gathered = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object((rows, failed), gathered, dst=0)
        if self.rank == 0:
            self.write_manifest(out_dir, gathered)
        count = torch.tensor([len(failures)], dtype=torch.int64)
        dist.all_reduce(count)  # also the barrier: nobody exits (and torchrun stops nobody) before the manifest
        dist.destroy_process_group()
        if self.rank != 0:
            return 0  # rank 0 carries the job's status: torchrun then never stops it mid-exit for another's
        print(f"extract: {self.world_size} ranks done, {int(count)} clip(s) failed in all; manifest "
              f"{os.path.join(out_dir, MANIFEST)}", file=log, flush=True)
        return 1 if int(count) else 0

    def wait_for_all(self, log):
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
                if self.display is not None and (done or not lost):
                    with self.display_lock:
                        self.display.show([progress.Snapshot(**r["snapshot"]) for r in records.values()],
                                          final=done)
                if done or lost:
                    self.store.set("verdict", json.dumps(lost))
                    return lost
            elif lost:
                return lost
            time.sleep(BEAT_SECONDS)

    def write_manifest(self, out_dir, gathered):
        rows = sorted((row for part, _ in gathered for row in part), key=lambda row: row["clip"])
        failed = sorted((row for _, part in gathered for row in part), key=lambda row: row["clip"])
        for row in rows:
            row["output"] = os.path.relpath(row["output"], out_dir)
        manifest = dict(world_size=self.world_size, clips=rows, failed=failed)
        path = os.path.join(out_dir, MANIFEST)
        os.makedirs(out_dir, exist_ok=True)
        with open(path + ".partial", "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
        os.replace(path + ".partial", path)
