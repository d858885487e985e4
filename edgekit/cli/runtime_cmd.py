"""Device-side commands: run, chat, translate, bench."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from edgekit.cli import app, error_line


def _sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None):
    from edgekit.runtimes.sampling import SamplingParams

    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, max_new_tokens=max_new_tokens)


def _content(text: str, images: list[Path], audios: list[Path]):
    if not images and not audios:
        return text
    parts = [{"type": "image", "image": str(p)} for p in images]
    parts += [{"type": "audio", "audio": str(p)} for p in audios]
    return [*parts, {"type": "text", "text": text}]


def stats_line(s) -> str:
    """One line of an answer's numbers; the encoders' time where an image or a clip was encoded."""
    encoders = "".join(f" | {name} encode {seconds:.2f} s" for name, seconds in
                       (("image", s.image_encode_s), ("audio", s.audio_encode_s)) if seconds)
    return (f"[{s.prompt_tokens} prompt tokens ({s.prefilled_tokens} fed), {s.new_tokens} new{encoders} | "
            f"TTFT {s.time_to_first_token_s:.2f} s | prefill {s.prefill_tok_s:.1f} tok/s | "
            f"decode {s.decode_tok_s:.1f} tok/s | peak RSS {s.peak_rss_mb:.0f} MB | {s.stop_reason}]")


def _print_stats(stats) -> None:
    typer.echo(stats_line(stats), err=True)


def _show_thought(piece: str) -> None:
    """The model's thinking, on stderr: stdout carries only the answer."""
    sys.stderr.write(piece)
    sys.stderr.flush()


_MAX_NEW = typer.Option(256, "--max-new-tokens", help="Stop after this many new tokens.")
_TEMP = typer.Option(0.0, "--temperature", help="0 = greedy.")
_TOP_K = typer.Option(64, "--top-k", help="Sample among the k most likely tokens (0 = all).")
_TOP_P = typer.Option(0.95, "--top-p", help="Nucleus sampling mass.")
_SEED = typer.Option(None, "--seed", help="Random seed for sampling.")
_THREADS = typer.Option(None, "--threads", help="CPU threads for the runtime.")


@app.command("run")
def run(
    bundle: Path = typer.Argument(..., help="Bundle directory (NAME.edgekit)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="User message."),
    image: list[Path] = typer.Option([], "--image", metavar="FILE", help="Image file to show the model (repeatable)."),
    audio: list[Path] = typer.Option([], "--audio", metavar="WAV", help="WAV file to play to the model (repeatable)."),
    system: str = typer.Option(None, "--system", help="System prompt."),
    think: bool = typer.Option(False, "--think", help="Let the model think before answering (its thinking "
                               "goes to stderr, or to \"thought\" with --json)."),
    max_new_tokens: int = _MAX_NEW, temperature: float = _TEMP, top_k: int = _TOP_K, top_p: float = _TOP_P,
    seed: int = _SEED, threads: int = _THREADS,
    stats: bool = typer.Option(False, "--stats", help="Print timings after the answer (stderr)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object with text and stats."),
) -> None:
    """Answer one prompt, streaming tokens as they come."""
    from edgekit.runtimes import load

    engine = load(bundle, threads=threads)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": _content(prompt, image, audio)}]
    pieces = []
    for piece in engine.generate(messages, sampling=_sampling(max_new_tokens, temperature, top_k, top_p, seed),
                                 enable_thinking=think, on_thought=None if json_output else _show_thought):
        pieces.append(piece)
        if not json_output:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if json_output:
        typer.echo(json.dumps({"text": "".join(pieces), "thought": engine.last_thought,
                               "stats": engine.last_stats.to_dict()}, ensure_ascii=False))
    else:
        typer.echo("")
        if stats:
            _print_stats(engine.last_stats)


@app.command("chat")
def chat(
    bundle: Path = typer.Argument(..., help="Bundle directory (NAME.edgekit)."),
    system: str = typer.Option(None, "--system", help="System prompt."),
    think: bool = typer.Option(False, "--think", help="Let the model think before answering (its thinking goes to stderr)."),
    max_new_tokens: int = _MAX_NEW, temperature: float = _TEMP, top_k: int = _TOP_K, top_p: float = _TOP_P,
    seed: int = _SEED, threads: int = _THREADS,
    stats: bool = typer.Option(False, "--stats", help="Print timings after each answer (stderr)."),
) -> None:
    """Multi-turn chat that keeps the KV cache across turns.

    Type a message and Enter. `/image PATH` or `/audio PATH` attaches a file to the next
    message, `/reset` starts over, `/exit` (or Ctrl-D) quits. Ctrl-C stops an answer; a
    message that fails (a missing file, a conversation past the context) is dropped with
    its error, the chat goes on, and the exit status is that error's at the end.
    """
    from edgekit.errors import InputError
    from edgekit.runtimes import load

    engine = load(bundle, threads=threads)
    sampling = _sampling(max_new_tokens, temperature, top_k, top_p, seed)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    images: list[Path] = []
    audios: list[Path] = []
    interactive = sys.stdin.isatty()
    failed = 0  # exit status of the last turn that failed
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            engine.reset()
            history = history[:1] if system else []
            continue
        if line.startswith(("/image ", "/audio ")):
            (images if line.startswith("/image") else audios).append(Path(line.split(" ", 1)[1].strip()))
            continue
        history.append({"role": "user", "content": _content(line, images, audios)})
        images, audios = [], []
        answer = []
        try:
            for piece in engine.generate(history, sampling=sampling, enable_thinking=think, on_thought=_show_thought):
                answer.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except InputError as exc:  # this message only: say why, drop it, keep the conversation
            history.pop()
            failed = exc.exit_code
            full = " (/reset starts a new conversation)" if "context" in str(exc) else ""
            typer.echo(error_line(str(exc)) + full, err=True)
            continue
        except KeyboardInterrupt:  # stops this answer; the cache may be mid-step, so it starts over
            engine.reset()
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(answer)})
        if stats:
            _print_stats(engine.last_stats)
    if failed:
        raise typer.Exit(failed)


@app.command("bench")
def bench(
    bundle: Path = typer.Argument(..., help="Bundle directory (NAME.edgekit)."),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", help="Prefill length."),
    decode_tokens: int = typer.Option(64, "--decode-tokens", help="Greedy decode steps."),
    threads: int = _THREADS,
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Measure load time, prefill and decode speed and peak memory of a bundle."""
    from edgekit.errors import InputError
    from edgekit.runtimes.benchmark import bench_bundle

    if prompt_tokens < 1 or decode_tokens < 1:
        raise InputError("--prompt-tokens and --decode-tokens must be at least 1")
    result = bench_bundle(bundle, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, threads=threads)
    if json_output:
        typer.echo(json.dumps(result.to_dict()))
        return
    from rich.console import Console
    from rich.table import Table

    r = result
    table = Table(title=f"{Path(r.bundle).name} ({r.format}, {r.recipe})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for label, value in (("bundle size", f"{r.bundle_mb:,.1f} MB"), ("load", f"{r.load_s:.2f} s"),
                         (f"prefill ({r.prompt_tokens} tokens)", f"{r.prefill_tok_s:,.1f} tok/s"),
                         (f"decode ({r.decode_tokens} tokens)", f"{r.decode_tok_s:,.1f} tok/s"),
                         ("peak RSS", f"{r.peak_rss_mb:,.0f} MB")):
        table.add_row(label, value)
    Console().print(table)
