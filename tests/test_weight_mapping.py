"""The weight mapping asks for huge pages (MADV_HUGEPAGE, docs/forward.md "Weight mapping"): the
kernel's own record of the mapping (/proc/self/smaps VmFlags "hg") says it took the advice."""

import os
import sys

import pytest

from pyengine.model_file import open_model
from pyengine.synth import write_synth_model


def vm_flags(path: str) -> list[set[str]]:
    """VmFlags of every mapping of `path` in this process."""
    flags, current = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                current = line.rstrip("\n").split(None, 5)[-1] if len(head) >= 6 else None
            elif head and head[0] == "VmFlags:" and current == path:
                flags.append(set(head[1:]))
    return flags


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")
def test_weight_mapping_is_advised_huge_pages(tmp_path):
    path = write_synth_model(tmp_path / "t.gguf", "tiny", fast=True, seed=int.from_bytes(os.urandom(2), "little"))
    mf = open_model(path)
    flags = vm_flags(os.path.realpath(path))
    assert flags and all("hg" in f for f in flags), flags
    assert len(mf.tensors) > 0
