"""The engine maps the weights instead of copying them: loading costs (almost) no resident memory."""

import subprocess
import sys

from gguf_factory import write_gptoss_gguf

SCRIPT = """
import sys
from pyengine import Engine  # the package imports lazily: pay for the modules before measuring

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

before = rss()
eng = Engine(sys.argv[1], n_ctx=256, n_threads=1)
after_load = rss()
eng.eval([1])
print(after_load - before, rss() - before)
"""


def measure(path) -> tuple[int, int]:
    """(RSS growth of loading, RSS growth after one token) in a fresh process."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], cwd=path.parent, check=True,
                         capture_output=True, text=True).stdout.split()
    return int(out[0]), int(out[1])


def test_load_does_not_copy_the_weights(tmp_path):
    path = tmp_path / "big.gguf"
    write_gptoss_gguf(path, arch="gpt-oss", n_embd=256, n_ff=512, n_expert=16, n_expert_used=2,
                      n_head=4, n_head_kv=2, head_dim=64, n_layer=2)
    tiny = tmp_path / "tiny.gguf"  # same code paths, almost no weights: the fixed cost of loading
    write_gptoss_gguf(tiny, arch="gpt-oss", n_layer=2)
    size = path.stat().st_size
    assert size > 40 * 2 ** 20 and tiny.stat().st_size < 0.05 * size
    load, one_token = measure(path)
    fixed = min(measure(tiny)[0] for _ in range(2))
    assert load - fixed < 0.05 * size, f"loading grew RSS by {load} bytes ({fixed} for a tiny file) for a {size}-byte file"
    # one token reads 2 of 16 experts per layer: far from the whole file
    assert one_token < 0.5 * size, f"one token grew RSS by {one_token} bytes for a {size}-byte file"
