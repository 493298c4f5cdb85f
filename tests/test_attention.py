"""Paged attention against plain attention over the same keys, and the batched single-query path's
batch invariance (a row's result must not depend on the rows beside it). Single-query rows have
two implementations, the C kernel and the PyTorch path: every test of them runs on both, and on
caches of every dtype (a half-size cache is read back widened; the reference reads the same)."""
from __future__ import annotations

import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

from quill import kernels
from quill.layers import attention as attention_module
from quill.layers.attention import AttentionMetadata, PagedAttention, PromptSpan, SingleQueryRows, group_by_width

HEADS, KV_HEADS, DIM, BLOCK = 6, 2, 32, 16
CPU = torch.device("cpu")


NUM_BLOCKS = 256
CACHE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# The C kernel as built here, and built without AVX-512 and F16C: the plain loops other CPUs run.
PORTABLE_FLAGS = ["-mno-avx512f", "-mno-f16c"]


@pytest.fixture(scope="module")
def portable_home(tmp_path_factory):
    return tmp_path_factory.mktemp("portable-kernels")  # a build of its own, beside the usual one


def _use_portable_build(request, monkeypatch, home) -> None:
    """Kernels built from here on come from PORTABLE_FLAGS, into `home`."""
    if platform.machine() not in ("x86_64", "AMD64") or shutil.which("cc") is None:
        pytest.skip("needs cc and x86's flags")
    monkeypatch.setenv("QUILL_HOME", str(home))
    monkeypatch.setattr(kernels, "FLAGS", kernels.FLAGS + PORTABLE_FLAGS)
    kernels._load.cache_clear()
    request.addfinalizer(kernels._load.cache_clear)


@pytest.fixture(params=["kernel", "portable kernel", "torch"])
def single_query_path(request, monkeypatch, portable_home) -> str:
    """Which implementation `_attention` gives single-query rows."""
    if request.param == "torch":
        monkeypatch.setenv("QUILL_KERNELS", "0")
    if request.param == "portable kernel":
        _use_portable_build(request, monkeypatch, portable_home)
        assert kernels.function("decode_attention", []) is not None
    return request.param


@pytest.fixture(params=CACHE_DTYPES, ids=str)
def cache_dtype(request) -> torch.dtype:
    return request.param


def _attention(window: int | None = None, cache_dtype: torch.dtype = torch.float32) -> PagedAttention:
    attention = PagedAttention(HEADS, KV_HEADS, DIM, scale=DIM ** -0.5, sliding_window=window)
    attention.bind_cache(NUM_BLOCKS * BLOCK, cache_dtype, CPU)
    attention.k_cache.normal_()
    attention.v_cache.normal_()
    return attention


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_the_c_kernel_builds_where_a_compiler_is_found(cache_dtype):
    assert _attention(cache_dtype=cache_dtype)._kernel is not None
    assert PagedAttention(HEADS, KV_HEADS, DIM, scale=1.0)._kernel is None  # no cache bound yet


def _random_tables(context_lens: list[int], generator: torch.Generator) -> list[list[int]]:
    """Disjoint, shuffled block tables (blocks are never handed out in order in a busy cache)."""
    free = torch.randperm(NUM_BLOCKS, generator=generator).tolist()
    return [[free.pop() for _ in range(-(-n // BLOCK))] for n in context_lens]


def _reference(attention: PagedAttention, q: torch.Tensor, table: list[int], context_len: int) -> torch.Tensor:
    """One query at the last position, attending its whole visible context in plain float64."""
    slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(context_len)])
    keys, values = (cache[:, slots].double() for cache in (attention.k_cache, attention.v_cache))
    first = 0 if attention.sliding_window is None else max(0, context_len - attention.sliding_window)
    out = F.scaled_dot_product_attention(q.double()[:, None], keys[:, first:], values[:, first:],
                                         scale=attention.scale, enable_gqa=True)
    return out.reshape(1, HEADS * DIM).float()


@pytest.mark.parametrize("window", [None, 40])
def test_single_query_rows_match_plain_attention(window, single_query_path, cache_dtype):
    generator = torch.Generator().manual_seed(0)
    attention = _attention(window, cache_dtype)
    context_lens = [1, 15, 16, 17, 90, 200]
    tables = _random_tables(context_lens, generator)
    q = torch.randn(len(context_lens), HEADS, DIM, generator=generator)
    out = attention._attend_single_queries(q, SingleQueryRows(None, context_lens, tables, BLOCK, CPU))
    for i, (n, table) in enumerate(zip(context_lens, tables)):
        torch.testing.assert_close(out[i:i + 1], _reference(attention, q[i], table, n), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (8, 2, 128), (4, 1, 256)])
def test_both_paths_agree_at_the_head_sizes_the_kernel_specialises(heads, kv_heads, dim, cache_dtype, monkeypatch):
    generator = torch.Generator().manual_seed(4)
    context_lens = [3, 77, 300]
    tables = _random_tables(context_lens, generator)
    q = torch.randn(len(context_lens), heads, dim, generator=generator)
    outputs = []
    for kernels_on in ("1", "0"):
        monkeypatch.setenv("QUILL_KERNELS", kernels_on)
        attention = PagedAttention(heads, kv_heads, dim, scale=dim ** -0.5, sliding_window=100)
        attention.bind_cache(NUM_BLOCKS * BLOCK, cache_dtype, CPU)
        attention.k_cache.copy_(torch.randn(attention.k_cache.shape, generator=torch.Generator().manual_seed(5)))
        attention.v_cache.copy_(torch.randn(attention.v_cache.shape, generator=torch.Generator().manual_seed(6)))
        outputs.append(attention._attend_single_queries(q, SingleQueryRows(None, context_lens, tables, BLOCK, CPU)))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 40])
