"""bench.memory.tensor_peak: the allocator's peak of live tensor bytes, against a hand count."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.memory import mark, tensor_peak  # noqa: E402

MIB = 1 << 20


def test_tensor_peak_is_the_largest_sum_of_live_tensors():
    before = torch.zeros(MIB // 4)  # made before the call: not counted, and freeing it takes nothing off

    def fn():
        nonlocal before
        a = torch.empty(MIB // 4)  # 1 MiB
        b = torch.empty(MIB // 2)  # 2 MiB          live: 3 MiB
        del a                      #                live: 2 MiB
        mark("first")              #                peak so far: 3 MiB
        c = torch.empty(3 * MIB // 8)  # 1.5 MiB    live: 3.5 MiB (the peak)
        del b, c, before
        d = torch.empty(MIB // 4)  # 1 MiB
        return d

    res = tensor_peak(fn)
    assert res["tensor_peak_bytes"] == 3 * MIB + MIB // 2
    assert res["marks"] == {"first": 3 * MIB}
