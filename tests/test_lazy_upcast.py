"""Low-memory export load: bf16 weights upcast one module at a time equal an fp32 load, bit for bit."""

from __future__ import annotations

import sys

import pytest
import torch

from edgekit.checkpoint import load
from edgekit.runtimes.mapped_pages import file_mappings

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def loads(tiny_e2b):
    from edgekit.export.lazy_upcast import load_in_checkpoint_dtype

    checkpoint = load(tiny_e2b)
    return checkpoint.reference_model(), load_in_checkpoint_dtype(checkpoint)


def test_weights_stay_in_the_checkpoint_dtype_and_buffers_equal_an_fp32_load(loads):
    reference, lazy = loads
    assert {p.dtype for p in lazy.parameters()} == {torch.bfloat16}
    ours = dict(lazy.named_buffers())
    # Computed buffers (RoPE frequencies, embedding scales, audio timescales) included: a
    # plain bf16 load rounds them (inv_timescales 0.5412 -> 0.5430).
    for name, buffer in reference.named_buffers():
        assert ours[name].dtype == torch.float32 and torch.equal(ours[name], buffer), name


def test_upcast_model_computes_what_the_fp32_load_computes(tiny_e2b):
    from edgekit.export.lazy_upcast import load_in_checkpoint_dtype, upcast_

    checkpoint = load(tiny_e2b)
    reference, lazy = checkpoint.reference_model(), upcast_(load_in_checkpoint_dtype(checkpoint))
    ids = torch.randint(10, 4000, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lazy(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_quantizing_from_bf16_equals_quantizing_from_fp32(tiny_e2b):
    """The recipe's modules (linears one by one, tables block by block) come out identical."""
    import dataclasses

    from edgekit.export.executorch.exporter import build_methods
    from edgekit.export.lazy_upcast import load_in_checkpoint_dtype
    from edgekit.manifest import METHOD_TEXT_DECODER, METHOD_TOKEN_EMBEDDING
    from edgekit.plan import make_plan
    from edgekit.profiles import load_profiles

    plan = make_plan(tiny_e2b, profile=load_profiles().get("android-flagship"), recipe_name="8da4w-emb4",
                     modalities="text,audio", context=64)
    plan = dataclasses.replace(plan, vision_token_budget=70)
    checkpoint = load(tiny_e2b)
    from_fp32, _ = build_methods(checkpoint.reference_model(), plan, seq_len=16)
    from_bf16, _ = build_methods(load_in_checkpoint_dtype(checkpoint), plan, seq_len=16)
    ids = torch.tensor([[2, 100, 4095, 7, 8]])
    with torch.no_grad():
        embeds = from_fp32[METHOD_TOKEN_EMBEDDING].module(ids)
        assert torch.equal(from_bf16[METHOD_TOKEN_EMBEDDING].module(ids), embeds)
        positions = torch.arange(ids.shape[1])
        assert torch.equal(from_bf16[METHOD_TEXT_DECODER].module(embeds, positions),
                           from_fp32[METHOD_TEXT_DECODER].module(embeds, positions))
    for name, build in from_bf16.items():  # nothing left in the checkpoint's bf16
        dtypes = {t.dtype for t in build.module.state_dict().values() if t.is_floating_point()}
        # fp16: the int4 tables' scales (and rows), stored in their scheme's 16-bit width
        assert dtypes == ({torch.float16} if name == METHOD_TOKEN_EMBEDDING else {torch.float32})


def _resident_bytes(path) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps)."""
    return sum(m.resident_bytes for m in file_mappings(path))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_PAGEOUT) is Linux's")
def test_upcast_releases_the_mapped_checkpoint_pages_it_read(tmp_path):
    """A bf16 weight mapped from a file (as transformers maps safetensors): once upcast, its
    file pages leave this process's RSS, and reading it again still gives the same values."""
    from edgekit.export.lazy_upcast import upcast_

    path = tmp_path / "weights.bin"
    values = torch.randn(4096, 2048).to(torch.bfloat16)  # 16 MiB
    values.view(torch.int16).numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=True, size=values.numel(), dtype=torch.bfloat16).view(4096, 2048)
    linear = torch.nn.Linear(2048, 4096, bias=False)
    linear.weight = torch.nn.Parameter(mapped, requires_grad=False)
    assert torch.equal(mapped, values) and _resident_bytes(path) >= 15 * 2**20  # read: all resident
    upcast_(linear)
    assert linear.weight.dtype == torch.float32 and torch.equal(linear.weight, values.float())
    assert _resident_bytes(path) < 2**20  # paged out
    assert torch.equal(mapped, values)  # and read back from the file when touched again
