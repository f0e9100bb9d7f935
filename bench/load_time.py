"""Load-to-ready time and resident memory, pyengine vs llama.cpp, on one GGUF.

    python bench/load_time.py pyengine|llama.cpp MODEL.gguf [--no-extra-bufts]

Prints the seconds from process start (imports included) to a loaded model, the RSS after loading
and after 11 evaluated tokens, and the peak RSS. Run each engine in its own process."""

import argparse
import resource
import time


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("engine", choices=["pyengine", "llama.cpp"])
    ap.add_argument("model", help="a .gguf file")
    ap.add_argument("--no-extra-bufts", action="store_true",
                    help="llama.cpp: without its repacked CPU buffers")
    args = ap.parse_args()
    engine, path = args.engine, args.model
    t0 = time.perf_counter()
    if engine == "pyengine":
        import pyengine

        model = pyengine.Engine(path, n_ctx=4096, n_threads=2)
    else:
        from pyengine.llama_cpp_peer import open_llama

        model = open_llama(path, extra_bufts=not args.no_extra_bufts, n_ctx=4096, n_threads=2,
                           verbose=False)
    loaded, rss_loaded = time.perf_counter() - t0, rss()
    model.eval([1, 2, 3])
    for _ in range(8):
        model.eval([5])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"{engine}: load {loaded:.2f} s (imports included), RSS after load {rss_loaded / 2**30:.2f} GiB, "
          f"after 11 tokens {rss() / 2**30:.2f} GiB, peak {peak / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
