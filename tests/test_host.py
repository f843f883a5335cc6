"""host.py: the /proc readers against what the process just did."""

import resource
import subprocess
import sys

import pytest

from lorakit import host


def test_proc_field_reads_a_key_and_misses_cleanly(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t1024 kB\n")
    assert host.proc_field(str(status), "VmHWM") == "2048 kB"
    assert host.proc_field(str(status), "VmPeak") is None
    assert host.proc_field(str(tmp_path / "absent"), "VmHWM") is None


def test_peak_rss_grows_with_what_this_process_touches():
    # the high-water mark only grows: bring it down to the current size, or an earlier test's
    # bigger peak would hide this allocation; the freed heap of earlier tests, still resident, could hold it
    host.return_freed_memory()
    host.reset_peak_rss()
    before = host.peak_rss_bytes()
    block = bytearray(256 * 2**20)
    block[:: 4096] = b"\x01" * len(block[:: 4096])  # touch every page so it becomes resident
    assert host.peak_rss_bytes() >= before + 200 * 2**20
    del block


def test_available_memory_is_plausible():
    available = host.available_memory_bytes()
    total = host.proc_field("/proc/meminfo", "MemTotal")
    assert available is not None and 0 < available <= int(total.split()[0]) * 1024


def test_unreadable_fields_give_none(monkeypatch):
    monkeypatch.setattr(host, "proc_field", lambda path, key: "not a number")
    assert host.available_memory_bytes() is None
    monkeypatch.setattr(host, "proc_field", lambda path, key: None)
    assert host.peak_rss_bytes() == resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB



def test_reset_peak_rss_starts_the_high_water_mark_from_now():
    block = bytearray(256 * 2**20)
    block[:: 4096] = b"\x01" * len(block[:: 4096])
    high = host.peak_rss_bytes()
    del block
    host.return_freed_memory()
    host.reset_peak_rss()
    assert host.peak_rss_bytes() < high - 128 * 2**20


FAULTS_OF_REPEATED_BLOCKS = """
import resource, sys, torch
from lorakit import host
if sys.argv[1] == "keep":
    assert host.keep_freed_memory()
faults = []
for _ in range(20):  # a step's large tensors, allocated, written and freed again and again
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    head, grad = torch.empty(1020, 49152), torch.empty(1020, 49152)  # 200 MB each, SmolLM2's logits
    head.fill_(1.0), grad.fill_(2.0)
    del head, grad
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[-4:]))  # the heap's layout settles in the first rounds (up to 7 seen)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_freed_memory_serves_a_steps_large_tensors_again_without_page_faults():
    """In a process of its own: the setting is process-wide."""
    def faults(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", FAULTS_OF_REPEATED_BLOCKS, mode], capture_output=True,
                              text=True, timeout=120, check=True)
        return int(done.stdout.split()[-1])

    anew = faults("default")  # the last 4 rounds' pages, mapped anew and faulted in each round
    assert anew >= 4 * 2 * 200 * 2**20 // (2 * 2**20)  # at least one fault per 2 MiB (huge pages, if on)
    assert faults("keep") < anew // 50
