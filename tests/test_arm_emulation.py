"""aarch64 tier: the torch-free Pi install on a Raspberry Pi's CPU, under emulation.

Every other test runs on x86. A Pi is aarch64, and a Pi 4's Cortex-A72 has neither dotprod
nor i8mm (a Pi 5's Cortex-A76 has dotprod, not i8mm): a wheel built for a newer core dies
there with an illegal instruction. Here an arm64 Debian bookworm root (Raspberry Pi OS 12's
base; tests/arm_root.sh) gets the base install, no torch, from aarch64 wheels alone, and
runs tiny pi4 and pi5 bundles exported on x86 under QEMU as a Cortex-A72 and as a
Cortex-A76: the greedy tokens must be x86's. Emulation speed means nothing: nothing here
is timed.

Needs root, Debian's qemu-user-static, debootstrap and binfmt-support (.ci/run installs
them), and network to a Debian mirror and to the package index; skips with the reason
otherwise. Marked `arm_emulation`, which `make test` leaves out: .ci/run builds the root in
the background while the main suite runs, then runs this file (`make test-arm`).

Cost on a 2-core x86 machine (measured): the root's first build 4.5-6 min (debootstrap,
cached in .cache/arm64-root, ~300 MB; the first run took 7 min 53 s in all), then each run
1.5-4 min, as the machine's load decides: a checkpoint and two exports on x86 (~1.5 min,
beside the venv's install under emulation, 40-70 s), then 15-20 s of emulated runs per CPU.
"""

from __future__ import annotations

import json
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, ExportJob, run_cli

pytestmark = pytest.mark.arm_emulation

SCRIPT = ROOT / "tests" / "arm_root.sh"
ARM_ROOT = ROOT / ".cache" / "arm64-root"  # .gitignore'd; reused while its recipe holds
VENV = "/opt/edgekit"  # the venv arm_root.sh installs, seen from inside the root
SPEECH = ROOT / "tests" / "assets" / "speech_en.wav"
PICTURE = "picture.png"  # written by the bundles fixture (edgekit.export.verify's test image)
PROMPT = "Hello from a Raspberry Pi"
CPUS = ("cortex-a72", "cortex-a76")  # Pi 4, Pi 5

# Linux's AT_HWCAP / AT_HWCAP2 bits (arch/arm64/include/uapi/asm/hwcap.h), which QEMU sets
# from -cpu and which onnxruntime's cpuinfo reads to choose its kernels.
HWCAP_FPHP, HWCAP_ASIMDDP, HWCAP2_I8MM = 1 << 9, 1 << 20, 1 << 13
PI_FEATURES = {  # (fp16 arithmetic, dotprod, i8mm), as the Pis' CPUs have them
    "cortex-a72": (False, False, False),
    "cortex-a76": (True, True, False),
}

# Logits differ between CPUs: int4 weights multiply int8-quantized activations
# (accuracy_level 4), and x86's AVX kernels, the A76's dotprod kernels and the A72's plain
# NEON path each round their own way. On this tiny model x86 and ARM logits differ by up to
# 0.2 (cosine >= 0.9989, measured), far less than int4 differs from fp32 (verify: cosine
# 0.972). So greedy tokens agree only where a step wins by more than that: a repetition
# penalty, tried here to vary the answer, met a 1e-5 tie at step 5 and split x86 from ARM.
MIN_COSINE = 0.995

