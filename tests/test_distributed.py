"""The coordination of torchrun ranks (medseg.training.distributed) on a real c10d TCP store in one process:
barriers pass when every rank arrives, time out naming the missing rank, stop with a peer's published failure or
when a peer stops beating; the watchdog interrupts a rank's long work with a peer's failure."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta

import pytest

from medseg.errors import InputError
from medseg.training.distributed import (
    BarrierTimeout,
    Coordinator,
    PeerFailure,
    barrier_timeout_s,
    data_bytes,
    folds_of_rank,
)


@pytest.fixture
def pair():
    import torch.distributed as dist

    server = dist.TCPStore("localhost", 0, world_size=None, is_master=True, timeout=timedelta(seconds=10),
                           wait_for_workers=False)

    def client():
        return dist.TCPStore("localhost", server.port, world_size=None, is_master=False,
                             timeout=timedelta(seconds=10))

    coords = [Coordinator(client(), client(), r, 2, prefix="t", poll_s=0.05, dead_after_s=1.0, ack_s=5.0)
              for r in range(2)]
    yield coords
    for c in coords:
        c.close(linger_s=0)


def test_barrier_passes_when_every_rank_arrives_and_carries_values(pair):
    r0, r1 = pair
    r1.put("result", {"epochs": 3})
    t = threading.Thread(target=r1.barrier, args=("a", 5))
    t.start()
    r0.barrier("a", 5)
    t.join(5)
    assert not t.is_alive() and r0.get("result") == {"epochs": 3}
    with pytest.raises(KeyError):
        r0.get("absent")


def test_barrier_times_out_naming_the_missing_rank(pair):
    r0, _ = pair
    t0 = time.monotonic()
    with pytest.raises(BarrierTimeout, match=r"ranks \[1\] did not reach barrier 1-cache within the barrier's 0 s"):
        r0.barrier("cache", 0.3)
    assert time.monotonic() - t0 < 0.9  # before the dead-peer rule (1 s): rank 1 still beats


def test_a_published_failure_stops_the_waiting_rank_with_its_message(pair):
    r0, r1 = pair
    failing = threading.Thread(target=r1.fail, args=(InputError("/data/case_1.nii.gz", "not a valid NIfTI file"),))
    t0 = time.monotonic()
    failing.start()
    with pytest.raises(PeerFailure, match=r"rank 1 \(.*\) failed: /data/case_1.nii.gz: not a valid NIfTI file"):
        r0.barrier("cache", 60)
    failing.join(5)
    # the failing rank waited for rank 0's acknowledgement, not for its whole ack_s of 5 s
    assert not failing.is_alive() and time.monotonic() - t0 < 3


def test_a_rank_that_stops_beating_is_reported_gone(pair):
    r0, r1 = pair
    r1.close(linger_s=0)  # its watchdog (the heartbeat) stops, as when the process is killed
    t0 = time.monotonic()
    with pytest.raises(PeerFailure, match="rank 1 stopped .no heartbeat"):
        r0.barrier("trained", None)  # no timeout: only the heartbeat ends the wait
    assert 1.0 <= time.monotonic() - t0 < 4


def test_the_watchdog_interrupts_long_work_with_the_peers_failure():
    """A rank busy training (no barrier) stops within a second of a peer's failure (in a child process: the
    watchdog interrupts the main thread)."""
    code = textwrap.dedent("""
        import threading, time
        from datetime import timedelta
        import torch.distributed as dist
        from medseg.errors import InputError
        from medseg.training.distributed import Coordinator, PeerFailure
        server = dist.TCPStore("localhost", 0, world_size=None, is_master=True, timeout=timedelta(seconds=10),
                               wait_for_workers=False)
        cl = lambda: dist.TCPStore("localhost", server.port, is_master=False, timeout=timedelta(seconds=10))
        r0, r1 = (Coordinator(cl(), cl(), r, 2, prefix="w", poll_s=0.05, ack_s=5.0) for r in range(2))
        threading.Timer(0.5, r1.fail, args=(InputError("x.nii.gz", "broken"),)).start()
        t0 = time.monotonic()
        try:
            with r0.guard():
                while time.monotonic() - t0 < 20:
                    sum(range(10000))  # "training"
            print("NOT STOPPED")
        except PeerFailure as exc:
            print(f"STOPPED {time.monotonic() - t0:.2f} {exc}")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.startswith("STOPPED"), res.stdout + res.stderr[-2000:]
    seconds, message = res.stdout.split(" ", 2)[1:]
    assert float(seconds) < 3 and "rank 1" in message and "x.nii.gz: broken" in message


def test_timeouts_and_shares_scale_with_the_data(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"x" * 2**20)
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "1.dcm").write_bytes(b"x" * 2**20)
    assert data_bytes([tmp_path / "a.nii.gz", tmp_path / "series", tmp_path / "missing"]) == 2 * 2**20
    assert barrier_timeout_s(2 * 2**20, 2.0) == barrier_timeout_s(0, 2.0) + 4.0
    assert barrier_timeout_s(0, 0, extra_s=60) == barrier_timeout_s(0, 0) + 60
    assert folds_of_rank([0, 1, 2, 3, 4], 1, 2) == [1, 3] and folds_of_rank([0], 1, 2) == []


def test_an_error_after_a_peers_failure_is_reported_as_that_failure():
    """A collective that breaks because a peer left (gloo: connection closed) names the peer's failure, the cause,
    not its own symptom (in a child process, as above)."""
    code = textwrap.dedent("""
        import time
        from datetime import timedelta
        import torch.distributed as dist
        from medseg.errors import InputError
        from medseg.training.distributed import Coordinator, PeerFailure
        server = dist.TCPStore("localhost", 0, world_size=None, is_master=True, timeout=timedelta(seconds=10),
                               wait_for_workers=False)
        cl = lambda: dist.TCPStore("localhost", server.port, is_master=False, timeout=timedelta(seconds=10))
        r0, r1 = (Coordinator(cl(), cl(), r, 2, prefix="c", poll_s=0.05, ack_s=0.5) for r in range(2))
        r1.fail(InputError("case_3.nii.gz", "out of memory while resampling"))
        try:
            with r0.guard():
                raise RuntimeError("[gloo] Connection closed by peer")
        except PeerFailure as exc:
            print(f"PEER {exc}")
        except RuntimeError as exc:
            print(f"OWN {exc}")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.startswith("PEER rank 1 ("), res.stdout + res.stderr[-2000:]
    assert "case_3.nii.gz: out of memory while resampling" in res.stdout
