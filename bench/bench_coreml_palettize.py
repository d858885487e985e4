"""Core ML weight compression for a decoder linear: int4 per block (what the recipes use) or a
4-bit palette (coremltools' k-means palettization), size and error side by side.

    .venv/bin/python bench/bench_coreml_palettize.py [--rows 6144] [--columns 1536] [--weights laplace]

One linear of E2B's MLP width (6144 x 1536), random weights (normal or heavier-tailed
laplace: no real checkpoint here), converted to an fp16 ML program and compressed each way
by coremltools; every program is read back and evaluated in numpy (export/coreml/mil_eval.py)
on the same 64 random inputs. Prints the weight file's bits per weight, the relative RMS
error of the outputs against the fp32 linear, and the seconds coremltools took.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import header

WAYS = {
    "fp16": None,
    "int4, block 32 (recipe int4)": ("linear", dict(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                                    block_size=32)),
    "int4, block 128 (recipe int4-b128)": ("linear", dict(mode="linear_symmetric", dtype="int4",
                                                          granularity="per_block", block_size=128)),
    "palette 4-bit, one per 16 rows": ("palette", dict(mode="kmeans", nbits=4, granularity="per_grouped_channel",
                                                       group_size=16)),
    # (one palette per row: 4.18 bits, error 0.118, 344 s for this one matrix: left out)
}


def _program(weight: torch.Tensor, way, out: Path) -> float:
    import coremltools as ct
    from coremltools.optimize import coreml as cto

    from edgekit.export.coreml.torch_ops import coremltools_quiet

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False).eval()
    linear.weight.data = weight
    example = torch.zeros(1, weight.shape[1])
    with torch.no_grad(), coremltools_quiet():
        model = ct.convert(torch.jit.trace(linear, example), convert_to="mlprogram",
                           minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
                           inputs=[ct.TensorType("x", shape=example.shape)])
        start = time.perf_counter()
        if way is not None:
            kind, options = way
            if kind == "linear":
                config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(weight_threshold=0, **options))
                model = cto.linear_quantize_weights(model, config)
            else:
                config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(weight_threshold=0, **options))
                model = cto.palettize_weights(model, config)
        seconds = time.perf_counter() - start
        model.save(str(out))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6144)
    parser.add_argument("--columns", type=int, default=1536)
    parser.add_argument("--weights", choices=("normal", "laplace"), default="laplace")
    args = parser.parse_args()
    from edgekit.export.coreml.mil_eval import SavedProgram

    rng = np.random.default_rng(0)
    draw = rng.laplace if args.weights == "laplace" else rng.normal
    weight = torch.from_numpy(draw(0.0, 0.02, (args.rows, args.columns)).astype(np.float32))
    x = rng.standard_normal((64, args.columns)).astype(np.float32)
    reference = x @ weight.numpy().T
    print(header("Core ML: int4 blocks vs 4-bit palettes", packages=("torch", "coremltools")))
    print(f"linear {args.rows} x {args.columns}, {args.weights} weights, 64 inputs\n")
    print(f"| compression | bits per weight | output relative RMS error | coremltools seconds |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, way) in enumerate(WAYS.items()):
            path = Path(tmp) / f"{index}.mlpackage"
            seconds = _program(weight, way, path)
            weight_bytes = sum(f.stat().st_size for f in path.rglob("weight.bin"))
            program = SavedProgram(path)
            out = np.concatenate([program.run("main", {"x": row[None]})[program.output_names()[0]] for row in x])
            error = float(np.sqrt(np.mean((out - reference) ** 2) / np.mean(reference ** 2)))
            print(f"| {name} | {8 * weight_bytes / weight.numel():.3f} | {error:.4f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