def test_single_query_rows_do_not_depend_on_the_batch(window, single_query_path, cache_dtype):
    generator = torch.Generator().manual_seed(1)
    attention = _attention(window, cache_dtype)
    for _ in range(20):
        rows = int(torch.randint(2, 12, (), generator=generator))
        context_lens = torch.randint(1, 320, (rows,), generator=generator).tolist()
        tables = _random_tables(context_lens, generator)
        q = torch.randn(rows, HEADS, DIM, generator=generator)
        batched = attention._attend_single_queries(q, SingleQueryRows(None, context_lens, tables, BLOCK, CPU))
        for i in range(rows):
            alone = attention._attend_single_queries(q[i:i + 1], SingleQueryRows(None, context_lens[i:i + 1],
                                                                                 tables[i:i + 1], BLOCK, CPU))
            assert torch.equal(alone, batched[i:i + 1]), (context_lens, i)


@pytest.mark.parametrize("window", [None, 40])
def test_a_prompts_rows_attended_together_equal_each_row_alone(window, single_query_path, cache_dtype):
    """Consecutive positions of one sequence (a prompt attended as rows, which the kernel takes in
    tiles that share each block's reads): every row is bit-identical to decoding that position."""
    generator = torch.Generator().manual_seed(5)
    attention = _attention(window, cache_dtype)
    (table,) = _random_tables([150], generator)
    lens = list(range(1, 151))
    q = torch.randn(len(lens), HEADS, DIM, generator=generator)
    together = attention._attend_single_queries(q, SingleQueryRows(None, lens, [table] * len(lens), BLOCK, CPU))
    for start in (0, 7, 63, 149):  # tiles begin and end anywhere
        alone = attention._attend_single_queries(q[start:start + 1],
                                                 SingleQueryRows(None, lens[start:start + 1], [table], BLOCK, CPU))
        assert torch.equal(alone, together[start:start + 1]), start
    chunk = attention._attend_single_queries(q[60:100], SingleQueryRows(None, lens[60:100], [table] * 40, BLOCK, CPU))
    assert torch.equal(chunk, together[60:100])  # a later chunk of the same prompt


def test_rows_of_very_different_widths_are_attended_in_groups():
    assert group_by_width([5, 5, 6, 5]) == [[0, 1, 2, 3]]  # too little padding to pay for a group
    assert group_by_width([40, 1, 2, 1, 39]) == [[1, 3, 2], [4, 0]]
    assert group_by_width([1] * 8 + [9] * 8 + [30]) == [list(range(8)), list(range(8, 16)), [16]]


def test_grouped_rows_equal_one_padded_group(monkeypatch):
    monkeypatch.setenv("QUILL_KERNELS", "0")  # groups are the PyTorch path's
    generator = torch.Generator().manual_seed(3)
    attention = _attention()
    context_lens = [5, 600, 20, 310, 3, 590]
    tables = _random_tables(context_lens, generator)
    q = torch.randn(len(context_lens), HEADS, DIM, generator=generator)
    rows = SingleQueryRows(None, context_lens, tables, BLOCK, CPU)
    grouped = attention._attend_single_queries(q, rows)
    assert len(rows.key_groups(None, KV_HEADS, attention.k_cache.shape[1])) > 1
    monkeypatch.setattr(attention_module, "GROUP_COST_IN_ROW_BLOCKS", 10 ** 9)
    padded = attention._attend_single_queries(q, SingleQueryRows(None, context_lens, tables, BLOCK, CPU))
    assert torch.equal(grouped, padded)


