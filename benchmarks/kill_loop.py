"""Kill ``engram train`` at random instants and check that resuming ends bit-identical.

For each signal (SIGKILL, SIGINT, SIGTERM) and each of ``--n`` random kill points: start
``engram train --checkpoint-every 1`` on a tiny model, wait until its checkpoint pointer reaches a
random step, then send the signal after a random delay of up to 1.5 step-and-save times (so it
lands anywhere in a step, a save, or an evaluation, whatever the machine's load), then
``--resume`` until the run finishes, and compare every weight and the report's held-out curve
with the uninterrupted run. Prints a table and writes
``results.json`` under ``--workdir``.

    python benchmarks/kill_loop.py --n 20            # the figures of issue 13's closing note
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIGNALS = {"KILL": signal.SIGKILL, "INT": signal.SIGINT, "TERM": signal.SIGTERM}
TINY = ["--layers", "2", "--dim", "32", "--heads", "2", "--seq-len", "32", "--batch-size", "4",
        "--table-size", "101", "--vocab-size", "300", "--engram-dim", "32", "--eval-tokens", "256",
        "--warmup-steps", "2", "--no-progress", "--threads", "1", "--eval-points", "4"]


def make_text(n_lines: int = 600, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["the cat", "a dog", "my friend", "the king", "sees", "loves", "finds", "the moon", "an apple", "the river"]
    return "\n".join(" ".join(rng.choice(words) for _ in range(4)) + "." for _ in range(n_lines)) + "\n"


def train_cmd(data: Path, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "engram", "train", "--data", str(data), "--steps", str(steps), "--out", str(out),
            "--checkpoint-every", "1", *TINY]


def _default_signals() -> None:
    """In the child: SIGINT as in a terminal (a background job, e.g. CI, starts with it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _pointer_step(run: Path) -> int:
    try:
        return int((run / "checkpoints" / "latest").read_text().split("-")[1])
    except (OSError, ValueError, IndexError):
        return -1


def weights(run: Path) -> dict:
    from engram.training.checkpoint import load_checkpoint  # noqa: PLC0415

    ck = load_checkpoint(run)
    return {k: v.clone() for k, v in ck.model.state_dict().items()}


def same_run(a: Path, b: Path) -> tuple[bool, str]:
    import torch  # noqa: PLC0415

    wa, wb = weights(a), weights(b)
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    ra = json.loads((a / "report.json").read_text())
    rb = json.loads((b / "report.json").read_text())
    curve_same = [c["val_loss"] for c in ra["curve"]] == [c["val_loss"] for c in rb["curve"]]
    if diff or not curve_same:
        return False, f"{len(diff)} tensors differ, curve {'same' if curve_same else 'differs'}"
    return True, f"{len(wa)}/{len(wa)} tensors equal, curve equal"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20, help="kill points per signal (default %(default)s)")
    p.add_argument("--signals", default="KILL,INT,TERM")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="default: a new private temporary directory")
    p.add_argument("--strict", action="store_true",
                   help="fail unless every signal ended its run with its own status (130 / 143 / -9) or came after it finished")
    a = p.parse_args(argv)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="engram-kill-loop-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ENGRAM_CACHE_DIR": str(work / "cache"), "PYTHONUNBUFFERED": "1"}
    data = work / "text.txt"
    data.write_text(make_text())
    ref = work / "reference"
    shutil.rmtree(ref, ignore_errors=True)
    subprocess.run(train_cmd(data, ref, a.steps), env=env, check=True, capture_output=True)  # warms the caches
    shutil.rmtree(ref)
    t0 = time.perf_counter()
    proc = subprocess.Popen(train_cmd(data, ref, a.steps), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = end = None
    while proc.poll() is None:
        if first is None and (ref / "checkpoints" / "latest").exists():
            first = time.perf_counter() - t0
        if end is None and (ref / "report.json").exists():
            end = time.perf_counter() - t0
        time.sleep(0.002)
    total = time.perf_counter() - t0
    assert proc.returncode == 0, proc.returncode
    first, end = first or 0.5 * total, end or total
    per_step = (end - first) / max(a.steps - 1, 1)
    print(f"uninterrupted run: {total:.2f} s, first checkpoint after {first:.2f} s, report after {end:.2f} s "
          f"({per_step * 1e3:.0f} ms per step with its save); kills at a random step + U(0, {1.5 * per_step * 1e3:.0f} ms); "
          f"load {os.getloadavg()[0]:.2f}")
    rng = random.Random(a.seed)
    results = []
    for name in a.signals.split(","):
        sig = SIGNALS[name]
        for i in range(a.n):
            out = work / f"{name}-{i}"
            shutil.rmtree(out, ignore_errors=True)
            target, delay = rng.randint(1, a.steps - 4), rng.uniform(0, 1.5 * per_step)
            proc = subprocess.Popen(train_cmd(data, out, a.steps), env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)
            t_start = time.perf_counter()
            while proc.poll() is None and _pointer_step(out) < target:
                time.sleep(0.001)
            time.sleep(delay)
            at = time.perf_counter() - t_start
            proc.send_signal(sig)
            _, err = proc.communicate()
            killed_rc = proc.returncode
            finished = (out / "report.json").exists()
            resumes, cleaned, outcome = 0, 0, ""
            for _ in range(3):
                from engram.training.checkpoint import latest_checkpoint  # noqa: PLC0415

                if (out / "report.json").exists():
                    break
                cmd = (train_cmd(data, out, a.steps) if latest_checkpoint(out) is None
                       else [sys.executable, "-m", "engram", "train", "--resume", str(out), "--no-progress", "--threads", "1"])
                r = subprocess.run(cmd, env=env, capture_output=True, text=True)
                resumes += 1
                cleaned += r.stderr.count("left in")
                if r.returncode != 0:
                    outcome = f"resume failed rc {r.returncode}: {r.stderr.strip().splitlines()[-1:]}"
                    break
            ok, detail = same_run(ref, out) if not outcome else (False, outcome)
            results.append({"signal": name, "at_s": round(at, 3), "after_step": target, "delay_ms": round(delay * 1e3, 1), "rc": killed_rc, "finished": finished, "resumes": resumes,
                            "cleaned": cleaned, "identical": ok, "detail": detail})
            print(f"{name:4s} #{i:2d} step {target:2d} +{delay * 1e3:3.0f} ms ({at:5.2f}s) rc {killed_rc:4d} resumes {resumes} cleaned {cleaned} "
                  f"{'IDENTICAL' if ok else 'DIFFERENT'} ({detail})", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    print("\nsignal  kills  finished-before-kill  bit-identical")
    for name in a.signals.split(","):
        rows = [r for r in results if r["signal"] == name]
        print(f"{name:6s}  {len(rows):5d}  {sum(r['finished'] for r in rows):20d}  {sum(r['identical'] for r in rows):5d}/{len(rows)}")
    (work / "results.json").write_text(json.dumps(results, indent=1))
    # 0: the run finished in the signal's delay (it then exits normally); anything but the
    # signal's own exit status otherwise means the signal was not handled as it should be.
    expected = {"KILL": -9, "INT": 130, "TERM": 143}
    interrupted = all(r["rc"] in (0, expected[r["signal"]]) for r in results)
    if a.strict and not interrupted:
        print("some signals were not handled as they should be (see rc above)")
    return 0 if all(r["identical"] for r in results) and (interrupted or not a.strict) else 1


if __name__ == "__main__":
    raise SystemExit(main())
