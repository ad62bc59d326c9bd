"""vpmoe.hostmem: freed large buffers are reused, not faulted in again at every step (the point of the setting)."""

import subprocess
import sys

import pytest

# A step's worth of [512 x 201,088] fp32 buffers (logits and log-probabilities, 412 MB each), sixteen times; prints
# the minor page faults of the last eight (the heap needs a few steps to hold free blocks of every alignment).
PROGRAM = """
import resource, sys, torch
torch.set_num_threads(1)  # allocations on the main thread (the main arena), as a training step makes them
if sys.argv[1] == "keep":
    from vpmoe.hostmem import keep_freed_memory
    assert keep_freed_memory()
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.log_softmax(torch.ones(512, 201088), dim=-1)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[8:]))
"""
PAGES = 8 * 2 * 512 * 201088 * 4 // 4096  # two buffers per step, eight steps


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_step_buffers_are_reused_instead_of_faulted_in_again():
    assert faults("default") > PAGES // 2  # glibc maps and unmaps each buffer: its pages fault in every step
    assert faults("keep") < PAGES // 20