# The same script on x86 and inside the root. For each (bundle, prompt, media): the greedy
# tokens, as `edgekit run` picks them, and the logits of every forward call (saved as .npy
# in OUT), read by wrapping the backend's forward. Also the CPU features the process saw,
# and whether torch can be imported.
_GREEDY = """
import importlib.util, json, struct, sys
from pathlib import Path
import numpy as np
from edgekit.runtimes import load
from edgekit.runtimes.sampling import SamplingParams
cases, out = json.loads(sys.argv[1]), Path(sys.argv[2])
tokens = []
for i, (bundle, prompt, media) in enumerate(cases):
    engine = load(bundle)
    rows, forward = [], engine.backend.forward
    def recorded(*args, **kwargs):
        logits = forward(*args, **kwargs)
        rows.append(np.array(logits[-1], np.float32))
        return logits
    engine.backend.forward = recorded
    content = [*({"type": k, k: path} for k, path in media.items()), {"type": "text", "text": prompt}] if media else prompt
    sampling = SamplingParams(temperature=0.0, max_new_tokens=8)
    "".join(engine.generate([{"role": "user", "content": content}], sampling=sampling))
    tokens.append(engine.last_token_ids)
    np.save(out / f"logits-{i}.npy", np.stack(rows))
with open("/proc/self/auxv", "rb") as f:
    auxv = dict(struct.iter_unpack("QQ", f.read()))
print(json.dumps({"tokens": tokens, "hwcap": auxv.get(16, 0), "hwcap2": auxv.get(26, 0),
                  "torch": importlib.util.find_spec("torch") is not None}))
"""


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """tests/arm_root.sh ARGS; its exit status 77 (this machine cannot) skips the test."""
    result = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    if result.returncode == 77:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    return result


