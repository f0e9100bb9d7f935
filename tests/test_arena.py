"""The forward pass's scratch memory (csrc/arena.h) is taken from the C library once per size, not
once per layer: a first long prompt must not fault its buffers in again in every layer."""

import threading

from gguf_factory import write_gptoss_gguf
from pyengine import Engine
from pyengine import _model


def first_and_second_pass_allocs(path, n_prompt: int) -> tuple[int, int]:
    """Blocks the arena of a fresh thread took for a first n_prompt-token forward pass, and for a
    second one of the same size."""
    eng = Engine(str(path), n_ctx=512, n_threads=2)
    out: list[int] = []

    def run() -> None:  # a new thread: a new, empty arena
        before = _model.arena_system_allocs()
        eng.eval(list(range(1, n_prompt + 1)))
        out.append(_model.arena_system_allocs() - before)
        eng.reset()
        eng.eval(list(range(2, n_prompt + 2)))
        out.append(_model.arena_system_allocs() - before - out[0])

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out[0], out[1]


def test_layers_reuse_the_arenas_blocks(tmp_path):
    counts = {}
    for n_layer in (2, 6):
        path = tmp_path / f"l{n_layer}.gguf"
        write_gptoss_gguf(path, arch="gpt-oss", expert_type="mxfp4", wtype="q8_0", n_embd=128, n_ff=128,
                          n_layer=n_layer, n_expert=8, n_expert_used=2, n_head=4, n_head_kv=2, head_dim=32,
                          n_vocab=400)
        counts[n_layer] = first_and_second_pass_allocs(path, 200)
    (first2, second2), (first6, second6) = counts[2], counts[6]
    assert first2 > 0
    # four more layers take no block of their own: each reuses what the layer before gave back
    assert first6 == first2, counts
    # the second pass of the same size finds one block as large as the first pass's high-water mark
    assert second2 == 0 and second6 == 0, counts


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_a_threads_arena_is_freed_when_it_ends(tmp_path):
    """The node runs a model's passes on a thread of its own, one per loaded model: each thread that
    ends must give its arena back (it held ~12 MB here, hundreds of MB after a long prompt of the
    20b), or RSS grows with every model loaded."""
    path = tmp_path / "m.gguf"
    write_gptoss_gguf(path, arch="gpt-oss", expert_type="mxfp4", wtype="q8_0", n_embd=256, n_ff=256, n_layer=2,
                      n_expert=8, n_expert_used=2, n_head=4, n_head_kv=2, head_dim=64, n_vocab=400)
    eng = Engine(str(path), n_ctx=512, n_threads=2)

    def two_passes() -> None:  # the second pass touches the block the first one grew
        for _ in range(2):
            eng.reset()
            eng.eval(list(range(1, 400)))

    def threads(n: int) -> None:
        for _ in range(n):
            t = threading.Thread(target=two_passes)
            t.start()
            t.join()

    threads(4)  # the C library's per-thread heaps settle
    before = rss()
    threads(8)
    grown = rss() - before
    # kept, each thread's arena was ~12.6 MB of RSS: ~100 MB over 8 threads
    assert grown < 30 * 2 ** 20, f"RSS grew by {grown / 2 ** 20:.1f} MiB over 8 threads"
