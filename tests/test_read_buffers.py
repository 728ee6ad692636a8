"""The vocabulary matrices a remap reads into memory: their bytes, and memory that the
kernel does not compact for (numpy advises transparent huge pages for its large arrays;
with THP defrag `madvise`, the default of many kernels, every fault of such an array may
stall on compaction: that made remaps 1.27 x slower than memory-mapped reads)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from merge_tools.remap.checkpoints import read_checkpoint, read_matrix


def mapping_flags(address: int) -> list[str]:
    """VmFlags of the mapping of this process that holds `address` (/proc/self/smaps)."""
    current = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(part, 16) for part in head.split("-"))
            current = start <= address < end
        elif current and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_a_vocabulary_matrix_is_read_whole_into_memory_not_advised_for_huge_pages(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    values = np.random.default_rng(0).standard_normal((4096, 1024)).astype(np.float16)  # 8 MB: numpy advises huge pages
    (tmp_path / "m").mkdir()
    save_file({"model.embed_tokens.weight": values}, str(tmp_path / "m" / "model.safetensors"))
    ckpt = read_checkpoint(tmp_path / "m")
    matrix = read_matrix(ckpt, ckpt.tensors["model.embed_tokens.weight"])
    assert matrix.shape == (4096, 2048) and matrix.tobytes() == values.tobytes()
    assert not matrix.flags.writeable
    advised = np.empty(len(matrix.reshape(-1)), dtype=np.uint8)
    advised[:: 2**12] = 1
    if "hg" not in mapping_flags(advised.ctypes.data + advised.nbytes // 2):  # numpy advises the 2 MB-aligned part
        pytest.skip("this numpy does not advise huge pages for its large arrays")
    assert "hg" not in mapping_flags(matrix.ctypes.data + matrix.nbytes // 2)