def _in_root(cpu: str, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    result = _script("run", str(ARM_ROOT), cpu, *argv, timeout=timeout)
    assert "Illegal instruction" not in result.stderr, result.stderr[-4000:]
    assert result.returncode == 0, f"{argv} on {cpu} exited {result.returncode}:\n{result.stderr[-4000:]}"
    return result


# --- the root, the wheels, the bundles ---------------------------------------------------

@pytest.fixture(scope="module")
def arm_root() -> Path:
    # The first build takes 4.5-6 min (measured); later runs only check the tools and
    # binfmt_misc.
    result = _script("build", str(ARM_ROOT), timeout=3600)
    assert result.returncode == 0, result.stderr[-4000:]
    return ARM_ROOT


@pytest.fixture(scope="module")
def target_python(arm_root) -> tuple[str, str]:
    """(CPython version, glibc version) of the root: the wheels are chosen for these."""
    out = _in_root("cortex-a72", "python3", "-c",
                   "import platform, sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}', "
                   "platform.libc_ver()[1])").stdout.split()
    return out[0], out[1]


@pytest.fixture(scope="module")
def wheelhouse(target_python, tmp_path_factory) -> Path:
    """The project's wheel (pure Python, from this checkout) and its dependencies' aarch64
    wheels, downloaded on x86: binaries only, so nothing is compiled on the device and a
    dependency without an aarch64 wheel fails here."""
    python, glibc = target_python
    minor = int(glibc.split(".")[1])
    out = tmp_path_factory.mktemp("aarch64-wheels")
    pip = [sys.executable, "-m", "pip"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-4000:]
    # pip does not widen a manylinux_2_N tag to older glibc versions: name each one.
    platforms = [f"--platform=manylinux_2_{m}_aarch64" for m in range(17, minor + 1)]
    target = ["--only-binary=:all:", f"--python-version={python}", "--implementation=cp",
              f"--abi=cp{python.replace('.', '')}", *platforms, "--platform=manylinux2014_aarch64"]
    # numpy publishes aarch64 wheels: if this fails, the index is out of reach, not the project.
    probe = subprocess.run([*pip, "download", "-q", "--no-deps", "--timeout=30", "--retries=1",
                            "-d", str(tmp_path_factory.mktemp("probe")), *target, "numpy"],
                           capture_output=True, text=True, timeout=600)
    if probe.returncode != 0:
        lines = probe.stderr.strip().splitlines() or [""]
        why = next((line for line in lines if "Error" in line), lines[-1])[:240]
        pytest.skip(f"cannot emulate arm64 here: the package index does not answer ({why})")
    wheel = next(out.glob("gemma_edgekit-*.whl"))
    fetched = subprocess.run([*pip, "download", "-q", "-d", str(out), *target, str(wheel)],
                             capture_output=True, text=True, timeout=1200)
    assert fetched.returncode == 0, f"no aarch64 wheel for a base dependency:\n{fetched.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def bundles(arm_root, wheelhouse, tmp_path_factory) -> dict[str, Path]:
    """Tiny pi4 (text, audio) and pi5 (text, audio, vision) bundles exported on x86 with
    each profile's own recipe and modalities (int4-b128; the audio encoder int8: the kernels
    where dotprod and i8mm code lives), while the venv installs in the root; and a picture."""
    from edgekit.export.verify import test_image
    from edgekit.models.gemma4.presets import PRESETS
    from edgekit.testing.checkpoint_writer import make_checkpoint

    # Seed 0: every greedy step below wins by >= 0.5 logits (measured), beyond the CPUs'
    # differences (MIN_COSINE's comment). Seed 3, whose answer prints, wins by 0.018.
    checkpoint = make_checkpoint(PRESETS["tiny-e2b"], tmp_path_factory.mktemp("ckpt") / "tiny-e2b", seed=0)
    out = tmp_path_factory.mktemp("pi-bundles")
    cli = [sys.executable, "-m", "edgekit", "export", str(checkpoint), "--json"]
    jobs = {name: ExportJob([*cli, "--device", device, "-o", str(out / f"{name}.edgekit")], out / f"{name}.edgekit")
            for name, device in (("pi4", "pi4-4gb"), ("pi5", "pi5-8gb"))}
    try:
        installed = _script("install", str(arm_root), str(wheelhouse), timeout=1800)
        assert installed.returncode == 0, f"the aarch64 install failed:\n{installed.stderr[-4000:]}"
        for job in jobs.values():
            job.result()
    finally:
        for job in jobs.values():
            job.kill()
    test_image(200, 300).save(out / PICTURE)
    return {**{name: job.out for name, job in jobs.items()}, "speech": SPEECH, "picture": out / PICTURE}


@pytest.fixture(scope="module")
def bundles_in_root(bundles, arm_root) -> dict[str, str]:
    """The same bundles and media copied into the root; their paths seen from inside."""
    inside = arm_root / "srv" / "edgekit-test"
    shutil.rmtree(inside, ignore_errors=True)
    inside.mkdir(parents=True)
    for path in bundles.values():
        (shutil.copytree if path.is_dir() else shutil.copy)(path, inside / path.name)
    return {name: f"/srv/edgekit-test/{path.name}" for name, path in bundles.items()}


def _cases(paths: dict) -> str:
    """Each bundle with a text prompt and with each of its modalities."""
    speech, picture = {"audio": str(paths["speech"])}, {"image": str(paths["picture"])}
    return json.dumps([[str(paths["pi4"]), PROMPT, {}], [str(paths["pi4"]), "What is said?", speech],
                       [str(paths["pi5"]), PROMPT, {}], [str(paths["pi5"]), "What is said?", speech],
                       [str(paths["pi5"]), "What is in the picture?", picture]])


@pytest.fixture(scope="module")
def x86_greedy(bundles, tmp_path_factory) -> tuple[dict, Path]:
    """(the greedy script's report, the folder of its logits) on this x86 machine."""
    out = tmp_path_factory.mktemp("x86-logits")
    result = subprocess.run([sys.executable, "-c", _GREEDY, _cases(bundles), str(out)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.splitlines()[-1]), out


# --- the tests -----------------------------------------------------------------------------

def _aarch64_elf(instruction: int) -> bytes:
    """A static aarch64 executable: one instruction, then exit(0)."""
    base = 0x400000
    code = struct.pack("<4I", instruction,
                       0xD2800000,   # movz x0, #0
                       0xD2800BA8,   # movz x8, #93 (exit)
                       0xD4000001)   # svc #0
    size = 64 + 56 + len(code)
    header = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 2, 183, 1, base + 120,
                         64, 0, 0, 64, 56, 1, 0, 0, 0)
    segment = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)  # PT_LOAD, R+X
    return header + segment + code