def test_mixed_step_writes_the_cache_and_attends_both_kinds(single_query_path, cache_dtype):
    """A prompt chunk continuing a cached context, next to a decoding row: each output row equals
    plain attention over what its query can see, and the new keys/values land in their slots."""
    generator = torch.Generator().manual_seed(2)
    attention = _attention(cache_dtype=cache_dtype)
    decode_len, prompt_len, prompt_new = 40, 50, 8
    decode_table, prompt_table = _random_tables([decode_len, prompt_len], generator)
    slot = lambda table, p: table[p // BLOCK] * BLOCK + p % BLOCK  # noqa: E731
    # rows: the prompt chunk's 8 queries, then the decoding row
    slot_mapping = [slot(prompt_table, p) for p in range(prompt_len - prompt_new, prompt_len)]
    slot_mapping.append(slot(decode_table, decode_len - 1))
    context_slots = torch.tensor([slot(prompt_table, p) for p in range(prompt_len)])
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping),
        single_query=SingleQueryRows(torch.tensor([prompt_new]), [decode_len], [decode_table], BLOCK, CPU),
        prompts=[PromptSpan(0, prompt_new, prompt_len, context_slots)],
    )
    q = torch.randn(prompt_new + 1, HEADS, DIM, generator=generator)
    k = torch.randn(prompt_new + 1, KV_HEADS, DIM, generator=generator)
    v = torch.randn(prompt_new + 1, KV_HEADS, DIM, generator=generator)
    out = attention(q, k, v, meta)
    assert torch.equal(attention.k_cache[:, slot_mapping], k.transpose(0, 1).to(cache_dtype))
    assert torch.equal(attention.v_cache[:, slot_mapping], v.transpose(0, 1).to(cache_dtype))
    torch.testing.assert_close(out[-1:], _reference(attention, q[-1], decode_table, decode_len), atol=1e-5, rtol=1e-5)
    for i in range(prompt_new):
        position = prompt_len - prompt_new + i
        expected = _reference(attention, q[i], prompt_table, position + 1)
        torch.testing.assert_close(out[i:i + 1], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 64, 20])  # 20: the window cuts into the prompt (explicit mask)
def test_fresh_prompt_matches_plain_attention(window, cache_dtype):
    """Also with a half-size cache: the prompt attends its own keys as the cache holds them (the
    reference reads them back from the cache), as a later chunk or decoding step will see them."""
    generator = torch.Generator().manual_seed(3)
    attention = _attention(window, cache_dtype)
    length = 40
    (table,) = _random_tables([length], generator)
    slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(length)])
    q = torch.randn(length, HEADS, DIM, generator=generator)
    k = torch.randn(length, KV_HEADS, DIM, generator=generator)
    v = torch.randn(length, KV_HEADS, DIM, generator=generator)
    meta = AttentionMetadata(slot_mapping=slots, single_query=None,
                             prompts=[PromptSpan(0, length, length, context_slots=None)])
    out = attention(q, k, v, meta)
    for i in range(length):
        torch.testing.assert_close(out[i:i + 1], _reference(attention, q[i], table, i + 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build", ["kernel", "portable kernel"])
def test_cache_writes_store_the_bits_pytorch_would(build, cache_dtype, request, monkeypatch, portable_home):
    """The C store rounds as PyTorch's conversion does, at the edges of float16 too: overflow to
    infinity, subnormals, signed zeros."""
    if build == "portable kernel":
        _use_portable_build(request, monkeypatch, portable_home)
    generator = torch.Generator().manual_seed(7)
    tokens = 40
    kv = torch.randn(tokens, 2 * KV_HEADS, DIM, generator=generator)
    kv *= torch.logspace(-9, 5, tokens)[:, None, None]  # from float16's subnormals past its largest value
    kv[0, 0, :4] = torch.tensor([-0.0, 0.0, 65504.0, 65520.0])
    k, v = kv[:, :KV_HEADS], kv[:, KV_HEADS:]  # strided views, as attention gets them
    slots = torch.randperm(NUM_BLOCKS * BLOCK, generator=generator)[:tokens]
    caches = []
    for switch in ("1", "0"):
        monkeypatch.setenv("QUILL_KERNELS", switch)
        attention = _attention(cache_dtype=cache_dtype)
        assert (attention._store_kernel is None) == (switch == "0")
        attention._store(k, v, slots)
        caches.append(torch.stack([attention.k_cache[:, slots], attention.v_cache[:, slots]]))
    assert torch.equal(caches[0].view(torch.uint8), caches[1].view(torch.uint8))
