# cython: language_level=3, boundscheck=False, wraparound=False
"""The one hot loop of GGUF parsing: walking (and later decoding) arrays of length-prefixed strings.

A gpt-oss vocabulary holds 201,088 tokens and 446,189 merges; walking their u64 length prefixes in
Python costs a noticeable fraction of a second, here it costs a few milliseconds. Every length is
checked against the end of the buffer before it is used, so a corrupt file raises, never reads
out of bounds."""

import numpy as np

cimport numpy as cnp
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

cnp.import_array()


def scan_strings(const unsigned char[::1] buf, Py_ssize_t offset, Py_ssize_t count):
    """Offsets of `count` GGUF strings (u64 little-endian length + bytes) starting at `offset`.

    Returns an int64 array of count + 1 entries: entry i is where string i's length field starts,
    the last entry is the first byte after the array. Raises ValueError when a string runs past
    the end of the buffer."""
    cdef Py_ssize_t end = buf.shape[0]
    cdef cnp.ndarray[int64_t, ndim=1] out = np.empty(count + 1, dtype=np.int64)
    cdef int64_t[::1] offs = out
    cdef Py_ssize_t i, pos = offset
    cdef uint64_t n
    if offset < 0 or offset > end:
        raise ValueError("string array starts outside the file")
    with nogil:
        for i in range(count):
            if end - pos < 8:
                break
            offs[i] = pos
            memcpy(&n, &buf[pos], 8)  # GGUF is little-endian, as is every host we build for
            pos += 8
            if n > <uint64_t>(end - pos):
                break
            pos += <Py_ssize_t>n
        else:
            i = count
    if i != count:
        raise ValueError(f"string {i} of {count} runs past the end of the file")
    offs[count] = pos
    return out


def decode_strings(const unsigned char[::1] buf, const int64_t[::1] offsets, str errors="replace"):
    """Decode the strings that `scan_strings` located into a list of str (invalid UTF-8 replaced)."""
    cdef Py_ssize_t i, n = offsets.shape[0] - 1
    cdef bytes err = errors.encode()
    cdef const char *errs = err
    out = [None] * n
    for i in range(n):
        out[i] = PyUnicode_DecodeUTF8(<const char *>&buf[offsets[i] + 8],
                                      offsets[i + 1] - offsets[i] - 8, errs)
    return out
