"""Sweeps of small training runs, each tested on S-NIAH: the quick experiments behind benchmarks/reproduce.py.

    python -m benchmarks.sweep benchmarks/sweeps/memory.json --work runs/sweep --jobs 8 \
        --out benchmarks/results/niah_memory_sweep.json

The spec is a JSON file: {"train": [mlx_titans.train flags of every run], "niah": [benchmarks.niah flags of every
run], "runs": [{"name": NAME, "train": [this run's flags]}, ...]}; a run's own flags come after the common ones, so
they win. Each run trains into WORK/NAME/train and is tested into WORK/NAME/niah.json, in processes of its own,
--jobs runs at a time over --gpus GPUs (output in WORK/NAME/log.txt); a run with a niah.json is not run again. The
gathered JSON has every run's two commands, its held-out loss on the training task and its accuracy rows; the PNG
plots them.
"""

import argparse
import json
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.machine import GPUs, device_name, log_tail, run_logged
from mlx_titans.files import write_json_atomic
from mlx_titans.niah import plot


def read_spec(path) -> dict:
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the sweep spec {path}: {e}") from None
    names = [run.get("name") for run in spec.get("runs", [])]
    if not names or not all(isinstance(n, str) and n and "/" not in n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{path}: 'runs' must list runs with distinct names (no '/')")
    return spec


def commands(spec: dict, run: dict, work: Path) -> list:
    """The run's training and test commands."""
    folder = work / run["name"]
    return [
        [
            sys.executable,
            "-m",
            "mlx_titans.train",
            *spec.get("train", []),
            *run.get("train", []),
            "--out",
            str(folder / "train"),
        ],
        [
            sys.executable,
            "-m",
            "benchmarks.niah",
            "--models",
            str(folder / "train"),
            *spec.get("niah", []),
            "--out",
            str(folder / "niah.json"),
        ],
    ]


def gathered(spec: dict, work: Path) -> dict:
    runs, rows = [], []
    for run in spec["runs"]:
        folder = work / run["name"]
        log = [json.loads(line) for line in (folder / "train" / "log.jsonl").read_text().splitlines()]
        valid = [r["valid_loss"] for r in log if "valid_loss" in r]
        runs.append(
            {
                "name": run["name"],
                "valid_loss": valid[-1] if valid else None,
                "commands": ["python " + shlex.join(c[1:]) for c in commands(spec, run, work)],
            }
        )
        rows += [{**row, "model": run["name"]} for row in json.loads((folder / "niah.json").read_text())["rows"]]
    return {"device": device_name(), "spec": spec, "runs": runs, "rows": rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("spec", help="the sweep's JSON spec")
    p.add_argument("--work", default="runs/sweep", help="every run's folder")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each in processes of its own")
    p.add_argument("--gpus", type=int, default=1, help="GPUs to spread the jobs over, each run on the least busy")
    p.add_argument("--out", default="niah_sweep.json", help="the gathered JSON; the plot goes beside it as .png")
    args = p.parse_args(argv)
    try:
        spec, gpus = read_spec(args.spec), GPUs(args.gpus)
    except ValueError as e:
        sys.exit(f"error: {e}")
    work = Path(args.work)
    todo = [run for run in spec["runs"] if not (work / run["name"] / "niah.json").is_file()]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        codes = list(
            pool.map(lambda run: run_logged(commands(spec, run, work), work / run["name"], run["name"], gpus), todo)
        )
    failed = [run["name"] for run, code in zip(todo, codes) if code]
    for name in failed:
        print(f"{name}: FAILED; {work / name / 'log.txt'} ends:\n{log_tail(work / name / 'log.txt')}", flush=True)
    if failed:
        sys.exit(f"error: {', '.join(failed)} failed; the other runs' results are kept, and a rerun resumes")
    result = gathered(spec, work)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    plot(result["rows"], out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
