"""The GPU staging pipeline's bookkeeping, on the CPU with fake streams and events (`staging`):
which pinned buffer is lent when, that none is refilled before the copy that read it is done,
that the compute stream waits for exactly the copies it needs, that the writer waits for the
copy back, that the merging loop itself never waits, and that a merge run through all of it
writes the same bytes as the plain CPU path. The same code with `CudaOps` runs in test_gpu.py."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
import torch
from conftest import ODD, read_checkpoint, run_cli, write_recipe

import mergekit_ri.reading as reading
import mergekit_ri.staging as staging
from mergekit_ri import memory
from mergekit_ri.staging import BufferPool, Download, HostInputs, Stager, Uploaded
from mergekit_ri.synthetic import make_family

NAMES = ["a", "b", "c"]


class FakeEvent:
    def __init__(self, number: int, stream: str, fired: bool) -> None:
        self.number, self.stream, self.fired = number, stream, fired


class FakeOps:
    """`DeviceOps` that log every call (with the stream current in the calling thread) and copy
    synchronously; an event fires only when someone synchronizes on it, unless `fire`."""

    def __init__(self, fire: bool = False) -> None:
        self.fire = fire
        self.log: list[tuple] = []
        self.events = 0
        self._lock = threading.Lock()
        self._local = threading.local()

    def _add(self, *entry) -> None:
        with self._lock:
            self.log.append(entry)

    def stream_now(self) -> str:
        return getattr(self._local, "stream", "compute")

    def new_stream(self, name: str) -> str:
        return name

    def current_stream(self) -> str:
        return "compute"

    @contextmanager
    def use(self, stream):
        before = self.stream_now()
        self._local.stream = stream
        try:
            yield
        finally:
            self._local.stream = before

    def record(self, stream) -> FakeEvent:
        with self._lock:
            self.events += 1
            event = FakeEvent(self.events, stream, self.fire)
        self._add("record", stream, event.number)
        return event

    def wait(self, stream, event) -> None:
        self._add("wait", stream, event.number)

    def synchronize(self, event) -> None:
        self._add("sync", event.number, threading.current_thread().name)
        event.fired = True

    def done(self, event) -> bool:
        return event.fired

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        self._add("alloc", nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        self._add("to_device", self.stream_now())
        return tensor.clone()

    def to_host(self, host: torch.Tensor, tensor: torch.Tensor) -> None:
        self._add("to_host", self.stream_now())
        host.copy_(tensor)

    def keep_for(self, tensor: torch.Tensor, stream) -> None:
        self._add("keep_for", stream)


def entries(ops: FakeOps, kind: str) -> list[tuple]:
    return [e for e in ops.log if e[0] == kind]


# ---------------------------------------------------------------- the pool


def test_buffers_are_reused_round_robin_and_refilled_only_after_their_copy():
    ops = FakeOps()
    pool = BufferPool(ops, 3, 1024)
    first = [pool.acquire(100) for _ in range(3)]
    assert [lease.slot for lease in first] == [0, 1, 2]
    pending, fired = ops.record("copy"), ops.record("copy")
    fired.fired = True
    first[0].release(pending)
    first[1].release(fired)
    first[2].release()
    again = pool.acquire(1024)
    assert again.slot == 0 and again.buffer.data_ptr() == first[0].buffer.data_ptr()
    assert entries(ops, "sync") == [("sync", pending.number, threading.current_thread().name)]
    assert [pool.acquire(10).slot for _ in range(2)] == [1, 2]
    assert len(entries(ops, "sync")) == 1  # a copy already done is not waited for
    assert pool.stats() == {"slots": 3, "slot_bytes": 1024, "made": 3, "lent": 6, "waited": 1, "extra": 0}
    assert len(entries(ops, "alloc")) == 3  # made once each, on first use


def test_a_lease_is_not_lent_twice_and_overflow_gets_a_buffer_of_its_own():
    ops = FakeOps()
    pool = BufferPool(ops, 1, 256)
    held = pool.acquire(256)
    spare = pool.acquire(10)  # every slot lent: no waiting on ourselves, a buffer of its own
    big = pool.acquire(257)  # larger than a slot
    assert spare.slot is None and big.slot is None and big.buffer.numel() >= 257
    spare.release()
    big.release()
    held.release()
    held.release()  # a second release gives nothing back twice
    assert pool.acquire(1).slot == 0
    assert pool.acquire(1).slot is None
    assert pool.stats()["extra"] == 3


def test_tensors_carved_from_a_lease_are_aligned_and_hold_their_bytes():
    pool = BufferPool(FakeOps(), 1, 4096)
    lease = pool.acquire(4096)
    a = lease.take((3,), torch.bfloat16)
    b = lease.take((2, 5), torch.float32)
    assert (b.data_ptr() - a.data_ptr()) % staging.ALIGN == 0 and b.data_ptr() > a.data_ptr()
    a.copy_(torch.tensor([1.0, 2.0, 3.0]))
    b.copy_(torch.arange(10.0).reshape(2, 5))
    assert a.tolist() == [1.0, 2.0, 3.0] and b.sum().item() == 45.0
    with pytest.raises(AssertionError):
        lease.take((4096,), torch.float32)


# ---------------------------------------------------------------- copies and events


def stager(ops: FakeOps, slots: int = 2, nbytes: int = 4096) -> Stager:
    layout = staging.PinnedLayout(slots, nbytes, 0, 0, 2, nbytes)
    return Stager(torch.device("cpu"), ops, layout)


def test_an_upload_is_issued_on_the_copy_stream_and_frees_its_buffer_with_that_copy():
    ops = FakeOps()
    stage = stager(ops)
    lease = stage.inputs.acquire(64)
    raws = HostInputs([lease.take((4,), torch.float32), lease.take((2, 4), torch.float32)], lease)
    raws[0].copy_(torch.arange(4.0))
    raws[1].fill_(7)
    uploaded = stage.upload(raws)
    assert isinstance(uploaded, Uploaded)
    assert entries(ops, "to_device") == [("to_device", "copy")] * 2
    copied = entries(ops, "record")[-1]
    assert copied[1] == "copy"
    assert entries(ops, "keep_for") == [("keep_for", "compute")] * 2  # made on one stream, read on another
    assert not entries(ops, "wait")  # nothing waits until the merge takes the inputs
    raws[0].fill_(-1)  # the host buffer may now be refilled (the fake copy already happened)
    base, experts = reading.load_inputs(uploaded, True, torch.device("cpu"), fp32=True)
    assert base.tolist() == [0.0, 1.0, 2.0, 3.0] and experts.eq(7).all()
    assert entries(ops, "wait") == [("wait", "compute", copied[2])]  # that copy, and only it
    stage.inputs.acquire(64)  # the other slot: free, never used
    stage.inputs.acquire(64)  # this one: after the copy that read it
    assert entries(ops, "sync") == [("sync", copied[2], threading.current_thread().name)]


def test_a_download_is_waited_for_by_the_writer_not_by_the_merge():
    ops = FakeOps()
    stage = stager(ops)
    result = torch.arange(12.0).reshape(3, 4)
    pending = stage.download(result)
    assert isinstance(pending, Download)
    kernels, copied = entries(ops, "record")[-2:]
    assert kernels[1] == "compute" and copied[1] == "download"
    assert ("wait", "download", kernels[2]) in ops.log  # the copy starts after the kernels so far
    assert entries(ops, "to_host") == [("to_host", "download")]
    assert ("keep_for", "download") in ops.log  # the device result outlives its copy
    assert not entries(ops, "sync")
    written = []

    class Writer:
        def write(self, task, tensor, rows):
            assert ops.log[-1][:2] == ("sync", copied[2])  # the copy back is waited for first
            written.append((task, tensor.clone(), rows))

    thread = threading.Thread(target=stage.write, args=(Writer(), "t", pending, (0, 3)), name="writer")
    thread.start()
    thread.join()
    assert written[0][0] == "t" and written[0][2] == (0, 3) and torch.equal(written[0][1], result)
    assert entries(ops, "sync")[0][2] == "writer"
    assert stage.results.stats()["lent"] == 1
    assert [stage.results.acquire(48).slot for _ in range(2)] == [1, 0]  # given back once written


def test_on_the_cpu_everything_passes_through_and_cuda_is_never_touched(monkeypatch):
    for name in ("Stream", "Event", "current_stream", "stream", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: pytest.fail("CUDA touched"))
    stage = staging.stager_for(torch.device("cpu"), [], 2, 2, 1 << 20)
    raws = [torch.ones(3)]
    assert stage.upload(raws) is raws and stage.lookahead == 0
    result = torch.zeros(2)
    assert stage.download(result) is result
    seen = []

    class Writer:
        def write(self, task, tensor, rows):
            seen.append(tensor)

    stage.write(Writer(), None, result, None)
    assert seen == [result] and stage.stats() == {}
    assert staging.device_ops(torch.device("cpu")) is None


# ---------------------------------------------------------------- whole merges


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("staging"), NAMES, shape=ODD, dtype="bfloat16", shards=2)


def merge(tmp_path, models, method, name, **fields):
    recipe = {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [{"model": str(models[n])} for n in NAMES],
        "seed": 5,
        **fields,
    }
    path = write_recipe(tmp_path / f"{name}.yaml", **recipe)
    result = run_cli("merge", path, "-o", tmp_path / name, "--quiet", "--device", "cpu")
    assert result.code == 0, result.stderr
    return read_checkpoint(tmp_path / name)


@pytest.mark.parametrize(
    "method,fields,blocks",
    [
        ("task_arithmetic", {"parameters": {"lambda": 0.7}}, False),
        ("ties", {"parameters": {"density": 0.3}}, False),
        ("dare_ties", {"parameters": {"density": 0.5}}, False),
        ("ties", {"parameters": {"density": 0.3}}, True),
    ],
    ids=["task_arithmetic", "ties", "dare_ties", "ties-by-blocks"],
)
def test_a_merge_through_the_staging_writes_the_cpu_bytes(
    tmp_path, models, monkeypatch, method, fields, blocks
):
    """The GPU pipeline's path (pinned pools, uploads one unit ahead, downloads the writer waits
    for) with fake streams: the same bytes as the plain CPU path, no buffer beyond the planned
    pools, and the merging thread never waits for an event. `blocks`: TIES merged by row blocks
    after each big tensor's figures pass (the layout of the tightest caps)."""
    monkeypatch.setattr(reading, "CHUNK_ELEMENTS", 60)  # row blocks, and TIES tensors read by rows
    monkeypatch.setattr(reading, "STREAM_BYTES", 2000)
    plain = merge(tmp_path, models, method, "plain", **fields)
    if blocks:
        layouts = memory._layouts
        monkeypatch.setattr(memory, "_layouts", lambda *a: (k for k in layouts(*a) if k.block_bytes == 0))
    ops = FakeOps()
    stagers: list[Stager] = []

    stage_units: list = []

    def fake(device, units, depth, queue, chunk):
        stage_units.extend(units)
        stagers.append(Stager(device, ops, staging.pinned_layout(units, depth, queue, chunk)))
        return stagers[-1]

    monkeypatch.setattr("mergekit_ri.engine.stager_for", fake)
    staged = merge(tmp_path, models, method, "staged", **fields)
    assert plain.keys() == staged.keys()
    for name in plain:
        assert torch.equal(plain[name], staged[name]), name
    (stage,) = stagers
    if blocks:
        assert any(u.stats for u in stage_units)
    stats = stage.stats()
    assert all(pool["extra"] == 0 for pool in stats.values()), stats
    assert stats["results"]["lent"] > stats["results"]["slots"]  # reused
    if method == "task_arithmetic":
        assert stats["inputs"]["lent"] > stats["inputs"]["slots"] >= stats["inputs"]["made"]
    else:
        assert stats["chunks"]["lent"] > stats["chunks"]["slots"]  # tensors read by rows, staged too
    if method == "task_arithmetic":  # (a streamed tensor's row sample is read on the merging thread)
        waits = entries(ops, "sync")
        assert waits and all(thread != "MainThread" for _, _, thread in waits)
    # every H2D copy on the copy stream, every D2H copy on the download stream
    assert {e[1] for e in entries(ops, "to_device")} == {"copy"}
    assert {e[1] for e in entries(ops, "to_host")} == {"download"}
    # the next unit's inputs are on their way before this unit's result is copied back
    uploads = 0
    downloads = 0
    total = len([e for e in entries(ops, "record") if e[1] == "copy"])
    for entry in ops.log:
        if entry[:2] == ("record", "copy"):
            uploads += 1
        elif entry[0] == "to_host":
            downloads += 1
            if method == "task_arithmetic":
                assert uploads >= min(downloads + 1, total)


