"""Kernels of the tiered KV cache: chunk abstracts, 2-bit key sketches, key ellipsoids, chunk importance and selection, sparse decode attention.

(``kvquant`` dequantizes int8/int4 KV chunks coming back from the host and disk tiers; the
pipeline imports it directly, like the weight quantization references in ``quant_reference``.)

Why this package exists: these are the hot per-step operations that decide which KV chunks a decode
step reads and then read them. Each is a triplet (Triton kernel, launcher, torch reference in
``reference``); the public functions below pick one per call (``_select.pick_backend``:
``backend=`` argument, then ``TIERKV_KERNELS=torch|triton``, then Triton on CUDA). Importing this
package never requires Triton. Tests run the Triton kernels on the CPU by setting
``TRITON_INTERPRET=1`` before the first import.
"""

from tierkv.kernels.abstract import abstract_append, chunk_abstract
from tierkv.kernels.ellipsoid import Ellipsoid, key_ellipsoids
from tierkv.kernels.attention import Partials, combine_partials, decode_partials, empty_partials, sparse_decode_attention
from tierkv.kernels.importance import Selection, chunk_scores, select_chunks, sketch_candidates
from tierkv.kernels.sketch import KeySketch, encode_keys

__all__ = [
    "Ellipsoid",
    "KeySketch",
    "Partials",
    "Selection",
    "abstract_append",
    "chunk_abstract",
    "chunk_scores",
    "combine_partials",
    "decode_partials",
    "empty_partials",
    "encode_keys",
    "key_ellipsoids",
    "select_chunks",
    "sketch_candidates",
    "sparse_decode_attention",
]
