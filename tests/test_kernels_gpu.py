"""Every kernel compiled by Triton on CUDA against its torch reference, at Llama-3-8B-like and odd shapes.

Why this file exists: the other tests/test_kernels_*.py run the Triton kernels through the CPU
interpreter on small shapes. What the interpreter cannot show is the code the compiler emits for a
real GPU (bf16 dots, masked loads, int64 offsets past 2**31 bytes, block sizes picked for large C)
at the sizes a decode step uses: 8 KV heads x 4 query heads, D=128, a 32K-token context in chunks of
16 or 64, batch 1 and 4. All tests are marked ``gpu``: the default run includes them where CUDA
is available and conftest skips them, with the reason, elsewhere; ``scripts/gpu_check.sh`` runs them.

Compiled, not interpreted: tests/conftest.py sets TRITON_INTERPRET=1 before any kernel module is
imported, so the kernels in ``tierkv.kernels`` are interpreter objects for the whole session (an
interpreted kernel given CUDA tensors silently copies them to the host and back). The fixture
``kernels`` therefore loads fresh copies of the kernel modules with TRITON_INTERPRET=0 (Triton
reads it when ``triton.jit`` decorates) and puts the session's modules back; a test asserts the
copies hold compiled ``JITFunction`` kernels. Each test also runs with TRITON_INTERPRET=0, because
Triton consults it again while compiling (``constexpr_function``).

Tolerances are derived from fp32 rounding of the sums each kernel computes, so a wrong channel,
token, head or chunk fails: abstracts and selections must be equal (selections as sets per
sequence and KV head), scores within 2e-5 of the sum of |terms|, attention outputs within 5e-5
(fp32) or 1e-2 (bf16) relative L2 per head. ``test_tolerances_catch_an_off_by_one_slot_length``
shows that both bounds catch an off-by-one in slot lengths at 32K.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F

from tierkv.kernels import encode_keys
from tierkv.kernels.ellipsoid import causal_variances, no_moments
from tierkv.kernels.reference import (
    Selection,
    abstract_append_ref,
    chunk_abstract_ref,
    chunk_scores_ref,
    select_chunks_ref,
    sparse_decode_attention_ref,
)

pytestmark = pytest.mark.gpu

KERNEL_MODULES = ("tierkv.kernels.ellipsoid", "tierkv.kernels.sketch", "tierkv.kernels.abstract",
                  "tierkv.kernels.importance", "tierkv.kernels.attention",
                  "tierkv.kernels.kvquant")  # ellipsoid, sketch first: importance imports them
DTYPES = [torch.float32, torch.bfloat16]
SCORE_TOL = 2e-5                                           # x sum_d |q_d| (|kmin_d| + |kmax_d|)
ATTN_TOL = {torch.float32: 5e-5, torch.bfloat16: 1e-2}    # relative L2 error per (sequence, query head)
BUDGET = 0.05                                              # of the context, as the sparse KV default
SINK_CHUNKS = 1
DEVICE = "cuda"


@dataclass(frozen=True)
class Case:
    """One geometry: B sequences of T tokens, Hkv KV heads of G query heads each, head dim D.

    Chunks hold S tokens (the last one partial when S does not divide T) or, with ``variable``,
    random sizes in [1, S] (adaptive chunking; S is then the slot capacity).
    """

    name: str
    B: int
    Hkv: int
    G: int
    D: int
    T: int
    S: int
    variable: bool = False

    @property
    def Hq(self) -> int:
        return self.Hkv * self.G

    def sizes(self) -> list[int]:
        """Tokens per chunk, summing to T."""
        if not self.variable:
            return [self.S] * (self.T // self.S) + ([self.T % self.S] if self.T % self.S else [])
        gen = torch.Generator().manual_seed(self.T)
        sizes, left = [], self.T
        while left:
            sizes.append(min(left, int(torch.randint(1, self.S + 1, (1,), generator=gen))))
            left -= sizes[-1]
        return sizes


LLAMA = [Case(f"llama8b-32k-c{S}-b{B}", B, 8, 4, 128, 32768, S) for B in (1, 4) for S in (16, 64)]
ODD = [
    Case("odd-b3-h3x3-d40-var", 3, 3, 3, 40, 4000, 40, variable=True),  # ragged sizes, G and D not powers of 2
    Case("odd-b2-h1x7-d72-c24", 2, 1, 7, 72, 4099, 24),                 # partial last chunk, one KV head
    Case("odd-b1-h2x1-d7-c64", 1, 2, 1, 7, 33, 64),                     # a single partial chunk, D < 16
]
CASES = [pytest.param(c, id=c.name) for c in LLAMA + ODD]
LLAMA_CASES = [pytest.param(c, id=c.name) for c in LLAMA]
DTYPE_PARAMS = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in DTYPES]


# ---------------------------------------------------------------------------------------------
# compiled kernels and the CUDA environment


def _load_compiled() -> dict[str, ModuleType]:
    """Fresh copies of the kernel modules, decorated while TRITON_INTERPRET=0; the session's are put back."""
    import tierkv.kernels as package

    saved_modules = {name: sys.modules.pop(name) for name in KERNEL_MODULES if name in sys.modules}
    saved_attrs = {name: getattr(package, name.rsplit(".", 1)[1], None) for name in KERNEL_MODULES}
    saved_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        return {name.rsplit(".", 1)[1]: importlib.import_module(name) for name in KERNEL_MODULES}
    finally:
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
        sys.modules.update(saved_modules)
        for name, module in saved_attrs.items():
            if module is not None:
                setattr(package, name.rsplit(".", 1)[1], module)


