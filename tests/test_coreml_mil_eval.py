"""Core ML programs evaluated in numpy on Linux (edgekit.export.coreml.mil_eval) against torch eager.

Tier: per-op numerical tests. Small torch modules are converted with coremltools (iOS 18 ML
programs, fp32 and fp16), saved, reloaded with SavedProgram and compared with the eager
module: fp32 programs to ~1e-5, fp16 ones by cosine and a relative bound. Also: a KV-cache
state written in place across calls, compressed weights (int4 per block, int8 per channel,
4-bit palettes) decompressed exactly as coremltools does, a multifunction package, ops that
torch conversion does not produce (built directly in MIL), and the refusal of an unknown op.
Converting takes ~1 s a module; the file runs in ~30 s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
torch = pytest.importorskip("torch")

from coremltools.converters.mil import Builder as mb  # noqa: E402

from edgekit.errors import InputError  # noqa: E402
from edgekit.export.coreml import mil_weights  # noqa: E402
from edgekit.export.coreml.mil_eval import SavedProgram, _load_program, _numpy_dtype  # noqa: E402
from edgekit.export.coreml.torch_ops import register_index_copy  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning"),  # coremltools converts traced modules
    pytest.mark.filterwarnings("ignore:Output, .* has been renamed:UserWarning"),
]

PRECISIONS = {"fp32": ct.precision.FLOAT32, "fp16": ct.precision.FLOAT16}


def convert(module: torch.nn.Module, examples: tuple[torch.Tensor, ...], path: Path, *,
            precision: str = "fp32", states: list | None = None) -> SavedProgram:
    """torch.jit.trace -> iOS 18 ML program saved at `path` -> SavedProgram."""
    inputs = [ct.TensorType(name=f"in{i}", shape=tuple(x.shape),
                            dtype=np.int32 if not x.dtype.is_floating_point else np.float32)
              for i, x in enumerate(examples)]
    with torch.no_grad():
        traced = torch.jit.trace(module.eval(), examples)
    model = ct.convert(traced, inputs=inputs, states=states, minimum_deployment_target=ct.target.iOS18,
                       compute_precision=PRECISIONS[precision], convert_to="mlprogram")
    model.save(str(path))
    return SavedProgram(path)


def run_both(module: torch.nn.Module, examples: tuple[torch.Tensor, ...], program: SavedProgram
             ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(program outputs, eager outputs), in the module's output order."""
    outputs = program.run("main", {f"in{i}": x.numpy() for i, x in enumerate(examples)})
    with torch.no_grad():
        eager = module(*examples)
    eager = eager if isinstance(eager, tuple) else (eager,)
    return [outputs[name] for name in program.output_names()], [e.numpy() for e in eager]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def assert_matches(got: list[np.ndarray], want: list[np.ndarray], precision: str) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        if precision == "fp32" or not np.issubdtype(w.dtype, np.floating):
            np.testing.assert_allclose(g.astype(w.dtype), w, rtol=1e-5, atol=1e-5)
        else:
            assert g.dtype == np.float16  # an fp16 program computes and answers in fp16
            assert cosine(g, w) > 0.9995
            assert np.abs(g.astype(np.float32) - w).max() <= 2e-2 * max(np.abs(w).max(), 1.0)


# --- modules covering the ops a converted decoder / audio encoder holds ----------------