def test_the_planned_pinned_bytes_are_the_pools_the_engine_makes(tmp_path, models):
    from mergekit_ri import api

    for method in ("task_arithmetic", "ties"):
        path = write_recipe(
            tmp_path / f"{method}.yaml",
            merge_method=method,
            base_model=str(models["base"]),
            models=[{"model": str(models[n]), "parameters": {"density": 0.4}} for n in NAMES],
        )
        plan = api.plan(path).plan
        cpu = memory.plan_memory(plan, device="cpu")
        gpu = memory.plan_memory(plan, device="cuda")
        assert cpu.pinned == 0 and gpu.pinned > 0
        units = reading.work_units(plan, chunk=gpu.chunk, device="cuda", stream_bytes=gpu.stream_bytes)
        layout = staging.pinned_layout(units, gpu.depth, gpu.writer_queue, gpu.chunk)
        assert layout.nbytes == gpu.pinned
        merged = [u for u in units if u.task.merge]
        assert layout.input_slots == gpu.depth + 2
        assert layout.input_bytes == max(u.staged_nbytes for u in merged if not u.streamed)
        assert layout.result_bytes >= max(u.out_nbytes for u in merged)
        assert gpu.peak >= gpu.pinned
        # a cap below the GPU layout's peak gets smaller (or fewer) staging buffers
        tighter = memory.plan_memory(plan, cap=gpu.peak - 1, device="cuda")
        assert tighter.pinned < gpu.pinned and tighter.peak < gpu.peak


def test_cuda_is_not_initialised_before_a_cuda_device_is_chosen(tmp_path, models, monkeypatch):
    """`--device cpu` (and `auto` without a GPU), `validate` and `--dry-run`: any CUDA
    initialisation would go through torch.cuda._lazy_init, which fails here."""

    def refuse(*args, **kwargs):
        raise AssertionError("CUDA initialised")

    monkeypatch.setattr(torch.cuda, "_lazy_init", refuse)
    recipe = write_recipe(
        tmp_path / "ties.yaml",
        merge_method="ties",
        base_model=str(models["base"]),
        models=[{"model": str(models[n]), "parameters": {"density": 0.4}} for n in NAMES],
    )
    devices = ["cpu"] if torch.cuda.is_available() else ["cpu", "auto"]
    for device in devices:
        result = run_cli("merge", recipe, "-o", tmp_path / device, "--quiet", "--device", device)
        assert result.code == 0, result.stderr
    for args in (
        ["validate", recipe],
        ["merge", recipe, "-o", tmp_path / "dry", "--dry-run", "--device", "auto"],
    ):
        result = run_cli(*args)
        assert result.code == 0, result.stderr