@pytest.fixture(scope="module")
def kernels() -> SimpleNamespace:
    """The public kernel functions, bound to compiled Triton kernels (see the module docstring)."""
    from tierkv.kernels._select import HAS_TRITON

    if not HAS_TRITON:
        pytest.fail("triton is not installed: the compiled kernels cannot be checked (pip install triton)")
    mods = _load_compiled()
    return SimpleNamespace(
        modules=mods,
        chunk_abstract=mods["abstract"].chunk_abstract,
        abstract_append=mods["abstract"].abstract_append,
        chunk_scores=mods["importance"].chunk_scores,
        select_chunks=mods["importance"].select_chunks,
        sparse_decode_attention=mods["attention"].sparse_decode_attention,
        decode_partials=mods["attention"].decode_partials,
        combine_partials=mods["attention"].combine_partials,
        empty_partials=mods["attention"].empty_partials,
        KeySketch=mods["sketch"].KeySketch,
        key_ellipsoids=mods["ellipsoid"].key_ellipsoids,
        ellipsoid_scores=mods["ellipsoid"].ellipsoid_scores,
    )


@pytest.fixture(autouse=True)
def _cuda_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Compile with the interpreter off and keep the fp32 references in full fp32 (no TF32)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("TIERKV_KERNELS", raising=False)
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# inputs


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _keys(case: Case, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """(B, Hkv, T, D) keys with a few wide channels, like post-RoPE keys with outlier channels."""
    keys = torch.randn(case.B, case.Hkv, case.T, case.D, device=DEVICE, generator=_gen(seed))
    keys[..., : max(1, case.D // 16)] *= 4.0
    return keys.to(dtype)


def _query(case: Case, dtype: torch.dtype, seed: int, gain: float = 1.0) -> torch.Tensor:
    return (gain * torch.randn(case.B, case.Hq, case.D, device=DEVICE, generator=_gen(seed))).to(dtype)


def _chunk_geometry(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts (C,) int32, sizes (C,) int32) on CUDA."""
    sizes = torch.tensor(case.sizes(), dtype=torch.int32)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)[:-1]]).to(torch.int32)
    return starts.to(DEVICE), sizes.to(DEVICE)


def _slotted(x: torch.Tensor, starts: torch.Tensor, sizes: torch.Tensor, S: int, fill: float) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, C, S, D): chunk c in slot c, positions past its size set to ``fill``."""
    offs = torch.arange(S, device=x.device)
    token = (starts.long().view(-1, 1) + offs).clamp(max=x.shape[2] - 1)  # (C, S)
    out = x[:, :, token.view(-1)].view(*x.shape[:2], starts.shape[0], S, x.shape[3]).clone()
    out[:, :, offs.view(1, S) >= sizes.view(-1, 1).long()] = fill
    return out


def _n_chunks(case: Case, C: int) -> torch.Tensor | None:
    """Ragged batch: sequence b holds its first C - b*C//5 chunks (None for batch 1)."""
    if case.B == 1:
        return None
    return torch.tensor([max(1, C - b * (C // 5)) for b in range(case.B)], dtype=torch.int32, device=DEVICE)


def _valid_chunks(C: int, n_chunks: torch.Tensor | None, B: int) -> torch.Tensor:
    """(B, 1, C) bool: the chunks each sequence holds (all C without ``n_chunks``)."""
    if n_chunks is None:
        return torch.ones(B, 1, C, dtype=torch.bool, device=DEVICE)
    return (torch.arange(C, device=DEVICE) < n_chunks.view(B, 1, 1))


def _budget(case: Case) -> int:
    return max(1, int(BUDGET * case.T))


def _magnitude(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, C): max over the group of sum_d |q_d| (|kmin_d| + |kmax_d|), the size of the summed terms."""
    B, Hq, D = q.shape
    Hkv = kmin.shape[1]
    qa = q.float().abs().view(B, Hkv, Hq // Hkv, D)
    return torch.einsum("bhgd,bhcd->bhgc", qa, kmin.float().abs() + kmax.float().abs()).amax(2)


# ---------------------------------------------------------------------------------------------
# comparisons


def _assert_scores_close(got: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor) -> None:
    """Same -inf pattern; finite scores within SCORE_TOL of the magnitude of their terms."""
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref)) and not torch.isnan(got).any()
    finite = torch.isfinite(ref)
    excess = ((got - ref).abs() - SCORE_TOL * mag - 1e-6)[finite]
    assert excess.max().item() <= 0, f"score error exceeds tolerance by {excess.max().item():.3g}"


def _row_sets(sel: Selection) -> list[set[int]]:
    """Selected chunk ids per (sequence, KV head), read from ``ids[:counts]``, checked against ``mask``."""
    ids, counts, mask = sel.ids.cpu(), sel.counts.cpu(), sel.mask.cpu()
    C = ids.shape[-1]
    rows = []
    for row_ids, n, row_mask in zip(ids.view(-1, C), counts.view(-1).tolist(), mask.view(-1, C)):
        listed = row_ids[:n].tolist()
        assert listed == sorted(set(listed)) and (row_ids[n:] == -1).all(), "ids: ascending, then -1"
        assert set(listed) == set(row_mask.nonzero().view(-1).tolist()), "ids disagree with mask"
        rows.append(set(listed))
    return rows


def _assert_same_selection(got: Selection, ref: Selection) -> None:
    """The same chunk set for every (sequence, KV head)."""
    assert got.mask.dtype == torch.bool and got.ids.dtype == got.counts.dtype == torch.int32
    got_sets, ref_sets = _row_sets(got), _row_sets(ref)
    bad = [i for i, (g, r) in enumerate(zip(got_sets, ref_sets)) if g != r]
    if bad:
        g, r = got_sets[bad[0]], ref_sets[bad[0]]
        pytest.fail(f"{len(bad)} rows differ; row {bad[0]}: only Triton {sorted(g - r)[:8]}, only torch {sorted(r - g)[:8]}")
    assert torch.equal(got.counts, ref.counts)


def _assert_same_selection_up_to_near_ties(got: Selection, ref: Selection, ref_scores: torch.Tensor,
                                           forced: torch.Tensor, tol: torch.Tensor) -> None:
    """Sets equal except for candidates whose reference score ties the selection boundary within 2*tol.

    Selections from two score tensors that differ by rounding (<= tol) can only swap chunks whose
    scores straddle the boundary: the lowest selected and highest unselected candidate. Forced
    chunks must always agree.
    """
    _row_sets(got)
    cand = torch.isfinite(ref_scores) & ~forced
    s_in = torch.where(ref.mask & cand, ref_scores, float("inf")).amin(-1, keepdim=True)
    s_out = torch.where(~ref.mask & cand, ref_scores, float("-inf")).amax(-1, keepdim=True)
    slack = 2 * tol.amax(-1, keepdim=True)
    near = cand & (ref_scores >= s_in - slack) & (ref_scores <= s_out + slack)
    diff = got.mask ^ ref.mask
    assert not (diff & ~near).any(), f"{int((diff & ~near).sum())} chunks differ away from the selection boundary"


def _attention_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest relative L2 error over (sequence, query head) rows; rows where ref is zero must be zero."""
    ref32, got32 = ref.float(), got.float()
    norm = ref32.norm(dim=-1)
    empty = norm == 0
    assert (got32[empty] == 0).all(), "rows without tokens must give zeros"
    err = (got32 - ref32).norm(dim=-1)[~empty] / norm[~empty]
    return err.max().item() if err.numel() else 0.0


def _pool(keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor, sizes: torch.Tensor, S: int,
          seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunk slots (N = B*C, Hkv, S, D) in a shuffled order, NaN past each slot's tokens.

    Returns k_pool, v_pool, slot_lens (N,), slot_of (B, C) int64: the slot holding chunk c of sequence b.
    """
    B, H, _, D = keys.shape
    C = starts.shape[0]
    slot_of = torch.randperm(B * C, device=DEVICE, generator=_gen(seed)).view(B, C)
    k_pool = torch.empty(B * C, H, S, D, dtype=keys.dtype, device=DEVICE)
    v_pool = torch.empty_like(k_pool)
    k_pool[slot_of.view(-1)] = _slotted(keys, starts, sizes, S, float("nan")).transpose(1, 2).reshape(B * C, H, S, D)
    v_pool[slot_of.view(-1)] = _slotted(values, starts, sizes, S, float("nan")).transpose(1, 2).reshape(B * C, H, S, D)
    slot_lens = torch.empty(B * C, dtype=torch.int32, device=DEVICE)
    slot_lens[slot_of.view(-1)] = sizes.repeat(B)
    return k_pool, v_pool, slot_lens, slot_of


def _table(sel: Selection, slot_of: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot table (B, Hkv, width) int32 from a selection's chunk ids (-1 past counts), and counts."""
    B, H, _ = sel.ids.shape
    ids = sel.ids[..., :width].long()
    slots = slot_of.gather(1, ids.clamp(min=0).reshape(B, -1)).view(B, H, width)
    return torch.where(ids >= 0, slots, -1).to(torch.int32).contiguous(), sel.counts


# ---------------------------------------------------------------------------------------------
# the kernels are compiled


def test_kernels_are_compiled_for_cuda(kernels: SimpleNamespace) -> None:
    """The copies hold JITFunctions (not the interpreter) and the wrappers pick Triton for CUDA tensors."""
    from triton.runtime.jit import JITFunction

    from tierkv.kernels._select import pick_backend

    found = [obj for mod in kernels.modules.values() for name, obj in vars(mod).items()
             if name.startswith("_") and name.endswith("_kernel")]
    assert len(found) >= 6 and all(isinstance(k, JITFunction) for k in found), [type(k).__name__ for k in found]
    x = torch.zeros(1, device="cuda")
    assert all(pick_backend(k, x) == "triton" for k in found)
    import tierkv.kernels as package

    for name, fresh in kernels.modules.items():  # the session's (interpreted) modules are back in place
        assert sys.modules[f"tierkv.kernels.{name}"] is getattr(package, name) is not fresh


# ---------------------------------------------------------------------------------------------
# abstracts


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", CASES)
def test_chunk_abstract(kernels: SimpleNamespace, case: Case, dtype: torch.dtype) -> None:
    keys = _keys(case, dtype, seed=1)
    starts, _ = _chunk_geometry(case)
    shape = (case.B, case.Hkv, starts.shape[0], case.D)
    out = (torch.full(shape, float("nan"), dtype=dtype, device=DEVICE),
           torch.full(shape, float("nan"), dtype=dtype, device=DEVICE))
    kmin, kmax = kernels.chunk_abstract(keys, starts, out=out, backend="triton")
    ref_min, ref_max = chunk_abstract_ref(keys, starts)
    assert kmin is out[0] and kmax is out[1]
    assert torch.equal(kmin, ref_min) and torch.equal(kmax, ref_max)  # min and max are exact


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", [LLAMA_CASES[-1], pytest.param(ODD[0], id=ODD[0].name)])
def test_chunk_abstract_strided_keys_int64_starts(kernels: SimpleNamespace, case: Case, dtype: torch.dtype) -> None:
    """Keys as a (B, Hkv, T, D) view of a (B, T, Hkv, D) buffer, int64 chunk starts."""
    keys = _keys(case, dtype, seed=2).transpose(1, 2).contiguous().transpose(1, 2)
    starts = _chunk_geometry(case)[0].long()
    got = kernels.chunk_abstract(keys, starts, backend="triton")
    for g, r in zip(got, chunk_abstract_ref(keys.contiguous(), starts)):
        assert torch.equal(g, r)


@pytest.mark.parametrize("n_new", [1, 7])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", CASES)
def test_abstract_append(kernels: SimpleNamespace, case: Case, dtype: torch.dtype, n_new: int) -> None:
    """Decode appends into the open (last) chunk, then opens a fresh one; equals a full recompute."""
    keys = _keys(case, dtype, seed=3)
    starts, _ = _chunk_geometry(case)
    C = starts.shape[0]
    extra = torch.randn(case.B, case.Hkv, 2 * n_new, case.D, device=DEVICE, generator=_gen(4)).to(dtype)
    lo = torch.full((case.B, case.Hkv, C + 1, case.D), float("nan"), dtype=dtype, device=DEVICE)
    hi = lo.clone()
    lo[:, :, :C], hi[:, :, :C] = chunk_abstract_ref(keys, starts)
    ref_lo, ref_hi = lo.clone(), hi.clone()
    kernels.abstract_append(lo, hi, extra[:, :, :n_new], chunk=C - 1, backend="triton")
    abstract_append_ref(ref_lo, ref_hi, extra[:, :, :n_new], C - 1, False)
    for got, ref in ((lo, ref_lo), (hi, ref_hi)):  # exact; chunk C is still NaN on both sides
        torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
    kernels.abstract_append(lo, hi, extra[:, :, n_new:], chunk=-1, fresh=True, backend="triton")
    abstract_append_ref(ref_lo, ref_hi, extra[:, :, n_new:], C, True)
    assert torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi)
    full_starts = torch.cat([starts, torch.tensor([case.T + n_new], dtype=starts.dtype, device=DEVICE)])
    full = chunk_abstract_ref(torch.cat([keys, extra], dim=2), full_starts)
    assert torch.equal(lo, full[0]) and torch.equal(hi, full[1])


# ---------------------------------------------------------------------------------------------
# scores and the key sketch


def _abstracts(case: Case, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """keys, starts, sizes, kmin, kmax (reference abstracts) for one case."""
    keys = _keys(case, dtype, seed)
    starts, sizes = _chunk_geometry(case)
    return (keys, starts, sizes, *chunk_abstract_ref(keys, starts))


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", CASES)
def test_chunk_scores(kernels: SimpleNamespace, case: Case, dtype: torch.dtype) -> None:
    _, _, _, kmin, kmax = _abstracts(case, dtype, seed=5)
    q = _query(case, dtype, seed=6)
    n_chunks = _n_chunks(case, kmin.shape[2])
    out = torch.full(kmin.shape[:3], float("nan"), device=DEVICE)
    got = kernels.chunk_scores(q, kmin, kmax, n_chunks=n_chunks, out=out, backend="triton")
    assert got is out
    _assert_scores_close(got, chunk_scores_ref(q, kmin, kmax, n_chunks), _magnitude(q, kmin, kmax))


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", CASES)
def test_chunk_scores_with_sketch(kernels: SimpleNamespace, case: Case, dtype: torch.dtype) -> None:
    """Token-level bound from 2-bit codes of the closed chunks (all but the open last one)."""
    keys, starts, sizes, kmin, kmax = _abstracts(case, dtype, seed=7)
    C = starts.shape[0]
    codes = encode_keys(_slotted(keys, starts, sizes, case.S, 0.0), kmin, kmax)  # (B, Hkv, C, S, P)
    sketch = kernels.KeySketch(codes, sizes, C - 1)
    q = _query(case, dtype, seed=8)
    n_chunks = _n_chunks(case, C)
    got = kernels.chunk_scores(q, kmin, kmax, sketch=sketch, n_chunks=n_chunks, backend="triton")
    ref = kernels.chunk_scores(q, kmin, kmax, sketch=sketch, n_chunks=n_chunks, backend="torch")
    mag = _magnitude(q, kmin, kmax)
    _assert_scores_close(got, ref, 2 * mag)  # sketch terms sum to at most 2x the chunk-bound terms
    coarse = chunk_scores_ref(q, kmin, kmax, n_chunks)
    assert (got <= coarse + SCORE_TOL * 2 * mag + 1e-6).all()  # never looser than the chunk bound
    logits = torch.einsum("bhgd,bhtd->bhgt", q.float().view(case.B, case.Hkv, case.G, case.D), keys.float())
    token_peak = logits.amax(2)  # (B, Hkv, T), max over the group
    idx = torch.repeat_interleave(torch.arange(C, device=DEVICE), sizes.long())
    peak = torch.full_like(coarse, float("-inf")).scatter_reduce_(2, idx.expand_as(token_peak), token_peak, "amax")
    valid = torch.isfinite(coarse)
    assert (got >= peak - SCORE_TOL * 2 * mag - 1e-4)[valid].all()  # still an upper bound on every logit


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", CASES)
def test_chunk_scores_two_stage_sketch(kernels: SimpleNamespace, case: Case, dtype: torch.dtype) -> None:
    """The coarse bound ranks the coded chunks, the compiled sketch kernel (a grid over the candidates)
    bounds the best K, the rest are -inf: the same as the torch path, and still upper bounds."""
    keys, starts, sizes, kmin, kmax = _abstracts(case, dtype, seed=9)
    C = starts.shape[0]
    codes = encode_keys(_slotted(keys, starts, sizes, case.S, 0.0), kmin, kmax)  # (B, Hkv, C, S, P)
    sketch = kernels.KeySketch(codes, sizes, C - 1)
    q = _query(case, dtype, seed=10)
    K = max(1, (C - 1) // 5)
    got = kernels.chunk_scores(q, kmin, kmax, sketch=sketch, candidates=K, backend="triton")
    ref = kernels.chunk_scores(q, kmin, kmax, sketch=sketch, candidates=K, backend="torch")
    _assert_scores_close(got, ref, 2 * _magnitude(q, kmin, kmax))
    kept = torch.isfinite(got[..., :C - 1])
    assert (kept.sum(-1) == min(K, C - 1)).all()                                  # K candidates, the rest pruned
    logits = torch.einsum("bhgd,bhtd->bhgt", q.float().view(case.B, case.Hkv, case.G, case.D), keys.float())
    idx = torch.repeat_interleave(torch.arange(C, device=DEVICE), sizes.long())
    peak = torch.full_like(got, float("-inf")).scatter_reduce_(2, idx.expand(case.B, case.Hkv, -1),
                                                               logits.amax(2), "amax")
    mag = _magnitude(q, kmin, kmax)
    assert (got >= peak - SCORE_TOL * 2 * mag - 1e-4)[torch.isfinite(got)].all()


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", LLAMA_CASES)
def test_ellipsoid_scores(kernels: SimpleNamespace, case: Case, dtype: torch.dtype) -> None:
    """The compiled ellipsoid bound equals the torch reference and bounds every key of its chunk."""
    keys, starts, sizes, kmin, kmax = _abstracts(case, dtype, seed=11)
    C = starts.shape[0] - 1                                                       # the closed chunks: full
    full = keys[:, :, :C * case.S].reshape(case.B, case.Hkv, C, case.S, case.D)
    ell = kernels.key_ellipsoids(full, dtype)
    q = _query(case, dtype, seed=12)
    got = kernels.ellipsoid_scores(q, ell, backend="triton")                     # (B, Hkv, G, C)
    ref = kernels.ellipsoid_scores(q, ell, backend="torch")
    mag = (q.float().abs().view(case.B, case.Hkv, case.G, 1, case.D) * ell.centre.float().abs().unsqueeze(2)).sum(-1) \
        + ref.abs()
    assert ((got - ref).abs() <= SCORE_TOL * mag + 1e-5).all()
    logits = torch.einsum("bhgd,bhcsd->bhgcs", q.float().view(case.B, case.Hkv, case.G, case.D), full.float())
    assert (got >= logits.amax(-1) - SCORE_TOL * mag - 1e-4).all()


@pytest.mark.parametrize("budget", [0.05, 0.10])
def test_the_two_stage_estimator_finds_the_needle_on_cuda(kernels: SimpleNamespace, budget: float) -> None:
    """A key holding half of one query head's attention: the compiled default estimator selects its chunk."""
    from tierkv.kernels.quality import plant_needle

    T, S, H, G, D = 4096, 32, 2, 2, 64
    C, budget_tokens = T // S, math.ceil(budget * T)
    candidates = kernels.modules["importance"].sketch_candidates(budget_tokens - 2 * S, S, 2)
    sizes = torch.full((C,), S, dtype=torch.int32, device=DEVICE)
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        k = torch.randn(1, H, T, D, generator=g)
        k[..., :2] *= 3.0
        q = torch.randn(1, H * G, D, generator=g)
        q = q / q.norm(dim=-1, keepdim=True) * math.sqrt(D)
        pos = int(torch.randint(2 * S, T - 2 * S, (1,), generator=g))
        for h in range(H):
            plant_needle(q[0, h * G], k[0, h], pos, 1, 0.5, D**-0.5)
        q, k = q.to(DEVICE), k.to(DEVICE)
        kmin, kmax = chunk_abstract_ref(k, torch.arange(0, T, S, device=DEVICE))
        chunked = k.view(1, H, C, S, D)
        variance = causal_variances(chunked, no_moments(1, H, D, DEVICE))[0]
        sketch = kernels.KeySketch(encode_keys(chunked, kmin, kmax), sizes, C - 1,
                                   kernels.key_ellipsoids(chunked, k.dtype, variance))
        scores = kernels.chunk_scores(q, kmin, kmax, sketch=sketch, candidates=candidates, backend="triton")
        sel = kernels.select_chunks(scores, sizes, budget_tokens=budget_tokens, recent_tokens=S, backend="triton")
        assert bool(sel.mask[0, :, pos // S].all()), (seed, pos)


# ---------------------------------------------------------------------------------------------
# selection


SELECT_CASES = CASES + [pytest.param(Case("llama8b-128k-c16-b1", 1, 8, 4, 128, 131072, 16), id="llama8b-128k-c16-b1")]


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", SELECT_CASES)
def test_select_chunks(kernels: SimpleNamespace, case: Case, dtype: torch.dtype, ties: bool) -> None:
    """Same scores in, same chunk sets out: sink, recent window and the best chunks within 5% of T."""
    _, sizes = _chunk_geometry(case)
    C = sizes.shape[0]
    scores = torch.randn(case.B, case.Hkv, C, device=DEVICE, generator=_gen(9)) * 20
    if ties:  # many equal scores: both sides must break ties by chunk id
        scores = scores.round()
    scores = scores.to(dtype)
    n_chunks = _n_chunks(case, C)
    chunk_tokens = sizes if not case.variable else torch.stack([sizes.roll(b) for b in range(case.B)])  # (B, C)
    args = dict(budget_tokens=_budget(case), sink_chunks=SINK_CHUNKS, recent_tokens=case.S, n_chunks=n_chunks)
    out = Selection(torch.ones(case.B, case.Hkv, C, dtype=torch.bool, device=DEVICE),
                    torch.full((case.B, case.Hkv, C), -7, dtype=torch.int32, device=DEVICE),
                    torch.full((case.B, case.Hkv), -7, dtype=torch.int32, device=DEVICE))
    got = kernels.select_chunks(scores, chunk_tokens, out=out, backend="triton", **args)
    ref = select_chunks_ref(scores, chunk_tokens.expand(case.B, C), args["budget_tokens"], SINK_CHUNKS, case.S,
                            n_chunks)
    _assert_same_selection(got, ref)
    tokens = chunk_tokens.expand(case.B, C).unsqueeze(1)  # (B, 1, C)
    forced = select_chunks_ref(scores, chunk_tokens.expand(case.B, C), 0, SINK_CHUNKS, case.S, n_chunks).mask
    forced_tokens = (forced * tokens).sum(-1)
    assert (got.mask >= forced).all()  # sinks and the recent window always
    assert ((got.mask * tokens).sum(-1) <= torch.clamp(forced_tokens, min=args["budget_tokens"])).all()
    biggest = torch.where(_valid_chunks(C, n_chunks, case.B) & ~forced, tokens, 0).amax(-1)
    room = (args["budget_tokens"] - forced_tokens >= biggest) & (biggest > 0)  # the best candidate fits
    assert (got.counts > forced.sum(-1))[room].all()  # ... so chunks were chosen beside the forced ones
    if case.T >= 1000:
        assert room.any(), "the budget should leave room beside the forced chunks"


# ---------------------------------------------------------------------------------------------
# sparse decode attention


def _attention_inputs(case: Case, dtype: torch.dtype, seed: int) -> SimpleNamespace:
    """q (peaked: logits of std ~2.5), K/V, their shuffled slot pool, and a 5%-budget reference selection."""
    keys, starts, sizes, kmin, kmax = _abstracts(case, dtype, seed)
    values = torch.randn(keys.shape, device=DEVICE, generator=_gen(seed + 1)).to(dtype)
    q = _query(case, dtype, seed + 2, gain=2.5)
    k_pool, v_pool, slot_lens, slot_of = _pool(keys, values, starts, sizes, case.S, seed + 3)
    scores = chunk_scores_ref(q, kmin, kmax, None)
    sel = select_chunks_ref(scores, sizes.expand(case.B, -1), _budget(case), SINK_CHUNKS, case.S, None)
    return SimpleNamespace(q=q, keys=keys, values=values, k_pool=k_pool, v_pool=v_pool, slot_lens=slot_lens,
                           slot_of=slot_of, sel=sel, C=starts.shape[0])


def _table_width(case: Case, C: int) -> int:
    """Table width as the pipeline trims it (sinks + 2 recent + budget // S); the full C for ragged sizes."""
    return C if case.variable else min(C, SINK_CHUNKS + 2 + _budget(case) // case.S)


@pytest.mark.parametrize("split_tokens", [512, 64, 1])   # 1: one chunk per split, the tiered cache's reduction
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", CASES)
def test_sparse_decode_attention(kernels: SimpleNamespace, case: Case, dtype: torch.dtype, split_tokens: int) -> None:
    x = _attention_inputs(case, dtype, seed=10)
    table, counts = _table(x.sel, x.slot_of, _table_width(case, x.C))
    assert int(counts.max()) <= table.shape[-1]
    counts = counts.clone()
    if case.B * case.Hkv > 1:
        counts[-1, -1] = 0  # a (sequence, KV head) with nothing selected gives zeros
    out = torch.full_like(x.q, float("nan"))
    got = kernels.sparse_decode_attention(x.q, x.k_pool, x.v_pool, table, counts, x.slot_lens,
                                          split_tokens=split_tokens, out=out, backend="triton")
    ref = sparse_decode_attention_ref(x.q, x.k_pool, x.v_pool, table, counts, x.slot_lens, 1 / math.sqrt(case.D))
    assert got is out and got.dtype == dtype and torch.isfinite(got).all()
    assert _attention_error(got, ref) < ATTN_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", LLAMA_CASES + [pytest.param(ODD[0], id=ODD[0].name)])
def test_all_chunks_selected_equals_dense_sdpa(kernels: SimpleNamespace, case: Case, dtype: torch.dtype) -> None:
    """With every chunk in the table, sparse attention is dense attention (PyTorch SDPA, fp32) over the context."""
    x = _attention_inputs(case, dtype, seed=20)
    table = x.slot_of.view(case.B, 1, x.C).expand(case.B, case.Hkv, x.C).flip(-1).to(torch.int32).contiguous()
    counts = torch.full((case.B, case.Hkv), x.C, dtype=torch.int32, device=DEVICE)
    got = kernels.sparse_decode_attention(x.q, x.k_pool, x.v_pool, table, counts, x.slot_lens, backend="triton")
    dense = torch.cat([  # per sequence: keeps the fp32 K/V copies of the 4-sequence cases small
        F.scaled_dot_product_attention(x.q[b:b + 1, :, None].float(), x.keys[b:b + 1].float(),
                                       x.values[b:b + 1].float(), enable_gqa=True)[:, :, 0]
        for b in range(case.B)])
    assert _attention_error(got, dense) < 2 * ATTN_TOL[dtype]  # SDPA's own fp32 rounding on top


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", LLAMA_CASES)
def test_partials_from_a_temporary_pool_give_the_resident_bits(kernels: SimpleNamespace, case: Case,
                                                               dtype: torch.dtype) -> None:
    """Compiled: the selection's chunks split between the slot pool and a temporary pool in another
    order (what an overflowing step reads from the host and disk) combine to the bits of the
    all-resident call with one chunk per split (placement invariance on CUDA)."""
    x = _attention_inputs(case, dtype, seed=12)
    table, counts = _table(x.sel, x.slot_of, _table_width(case, x.C))
    K = kernels
    whole = K.sparse_decode_attention(x.q, x.k_pool, x.v_pool, table, counts, x.slot_lens, split_tokens=1,
                                      backend="triton")
    n = x.k_pool.shape[0]
    away = torch.arange(n, device=DEVICE) % 3 == 1
    moved = away.nonzero().view(-1).flip(0)                       # a different slot order in the temporary pool
    where = torch.full((n,), -1, dtype=torch.int32, device=DEVICE)
    where[moved] = torch.arange(len(moved), dtype=torch.int32, device=DEVICE)
    parts = K.empty_partials(case.B, x.q.shape[1], table.shape[-1], case.D, x.q.device)
    K.decode_partials(x.q, x.k_pool, x.v_pool, torch.where(away[table.long()], -1, table), counts, x.slot_lens,
                      parts, backend="triton")
    K.decode_partials(x.q, x.k_pool[moved].contiguous(), x.v_pool[moved].contiguous(), where[table.long()], counts,
                      x.slot_lens[moved].contiguous(), parts, backend="triton")
    assert torch.equal(K.combine_partials(parts, dtype, backend="triton"), whole)


@pytest.mark.parametrize("case", [LLAMA_CASES[0]])
def test_tolerances_catch_an_off_by_one_slot_length(case: Case) -> None:
    """The attention tolerances are sharp enough: dropping the last token of every slot exceeds both."""
    x = _attention_inputs(case, torch.float32, seed=30)
    table, counts = _table(x.sel, x.slot_of, _table_width(case, x.C))
    scale = 1 / math.sqrt(case.D)
    ref = sparse_decode_attention_ref(x.q, x.k_pool, x.v_pool, table, counts, x.slot_lens, scale)
    short = sparse_decode_attention_ref(x.q, x.k_pool, x.v_pool, table, counts, x.slot_lens - 1, scale)
    err = _attention_error(short, ref)
    assert err > 10 * ATTN_TOL[torch.float32] and err > 2 * ATTN_TOL[torch.bfloat16], err


# ---------------------------------------------------------------------------------------------
# the decode-step pipeline


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", LLAMA_CASES)
def test_decode_step_pipeline(kernels: SimpleNamespace, case: Case, dtype: torch.dtype) -> None:
    """abstracts -> sketch scores -> selection -> sparse attention, all compiled, against all-torch.

    Selections from two score tensors agree as sets up to chunks tied at the selection boundary
    within the score tolerance; attention is then compared on the same table.
    """
    x = _attention_inputs(case, dtype, seed=40)
    starts, sizes = _chunk_geometry(case)
    K = kernels
    kmin, kmax = K.chunk_abstract(x.keys, starts, backend="triton")
    ref_min, ref_max = chunk_abstract_ref(x.keys, starts)
    assert torch.equal(kmin, ref_min) and torch.equal(kmax, ref_max)
    sketch = K.KeySketch(encode_keys(_slotted(x.keys, starts, sizes, case.S, 0.0), kmin, kmax), sizes, x.C - 1)
    scores = K.chunk_scores(x.q, kmin, kmax, sketch=sketch, backend="triton")
    ref_scores = K.chunk_scores(x.q, ref_min, ref_max, sketch=sketch, backend="torch")
    tol = SCORE_TOL * 2 * _magnitude(x.q, kmin, kmax) + 1e-6
    _assert_scores_close(scores, ref_scores, 2 * _magnitude(x.q, kmin, kmax))
    args = dict(budget_tokens=_budget(case), sink_chunks=SINK_CHUNKS, recent_tokens=case.S)
    sel = K.select_chunks(scores, sizes, backend="triton", **args)
    ref_sel = K.select_chunks(ref_scores, sizes, backend="torch", **args)
    forced = select_chunks_ref(ref_scores, sizes.expand(case.B, -1), 0, SINK_CHUNKS, case.S, None).mask
    _assert_same_selection_up_to_near_ties(sel, ref_sel, ref_scores, forced, tol)
    table, counts = _table(sel, x.slot_of, _table_width(case, x.C))
    got = K.sparse_decode_attention(x.q, x.k_pool, x.v_pool, table, counts, x.slot_lens, backend="triton")
    ref = sparse_decode_attention_ref(x.q, x.k_pool, x.v_pool, table, counts, x.slot_lens, 1 / math.sqrt(case.D))
    assert _attention_error(got, ref) < ATTN_TOL[dtype]


# ---------------------------------------------------------------------------------------------
# int8/int4 KV chunks (kv_quant): packed on the host, rebuilt in device slots


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_dequantize_kv(kernels: SimpleNamespace, scheme: str, dtype: torch.dtype) -> None:
    """A pinned packed chunk dequantized into CUDA views (Llama-8B-like: 8 KV heads, D=128, 64 tokens;
    odd: 3 heads, D=72, 17 of 40 rows) equals the reference's fp32 math up to one rounding of the output."""
    kvq = kernels.modules["kvquant"]
    for h, t, d, n in ((8, 64, 128, 64), (3, 40, 72, 17)):
        k, v = (torch.randn(h, t, d, device=DEVICE) * 3 for _ in range(2))
        layout = kvq.KVQuantLayout(scheme, h, t, d)
        packed = kvq.quantize_kv(k, v, layout, n).cpu().pin_memory()
        out = [torch.full((h, t, d), math.nan, device=DEVICE, dtype=dtype) for _ in range(2)]
        kvq.dequantize_kv(packed, layout, *out, backend="triton")
        ref = [torch.empty(h, t, d, device=DEVICE) for _ in range(2)]
        kvq.dequantize_kv_ref(packed.to(DEVICE), layout, *ref)
        for o, r in zip(out, ref):
            torch.testing.assert_close(o.float(), r.to(dtype).float(), rtol=1e-5 if dtype == torch.float32 else 8e-3,
                                       atol=1e-6)