class Elementwise(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = (x + y) * (x - 2 * y) / (y.abs() + 1)
        b = torch.pow(x, 2) + torch.sqrt(y.abs() + 0.1) + torch.rsqrt(y.abs() + 1) - torch.exp(-x.abs())
        c = torch.tanh(x) + torch.sin(y) * torch.cos(x) + torch.sigmoid(x) + torch.relu(y) - x.neg()
        d = torch.where(x > y, x, y) + torch.maximum(x, y) - torch.minimum(x, y) + torch.clamp(x, -0.5, 0.5)
        mask = torch.logical_or(torch.logical_and(x >= 0, torch.logical_not(y < 0)),
                                torch.logical_or(x <= -1, torch.logical_or(y == 0.25, x != x)))
        e = torch.where(mask, torch.ones_like(x), -torch.ones_like(x)) * torch.div(x * 10, 3, rounding_mode="floor")
        return torch.cat([a, b, c], dim=-1), d + e


class AttentionBlock(torch.nn.Module):
    """Linear / matmul / softmax / norms / activations / reductions, as in a decoder layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(32, 96)
        self.out = torch.nn.Linear(32, 32, bias=False)
        self.norm = torch.nn.LayerNorm(32)
        self.up = torch.nn.Linear(32, 64)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v = self.qkv(x).split(32, dim=-1)
        q, k, v = (t.reshape(1, 8, 4, 8).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / 8**0.5
        causal = torch.triu(torch.full((8, 8), -1e4), diagonal=1)
        attn = torch.softmax(scores + causal, dim=-1) @ v
        h = self.out(attn.transpose(1, 2).reshape(1, 8, 32)) + x
        h = self.norm(h)
        rms = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        up = self.up(rms)
        act = torch.nn.functional.gelu(up) + torch.nn.functional.gelu(up, approximate="tanh") + torch.nn.functional.silu(up)
        stats = torch.stack([act.sum(-1), act.amax(-1), act.mean(-1)], dim=-1)
        return act, stats, torch.cumsum(rms, dim=1)


class ConvStack(torch.nn.Module):
    """An audio encoder's convolutions: conv2d subsampling, depthwise and dilated conv1d."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.sub1 = torch.nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.sub2 = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.depthwise = torch.nn.Conv1d(16, 16, 5, padding=2, groups=16)
        self.dilated = torch.nn.Conv1d(16, 8, 3, padding=2, dilation=2, bias=False)
        self.grouped = torch.nn.Conv1d(8, 8, 1, groups=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sub = self.sub2(torch.relu(self.sub1(x.unsqueeze(1))))  # [1, 4, 4, 10]
        seq = self.grouped(self.dilated(torch.nn.functional.silu(self.depthwise(x))))
        padded = torch.nn.functional.pad(seq, (1, 2))
        return sub, padded


class Lookup(torch.nn.Module):
    """Embedding / gather / strided slices / argmax / topk on int32 ids."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 16)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.embed(ids)  # [1, 6, 16]
        picked = torch.gather(x, 2, (ids.unsqueeze(-1) % 16).expand(1, 6, 3))
        strided = x[:, ::2, 1:-1:3]
        top = torch.topk(x, 3, dim=-1).values
        return picked, strided, x.argmax(dim=-1).to(torch.int32), top, x.repeat(1, 2, 1).flip(1)


ELEMENTWISE_EXAMPLES = (torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0)),
                        torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("module, examples", [
    (Elementwise(), ELEMENTWISE_EXAMPLES),
    (AttentionBlock(), (torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(2)),)),
    (ConvStack(), (torch.randn(1, 16, 40, generator=torch.Generator().manual_seed(3)),)),
], ids=["elementwise", "attention_block", "conv_stack"])
def test_program_matches_eager(module, examples, precision, tmp_path):
    program = convert(module, examples, tmp_path / "m.mlpackage", precision=precision)
    got, want = run_both(module, examples, program)
    assert_matches(got, want, precision)


def test_lookup_ops_match_eager(tmp_path):
    ids = torch.tensor([[3, 17, 0, 49, 17, 8]], dtype=torch.int32)
    module = Lookup()
    program = convert(module, (ids,), tmp_path / "lookup.mlpackage")
    got, want = run_both(module, (ids,), program)
    assert_matches(got, want, "fp32")


# --- states ------------------------------------------------------------------------------


class KVCacheWrite(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(1, 2, 8, 4))

    def forward(self, k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.k_cache.index_copy_(2, pos, k)
        return (self.k_cache * 2).sum(dim=-1)


def kv_state() -> list:
    return [ct.StateType(wrapped_type=ct.TensorType(shape=(1, 2, 8, 4), dtype=np.float16), name="k_cache")]


def test_state_writes_persist_across_runs(tmp_path):
    register_index_copy()
    register_index_copy()  # idempotent
    examples = (torch.randn(1, 2, 3, 4), torch.tensor([0, 1, 2]))  # index_copy_ takes int64; Core ML int32
    program = convert(KVCacheWrite(), examples, tmp_path / "kv.mlpackage", precision="fp16", states=kv_state())
    assert program.state_specs() == {"k_cache": ((1, 2, 8, 4), np.dtype(np.float16))}
    assert program.input_names() == ("in0", "in1")

    eager = KVCacheWrite()
    states = program.new_states()
    k_cache = states["k_cache"]
    rng = np.random.default_rng(0)
    for positions in ([0, 1, 2], [5, 3, 4]):
        k = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
        pos = np.asarray(positions, dtype=np.int32)
        (out,) = program.run("main", {"in0": k, "in1": pos}, states).values()
        with torch.no_grad():
            want = eager(torch.from_numpy(k), torch.from_numpy(pos).long()).numpy()
        assert states["k_cache"] is k_cache  # written in place, as an MLState
        np.testing.assert_allclose(k_cache.astype(np.float32), eager.k_cache.numpy(), atol=2e-3)
        np.testing.assert_allclose(out.astype(np.float32), want, rtol=5e-3, atol=1e-2)
    assert not np.any(k_cache[:, :, 6:])  # slots never written stay zero

    # without states, each call starts from fresh zeros
    (fresh,) = program.run("main", {"in0": k, "in1": pos}).values()
    assert not np.allclose(fresh.astype(np.float32), out.astype(np.float32))
    with pytest.raises(InputError, match="k_cache"):
        program.run("main", {"in0": k, "in1": pos}, {"k_cache": np.zeros((1, 2, 8, 4), np.float32)})
    with pytest.raises(InputError, match="shape"):
        program.run("main", {"in0": k[:, :, :2], "in1": pos}, states)


def test_multifunction_package_shares_states(tmp_path):
    register_index_copy()
    paths = {}
    for name, length in (("prefill", 3), ("decode", 1)):
        examples = (torch.randn(1, 2, length, 4), torch.arange(length))
        with torch.no_grad():
            traced = torch.jit.trace(KVCacheWrite().eval(), examples)
        model = ct.convert(traced, inputs=[ct.TensorType(name="k", shape=(1, 2, length, 4)),
                                           ct.TensorType(name="pos", shape=(length,), dtype=np.int32)],
                           states=kv_state(), minimum_deployment_target=ct.target.iOS18,
                           compute_precision=ct.precision.FLOAT16, convert_to="mlprogram")
        paths[name] = tmp_path / f"{name}.mlpackage"
        model.save(str(paths[name]))
    descriptor = ct.utils.MultiFunctionDescriptor()
    for name, path in paths.items():
        descriptor.add_function(str(path), src_function_name="main", target_function_name=name)
    descriptor.default_function_name = "prefill"
    ct.utils.save_multifunction(descriptor, str(tmp_path / "both.mlpackage"))

    program = SavedProgram(tmp_path / "both.mlpackage")
    assert set(program.function_names) == {"prefill", "decode"}
    assert program.state_specs("prefill") == program.state_specs("decode")
    eager = KVCacheWrite()
    states = program.new_states("prefill")
    rng = np.random.default_rng(1)
    for function, pos in (("prefill", [0, 1, 2]), ("decode", [3]), ("decode", [4])):
        k = rng.standard_normal((1, 2, len(pos), 4)).astype(np.float32)
        pos = np.asarray(pos, dtype=np.int32)
        (out,) = program.run(function, {"k": k, "pos": pos}, states).values()
        with torch.no_grad():
            want = eager(torch.from_numpy(k), torch.from_numpy(pos).long()).numpy()
        np.testing.assert_allclose(out.astype(np.float32), want, rtol=5e-3, atol=1e-2)
    with pytest.raises(InputError, match="no function 'main'"):
        program.input_names("main")


# --- compressed weights ----------------------------------------------------------------


class TwoLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Linear(64, 96)
        self.second = torch.nn.Linear(96, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.nn.functional.gelu(self.first(x)))


@pytest.fixture(scope="module")
def fp16_linear_model() -> "ct.models.MLModel":
    example = torch.randn(1, 4, 64)
    with torch.no_grad():
        traced = torch.jit.trace(TwoLinear().eval(), (example,))
    return ct.convert(traced, inputs=[ct.TensorType(name="in0", shape=(1, 4, 64))],
                      minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
                      convert_to="mlprogram")


def _compress(model, kind: str):
    from coremltools.optimize import coreml as cto

    configs = {
        "int4_per_block": cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4",
                                                      granularity="per_block", block_size=32, weight_threshold=0),
        "int8_per_channel": cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
                                                        granularity="per_channel", weight_threshold=0),
        "palette_4bit": cto.OpPalettizerConfig(mode="kmeans", nbits=4, weight_threshold=0),
    }
    config = cto.OptimizationConfig(global_config=configs[kind])
    if kind.startswith("palette"):
        return cto.palettize_weights(model, config)
    return cto.linear_quantize_weights(model, config)


@pytest.mark.parametrize("kind, steps", [("int4_per_block", 7), ("int8_per_channel", 127), ("palette_4bit", None)])
def test_compressed_weights(fp16_linear_model, kind, steps, tmp_path):
    path = tmp_path / f"{kind}.mlpackage"
    _compress(fp16_linear_model, kind).save(str(path))
    module = TwoLinear()

    # each constexpr op decompresses exactly as coremltools' own reference does
    dense = {}
    for op in _load_program(path).functions["main"].operations:
        if op.op_type.startswith("constexpr_"):
            (mine,) = mil_weights.decompress(op, {p: v.val for p, v in op.inputs.items()},
                                             (_numpy_dtype(op.outputs[0]),))
            np.testing.assert_array_equal(mine, op.materialized_val_inference())
            dense["first" if op.outputs[0].name.startswith("first") else "second"] = mine
    assert set(dense) == {"first", "second"}
    for name, weight in dense.items():
        original = getattr(module, name).weight.detach().numpy()
        if steps is not None:  # symmetric linear: within one step of the block's (row's) range
            rows = original.reshape(original.shape[0], -1, 32 if kind == "int4_per_block" else original.shape[1])
            step = np.abs(rows).max(axis=-1, keepdims=True) / steps
            assert np.all(np.abs(weight.astype(np.float32).reshape(rows.shape) - rows) <= step + 1e-3)
        assert cosine(weight, original) > 0.99

    # the program computes the eager module with those dense weights
    x = np.random.default_rng(2).standard_normal((1, 4, 64)).astype(np.float32)
    got = SavedProgram(path).run("main", {"in0": x})
    with torch.no_grad():
        module.first.weight.copy_(torch.from_numpy(dense["first"].astype(np.float32)))
        module.second.weight.copy_(torch.from_numpy(dense["second"].astype(np.float32)))
        want = module(torch.from_numpy(x)).numpy()
    (out,) = got.values()
    assert cosine(out, want) > 0.9999
    assert np.abs(out.astype(np.float32) - want).max() <= 1e-2 * np.abs(want).max()


# --- ops built directly in MIL (torch conversion does not produce them) ----------------


def _save_mil(program, path: Path) -> SavedProgram:
    model = ct.convert(program, minimum_deployment_target=ct.target.iOS18, convert_to="mlprogram",
                       compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY)
    model.save(str(path))
    return SavedProgram(path)


def test_mil_only_ops(tmp_path):
    x_np = np.arange(2 * 6 * 4, dtype=np.float32).reshape(2, 6, 4) / 10 - 2
    idx_np = np.array([4, 1, 4], dtype=np.int32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 6, 4)), mb.TensorSpec(shape=(3,), dtype=ct.converters.mil.mil.types.int32)],
                opset_version=ct.target.iOS18)
    def prog(x, idx):
        updates = mb.fill(shape=[2, 3, 4], value=1.0)
        return (
            mb.scatter(data=x, indices=idx, updates=updates, axis=1, mode="add", name="scatter_add"),
            mb.gather(x=x, indices=mb.reshape(x=mb.concat(values=[idx, idx], axis=0), shape=[2, 3]),
                      axis=1, batch_dims=1, name="gather_batched"),
            mb.gather_nd(x=x, indices=mb.const(val=np.array([[1, 5], [0, 2]], np.int32)), name="gather_nd"),
            mb.band_part(x=mb.slice_by_size(x=x, begin=[0, 0, 0], size=[1, 4, 4]), lower=1, upper=0, name="band"),
            mb.sliding_windows(x=x, axis=1, size=3, stride=2, name="windows"),
            mb.slice_by_index(x=x, begin=[1, 5, 0], end=[0, 0, 4], stride=[1, -2, 1],
                              end_mask=[True, True, False], squeeze_mask=[True, False, False], name="sliced"),
            mb.concat(values=[x, mb.mul(x=x, y=-1.0)], axis=2, interleave=True, name="interleaved"),
            mb.cumsum(x=x, axis=1, exclusive=True, reverse=True, name="cumsum"),
            mb.reshape(x=x, shape=[0, -1], name="reshape0"),
            mb.range_1d(start=1, end=mb.mul(x=mb.reduce_max(x=idx), y=2), step=3, name="range"),
            mb.slice_update(x=x, update=mb.fill(shape=[2, 2, 4], value=9.0), begin=[0, 1, 0], end=[2, 5, 4],
                            stride=[1, 2, 1], name="slice_update"),
            mb.topk(x=x, k=2, axis=-1, ascending=True, name="topk")[1],
        )

    program = _save_mil(prog, tmp_path / "ops.mlpackage")
    out = list(program.run("main", {"x": x_np, "idx": idx_np}).values())

    scattered = x_np.copy()
    np.add.at(scattered, (slice(None), idx_np), 1.0)  # index 4 twice: both adds land
    reverse_exclusive = np.flip(np.cumsum(np.flip(x_np, 1), 1), 1) - x_np
    updated = x_np.copy()
    updated[:, 1:5:2] = 9.0
    want = [
        scattered,
        np.stack([x_np[0, idx_np], x_np[1, idx_np]]),
        np.stack([x_np[1, 5], x_np[0, 2]]),
        np.tril(np.triu(x_np[0, :4], -1), 0)[None],
        np.stack([x_np[:, i:i + 3] for i in (0, 2)], axis=1),
        x_np[1, 5::-2],
        np.stack([x_np, -x_np], axis=-1).reshape(2, 6, 8),
        reverse_exclusive,
        x_np.reshape(6, 8),  # iOS 17+: a 0 copies the dim of x counted from the right (here 6)
        np.arange(1, 8, 3),
        updated,
        np.argsort(x_np, axis=-1, kind="stable")[..., :2],
    ]
    assert len(out) == len(want)
    for got, expected in zip(out, want):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_more_mil_ops_against_torch(tmp_path):
    """Attention, einsum, norms, "same" conv padding, scatter_nd and friends, on a flexible-length input."""
    from coremltools.converters.mil.mil import get_new_symbol, types

    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, 5, 8)).astype(np.float32) for _ in range(3))
    img = rng.standard_normal((1, 3, 10, 9)).astype(np.float32)
    weight = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    causal = np.tril(np.ones((5, 5), bool))
    bias = rng.standard_normal((5, 5)).astype(np.float32)
    stats = [rng.random(3).astype(np.float32) + 0.5 for _ in range(4)]
    along_indices = np.stack([np.zeros((3, 9), np.int32), np.tile(np.arange(9, dtype=np.int32) % 2, (3, 1))], axis=1)

    @mb.program(input_specs=[mb.TensorSpec(shape=q.shape), mb.TensorSpec(shape=k.shape), mb.TensorSpec(shape=v.shape),
                             mb.TensorSpec(shape=img.shape), mb.TensorSpec(shape=(get_new_symbol(), 1, 4))],
                opset_version=ct.target.iOS18)
    def prog(q, k, v, img, z):
        grid = mb.reshape(x=img, shape=[3, 10, 9])
        return (
            mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=causal),
            mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=bias),
            mb.einsum(values=(grid, mb.reshape(x=img, shape=[9, 10, 3])), equation="chw,whr->chr"),
            mb.conv(x=img, weight=weight, strides=[2, 2], pad_type="same"),
            mb.conv(x=img, weight=weight, strides=[2, 1], pad_type="same_lower", dilations=[1, 2]),
            mb.batch_norm(x=img, mean=stats[0], variance=stats[1], gamma=stats[2], beta=stats[3], epsilon=1e-3),
            mb.instance_norm(x=img, gamma=stats[2], beta=stats[3]),
            mb.erf(x=grid), mb.log(x=mb.abs(x=grid)), mb.softplus(x=grid), mb.inverse(x=grid),
            mb.mod(x=grid, y=0.7), mb.round(x=mb.mul(x=grid, y=2.0)), mb.sign(x=grid),
            mb.scatter_nd(data=grid, indices=np.array([[0, 1], [2, 9]], np.int32), updates=mb.fill(shape=[2, 9], value=5.0),
                          mode="update"),
            mb.scatter_along_axis(data=grid, indices=along_indices, updates=mb.fill(shape=[3, 2, 9], value=1.0),
                                  axis=1, mode="add"),
            mb.argsort(x=grid, axis=1),
            mb.reduce_log_sum_exp(x=grid, axes=[1]), mb.reduce_prod(x=mb.slice_by_size(x=grid, begin=[0, 0, 0],
                                                                                     size=[3, 10, 2]), axes=[2]),
            mb.softmax(x=mb.squeeze(x=z, axes=[1]), axis=0),
            mb.shape(x=z),
        )

    program = _save_mil(prog, tmp_path / "more.mlpackage")
    z = rng.standard_normal((7, 1, 4)).astype(np.float32)
    out = list(program.run("main", {"q": q, "k": k, "v": v, "img": img, "z": z}).values())

    F = torch.nn.functional
    t = {name: torch.from_numpy(a) for name, a in (("q", q), ("k", k), ("v", v), ("img", img))}
    grid = img.reshape(3, 10, 9)
    tg = torch.from_numpy(grid)
    scattered_nd = grid.copy()
    scattered_nd[0, 1] = scattered_nd[2, 9] = 5.0
    along = grid.copy()
    along[:, 0, :] += 1 + (np.arange(9) % 2 == 0)  # row 0 twice where both indices are 0
    along[:, 1, :] += np.arange(9) % 2
    want = [
        F.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=torch.from_numpy(causal)),
        F.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=torch.from_numpy(bias)),
        np.einsum("chw,whr->chr", grid, img.reshape(9, 10, 3)),
        F.conv2d(F.pad(t["img"], (0, 1, 0, 1)), torch.from_numpy(weight), stride=2),  # odd pad after
        F.conv2d(F.pad(t["img"], (1, 1, 1, 0)), torch.from_numpy(weight), stride=(2, 1), dilation=(1, 2)),
        F.batch_norm(t["img"], *(torch.from_numpy(s) for s in stats[:2]), torch.from_numpy(stats[2]),
                     torch.from_numpy(stats[3]), eps=1e-3),
        F.instance_norm(t["img"], weight=torch.from_numpy(stats[2]), bias=torch.from_numpy(stats[3])),
        torch.erf(tg), np.log(np.abs(grid) + 1e-45), F.softplus(tg), 1 / (grid + 1e-4),
        np.mod(grid, np.float32(0.7)), np.round(grid * 2), np.sign(grid),
        scattered_nd, along,
        np.argsort(-grid, axis=1, kind="stable"),
        torch.logsumexp(tg, 1), np.prod(grid[:, :, :2], axis=2),
        np.exp(z[:, 0]) / np.exp(z[:, 0]).sum(0),
        np.array([7, 1, 4], np.int32),
    ]
    assert len(out) == len(want)
    for i, (got, expected) in enumerate(zip(out, want)):
        expected = expected.numpy() if isinstance(expected, torch.Tensor) else expected
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5, err_msg=f"output {i}")
    assert program.run("main", {"q": q, "k": k, "v": v, "img": img, "z": z[:3]})[program.output_names()[-1]].tolist() == [3, 1, 4]


def test_handlers_agree_with_coremltools_value_inference():
    """The ops no test program above reaches, each built on const inputs: coremltools' own
    value inference (its numpy reference) gives the value our handler must give."""
    from edgekit.export.coreml.mil_numpy_ops import HANDLERS

    x = (np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 11.5) / 6
    unit = np.clip(x, -0.9, 0.9)
    per_channel = np.array([0.1, 0.2, 0.3], np.float32)
    cases = {
        "acos": dict(x=unit), "asin": dict(x=unit), "atan": dict(x=x), "atanh": dict(x=unit), "ceil": dict(x=x),
        "floor": dict(x=x), "cosh": dict(x=x), "sinh": dict(x=x), "tan": dict(x=unit), "exp2": dict(x=x),
        "square": dict(x=x), "relu6": dict(x=x * 5), "softsign": dict(x=x), "elu": dict(x=x, alpha=0.5),
        "leaky_relu": dict(x=x, alpha=0.2), "clamped_relu": dict(x=x, alpha=0.1, beta=1.0),
        "linear_activation": dict(x=x, alpha=2.0, beta=0.5), "scaled_tanh": dict(x=x, alpha=2.0, beta=0.5),
        "sigmoid_hard": dict(x=x, alpha=0.2, beta=0.5), "thresholded_relu": dict(x=x, alpha=0.5),
        "threshold": dict(x=x, alpha=0.5), "prelu": dict(x=x[None], alpha=per_channel[:2]),
        "softplus_parametric": dict(x=x, alpha=per_channel, beta=per_channel * 10),
        "reduce_argmin": dict(x=x, axis=1), "reduce_l1_norm": dict(x=x, axes=[2]),
        "reduce_l2_norm": dict(x=x, axes=[0, 2]), "reduce_log_sum": dict(x=np.abs(x) + 1, axes=[1]),
        "reduce_min": dict(x=x, axes=[1], keep_dims=True), "reduce_sum_square": dict(x=x),
        "flatten2d": dict(x=x, axis=2), "identity": dict(x=x), "logical_xor": dict(x=x > 0, y=x > 0.5),
        "fill": dict(shape=np.array([2, 3], np.int32), value=1.5),
    }
    checked = []

    @mb.program(input_specs=[mb.TensorSpec(shape=(1,))], opset_version=ct.target.iOS18)
    def prog(unused):
        for op_type, kwargs in cases.items():
            var = getattr(mb, op_type)(**kwargs)
            args = {param: v.val for param, v in var.op.inputs.items()}
            assert var.val is not None, op_type
            mine = np.asarray(HANDLERS[op_type](args))
            assert mine.shape == np.shape(var.val), op_type
            np.testing.assert_allclose(mine.astype(np.float64), np.asarray(var.val, np.float64), rtol=1e-5, atol=1e-6,
                                       err_msg=op_type)
            checked.append(op_type)
        return unused

    assert checked == list(cases)


def test_unknown_op_is_refused_by_name(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4, 2, 2))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.space_to_depth(x=mb.relu(x=x), block_size=2)

    model = ct.convert(prog, minimum_deployment_target=ct.target.iOS18, convert_to="mlprogram")
    model.save(str(tmp_path / "unknown.mlpackage"))
    with pytest.raises(NotImplementedError, match=r"space_to_depth \(x1\)"):
        SavedProgram(tmp_path / "unknown.mlpackage")