def _no_core_dump() -> None:
    """QEMU writes the guest's core file into the working folder on SIGILL."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@pytest.mark.parametrize("cpu, instruction, name, allowed", [
    ("cortex-a72", 0x4E829420, "sdot", False),
    ("cortex-a72", 0x4E82A420, "smmla", False),
    ("cortex-a76", 0x4E829420, "sdot", True),
    ("cortex-a76", 0x4E82A420, "smmla", False),
])
def test_emulated_cpu_refuses_what_the_pi_lacks(cpu, instruction, name, allowed, tmp_path):
    """What makes the checks below worth anything: QEMU as a Cortex-A72 kills a process on
    a dotprod or an i8mm instruction, as a Pi 4 does; as a Cortex-A76, on i8mm only."""
    qemu = shutil.which("qemu-aarch64-static")
    if qemu is None:
        pytest.skip("cannot emulate arm64 here: qemu-aarch64-static is not installed")
    program = tmp_path / name
    program.write_bytes(_aarch64_elf(instruction))
    program.chmod(0o755)
    result = subprocess.run([qemu, "-cpu", cpu, str(program)], capture_output=True, text=True,
                            cwd=tmp_path, preexec_fn=_no_core_dump, timeout=60)
    if allowed:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode == -4 and "Illegal instruction" in result.stderr, (result.returncode, result.stderr)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.slow
@pytest.mark.parametrize("cpu", CPUS)
def test_greedy_tokens_on_a_pi_cpu_equal_x86(cpu, bundles, bundles_in_root, x86_greedy):
    """Both bundles, with text, speech and picture prompts, in the root's venv on the Pi's
    emulated core: no illegal instruction, x86's greedy tokens, and x86's logits at every
    step to within MIN_COSINE. (This random model's greedy answer repeats one token; the
    logits are what shows every step computed the same thing.)"""
    x86, x86_logits = x86_greedy
    out = ARM_ROOT / "srv" / "edgekit-test" / f"logits-{cpu}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    result = _in_root(cpu, f"{VENV}/bin/python", "-c", _GREEDY, _cases(bundles_in_root),
                      f"/srv/edgekit-test/{out.name}")
    arm = json.loads(result.stdout.splitlines()[-1])
    fp16, dotprod, i8mm = PI_FEATURES[cpu]
    seen = (bool(arm["hwcap"] & HWCAP_FPHP), bool(arm["hwcap"] & HWCAP_ASIMDDP), bool(arm["hwcap2"] & HWCAP2_I8MM))
    assert seen == (fp16, dotprod, i8mm), f"{cpu} showed (fp16, dotprod, i8mm) = {seen}"
    assert arm["torch"] is False  # the device install brings no torch
    cases = json.loads(_cases(bundles))
    for i, (bundle, prompt, media) in enumerate(cases):
        ours, theirs = np.load(out / f"logits-{i}.npy"), np.load(x86_logits / f"logits-{i}.npy")
        assert ours.shape == theirs.shape, (bundle, prompt, ours.shape, theirs.shape)
        top2 = np.sort(theirs[-len(x86["tokens"][i]):], axis=-1)[:, -2:]
        where = (f"{Path(bundle).name}, {prompt!r} {list(media)}: max |diff| {np.abs(ours - theirs).max():.3f}, "
                 f"x86's smallest greedy margin {(top2[:, 1] - top2[:, 0]).min():.3f}")
        assert arm["tokens"][i] == x86["tokens"][i], where
        assert _cosine(ours, theirs).min() >= MIN_COSINE, where


@pytest.mark.slow
@pytest.mark.parametrize("cpu, bundle", [("cortex-a72", "pi4"), ("cortex-a76", "pi5")])
def test_edgekit_run_on_a_pi_cpu(cpu, bundle, bundles, bundles_in_root):
    """`edgekit run --json` as a user types it on the Pi, through the console script the
    wheel installs (greedy by default), ends as on x86: same prompt length (tokenizer and
    chat template), same answer and stop. This model's greedy answer is a closing channel
    token, which prints nothing: the tokens themselves are compared in the test above."""
    args = ("-p", PROMPT, "--max-new-tokens", "8", "--json")
    x86 = run_cli("run", str(bundles[bundle]), *args)
    assert x86.returncode == 0, x86.stderr
    arm = _in_root(cpu, f"{VENV}/bin/edgekit", "run", bundles_in_root[bundle], *args)
    x86_out, arm_out = json.loads(x86.stdout), json.loads(arm.stdout)
    same = ("prompt_tokens", "new_tokens", "stop_reason")
    assert (arm_out["text"], arm_out["thought"]) == (x86_out["text"], x86_out["thought"])
    assert {k: arm_out["stats"][k] for k in same} == {k: x86_out["stats"][k] for k in same}
    assert arm_out["stats"]["new_tokens"] == 8
