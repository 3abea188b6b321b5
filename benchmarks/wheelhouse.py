"""Every wheel a GPU box without network lacks, split to fit its transfers, and the plan.

Run here (with network): it resolves what `maskdm` needs on the box (Python 3.12, manylinux
x86_64, torch 2.11 + CUDA 13 already there) against the box's package list
(`benchmarks/gpu_box_packages.txt`), downloads the wheels that are missing (builds DeepSpeed's,
which has no wheel on the index; the project's own is built on the box from the checkout that
travels), splits any file larger than `--part-mib` into parts, writes `SHA256SUMS`, and prints the sequence of transfers that brings it all: each
within `--transfer-mib` together with the working tree, each moving what it brought to a folder
the box keeps while it stays warm, the last joining the parts, checking every sum and
installing offline (`benchmarks/wheelhouse_install.sh`) before the acceptance run.

    python -m benchmarks.wheelhouse                  # -> wheelhouse/ (git-ignored) and the plan
    python -m benchmarks.wheelhouse --no-dali        # without DALI (~240 MiB less)
    python -m benchmarks.wheelhouse --here           # this machine's, for the CPU rehearsal

Nothing the acceptance needs is fetched on the box. xformers is included only if a wheel built
for the box's torch exists (its `torch==` requirement is checked); else SDPA is what runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 2 ** 20
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
# What maskdm needs on the box beyond what is there: DeepSpeed's own needs (it is built here,
# without them), the project's, the loaders'.
NEEDS = ["hjson", "pydantic>=2,<3", "msgpack", "py-cpuinfo", "einops", "ninja", "psutil",
         "nvidia-ml-py", "webdataset", "PyWavelets", "safetensors", "pyyaml", "tqdm", "fsspec",
         "scipy", "matplotlib", "numpy", "pillow"]
DALI = "nvidia-dali-cuda130"
DEEPSPEED = "deepspeed==0.19.8"
BOX_TORCH_VERSION = "2.11.0"
# seconds, for the plan's estimate: a box's start, each further call's round trip (its tree
# and wheels sent, the command run), the link to the box
START_S, CALL_S, LINK_MIB_S = 90.0, 25.0, 20.0


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def box_packages(path: Path) -> set[str]:
    return {norm(line.strip()) for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


# ------------------------------------------------------------------ parts and transfers
def split(path: Path, part_bytes: int) -> list[Path]:
    """``path`` cut into ``NAME.partNNN`` files of at most ``part_bytes`` (the whole file is
    removed); a file that fits is left as it is. -> the files that now hold it."""
    size = path.stat().st_size
    if size <= part_bytes:
        return [path]
    parts = []
    with open(path, "rb") as f:
        for i in range((size + part_bytes - 1) // part_bytes):
            part = path.with_name(f"{path.name}.part{i:03d}")
            part.write_bytes(f.read(part_bytes))
            parts.append(part)
    path.unlink()
    return parts


def write_sums(folder: Path, names: dict[str, str]) -> None:
    """SHA256SUMS of the whole wheels (``name -> sha256``), checked after joining."""
    (folder / "SHA256SUMS").write_text("".join(f"{h}  {n}\n" for n, h in sorted(names.items())))


@dataclass
class Transfer:
    files: list[str]
    mib: float
    last: bool = False


def pack(sizes: dict[str, int], budget_bytes: int) -> list[Transfer]:
    """Files (in name order, so the parts of a wheel travel in order) packed first-fit into
    transfers of at most ``budget_bytes``; one file larger than that raises ValueError."""
    out: list[Transfer] = []
    cur, used = [], 0
    for name in sorted(sizes):
        n = sizes[name]
        if n > budget_bytes:
            raise ValueError(f"{name} ({n / MiB:.1f} MiB) does not fit in one transfer "
                             f"({budget_bytes / MiB:.1f} MiB): lower --part-mib")
        if used + n > budget_bytes and cur:
            out.append(Transfer(cur, used / MiB))
            cur, used = [], 0
        cur.append(name)
        used += n
    out.append(Transfer(cur, used / MiB))
    out[-1].last = True
    return out


def place(folder: Path, transfers: list[Transfer]) -> None:
    """Each transfer's files moved into ``folder/tN``: the folder a device call carries."""
    for i, t in enumerate(transfers, 1):
        sub = folder / f"t{i}"
        sub.mkdir(exist_ok=True)
        for name in t.files:
            (folder / name).rename(sub / name)


def plan_text(transfers: list[Transfer], tree_mib: float, folder: str, budget_s: int) -> str:
    """The printed sequence: one device `run` per transfer, each carrying ``folder/tN``."""
    lines = [f"{len(transfers)} transfer(s); the working tree adds {tree_mib:.1f} MiB to each."]
    keep = "/tmp/wheelhouse"
    total = START_S
    for i, t in enumerate(transfers, 1):
        total += (CALL_S if i > 1 else 0) + (t.mib + tree_mib) / LINK_MIB_S
        lines.append(f"\ntransfer {i}: carry [\"{folder}/t{i}\"], {len(t.files)} file(s), "
                     f"{t.mib:.1f} MiB: {', '.join(t.files[:3])}{' ...' if len(t.files) > 3 else ''}")
        move = f"mkdir -p {keep} && cp {folder}/t{i}/* {keep}/"
        if not t.last:
            lines.append(f"  command: {move}")
            lines.append("  (the next call within 30 s, or the box and what it holds are gone)")
        else:
            lines.append(f"  command: {move} && bash benchmarks/wheelhouse_install.sh {keep} "
                         f"/tmp/site && PYTHONPATH=/tmp/site PYTHON=python3 "
                         f"BUDGET_S={budget_s} OUT=$OUT/acc bash benchmarks/gpu_acceptance.sh")
    total += budget_s + 30  # the acceptance, then the files back
    lines.append(f"\nestimated device time: {total / 60:.1f} min (box start {START_S:.0f} s, "
                 f"{CALL_S:.0f} s per further call, {LINK_MIB_S:.0f} MiB/s to the box, the "
                 f"acceptance {budget_s} s, 30 s back) of the 15 min a session has")
    return "\n".join(lines)


# ------------------------------------------------------------------ resolving and fetching
def run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"error: {what} failed:\n{r.stderr.strip()[-2000:]}")


def torch_closure() -> dict:
    """torch and everything it requires, as installed here (normalised name -> distribution):
    what a bare venv "holding only torch" has (the rehearsal's stand-in for the box)."""
    import importlib.metadata as md
    from packaging.requirements import Requirement
    seen, todo = {}, ["torch"]
    while todo:
        name = norm(todo.pop())
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[name] = dist
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def bare_venv(scratch: Path) -> None:
    """``scratch/venv``: a venv without pip holding only torch's closure, linked in from this
    Python's (``scratch/torch-only``, named by a .pth), as the GPU box holds only its torch."""
    import os
    import sysconfig
    import venv
    link, env = scratch / "torch-only", scratch / "venv"
    venv.create(env, with_pip=False)
    link.mkdir(parents=True)
    closure = torch_closure()
    for dist in closure.values():
        base = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            src = base / top
            if src.exists() and not (link / top).exists() and not top.endswith(".pth"):
                os.symlink(src, link / top)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))
    (site / "torch-only.pth").write_text(f"{link}\n")
    print("a bare venv holding only", ", ".join(sorted(closure)))


def resolve(needs: list[str], python: str | None) -> list[dict]:
    """pip's own resolution for the box's Python and platform (``python`` None: this machine's)
    -> [{name, version, url}]."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
               "--quiet", "--report", str(report), "--only-binary=:all:",
               "--target", str(Path(tmp) / "t")]
        if python is not None:
            cmd += ["--python-version", python, "--implementation", "cp"]
            for p in PLATFORMS:
                cmd += ["--platform", p]
        run(cmd + needs, "resolving the wheels")
        data = json.loads(report.read_text())
    return [{"name": i["metadata"]["name"], "version": i["metadata"]["version"],
             "url": i["download_info"]["url"]} for i in data["install"]]


def fetch(entries: list[dict], out: Path, python: str | None) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
           "--only-binary=:all:", "-d", str(out)]
    if python is not None:
        cmd += ["--python-version", python, "--implementation", "cp"]
        for p in PLATFORMS:
            cmd += ["--platform", p]
    run(cmd + [f"{e['name']}=={e['version']}" for e in entries], "downloading the wheels")


def xformers_for_box(python: str, out: Path) -> str:
    """Download xformers if a wheel requires the box's torch; -> what was found."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", "--python-version", python, "-d", tmp, "xformers"]
        for p in PLATFORMS:
            cmd += ["--platform", p]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("xformers-*.whl"))
        if r.returncode != 0 or not wheels:
            return "no xformers wheel for the box: SDPA runs"
        import zipfile
        with zipfile.ZipFile(wheels[0]) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            reqs = [ln for ln in z.read(meta).decode().splitlines()
                    if ln.startswith("Requires-Dist: torch")]
        from packaging.requirements import Requirement
        spec = Requirement(reqs[0].split(": ", 1)[1]).specifier if reqs else None
        if spec is None or not spec.contains(BOX_TORCH_VERSION, prereleases=True):
            return (f"{wheels[0].name} needs torch{spec or ' (unknown)'}, not {BOX_TORCH_VERSION}"
                    f": left out, SDPA runs")
        wheels[0].rename(out / wheels[0].name)
        return (f"{wheels[0].name} (requires torch{spec}: included; the acceptance checks that "
                f"its kernel runs, else SDPA)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "wheelhouse"), help="the folder (wheelhouse/)")
    p.add_argument("--python", default="3.12", help="the box's Python (3.12)")
    p.add_argument("--box", default=str(ROOT / "benchmarks" / "gpu_box_packages.txt"),
                   help="what the box has already (one name per line)")
    p.add_argument("--no-dali", action="store_true", help="leave DALI out")
    p.add_argument("--part-mib", type=float, default=60.0,
                   help="largest file sent at once; larger wheels are split (60)")
    p.add_argument("--transfer-mib", type=float, default=64.0,
                   help="what one transfer may carry, the working tree included (64)")
    p.add_argument("--budget-s", type=int, default=420,
                   help="the acceptance's BUDGET_S in the plan (420)")
    p.add_argument("--here", action="store_true",
                   help="for the CPU rehearsal instead: the wheels a bare venv holding only "
                   "torch lacks on this machine, into wheelhouse-here/ (no parts, no plan)")
    p.add_argument("--bare-venv", metavar="DIR",
                   help="make DIR/venv, a venv holding only this Python's torch (the "
                   "rehearsal's stand-in for the box; run by gpu_acceptance.sh)")
    args = p.parse_args(argv)
    if args.bare_venv:
        bare_venv(Path(args.bare_venv))
        return 0
    if args.here:
        return make_here(Path(args.out if args.out != str(ROOT / "wheelhouse")
                              else ROOT / "wheelhouse-here"), not args.no_dali)
    out = Path(args.out)
    tree = sum((ROOT / f).stat().st_size for f in subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
        if (ROOT / f).is_file()) / MiB
    budget = int((args.transfer_mib - tree - 0.5) * MiB)
    if out.exists():
        import shutil
        shutil.rmtree(out)
    out.mkdir(parents=True)
    have = box_packages(Path(args.box))
    needs = NEEDS + ([] if args.no_dali else [DALI])
    resolved = [e for e in resolve(needs, args.python) if norm(e["name"]) not in have]
    print(f"resolved {len(resolved)} wheel(s) the box lacks: "
          + ", ".join(f"{e['name']} {e['version']}" for e in resolved))
    fetch(resolved, out, args.python)
    # (not the project's own wheel: wheelhouse_install.sh builds it on the box from the
    # checkout that travels with every call, so it is never stale)
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out),
         DEEPSPEED], "building DeepSpeed's wheel (from its sdist)")
    print(xformers_for_box(args.python, out))
    sums = {}
    for w in sorted(out.glob("*.whl")):
        sums[w.name] = hashlib.sha256(w.read_bytes()).hexdigest()
        split(w, int(args.part_mib * MiB))
    write_sums(out, sums)
    sizes = {f.name: f.stat().st_size for f in out.iterdir() if f.is_file()}
    sizes["SHA256SUMS"] = sizes.pop("SHA256SUMS")
    transfers = pack(sizes, budget)
    if "SHA256SUMS" not in transfers[-1].files:  # the sums travel with the last transfer
        for t in transfers:
            if "SHA256SUMS" in t.files:
                t.files.remove("SHA256SUMS")
        transfers[-1].files.append("SHA256SUMS")
    place(out, transfers)
    print(f"{out}: {len(sizes)} file(s), {sum(sizes.values()) / MiB:.1f} MiB in "
          f"{len(transfers)} folder(s) t1..t{len(transfers)}")
    print(plan_text(transfers, tree, out.name, args.budget_s))
    return 0


def make_here(out: Path, dali: bool) -> int:
    """The rehearsal's wheelhouse: this machine's Python and platform, against torch's closure."""
    import shutil
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    have = torch_closure()
    needs = NEEDS + ([DALI] if dali else [])
    resolved = [e for e in resolve(needs, None) if norm(e["name"]) not in have]
    fetch(resolved, out, None)
    # (not the project's own wheel: the rehearsal builds it from the checkout as it runs)
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out),
         DEEPSPEED], "building DeepSpeed's wheel (from its sdist)")
    write_sums(out, {w.name: hashlib.sha256(w.read_bytes()).hexdigest()
                     for w in out.glob("*.whl")})
    size = sum(f.stat().st_size for f in out.iterdir()) / MiB
    print(f"{out}: {len(list(out.glob('*.whl')))} wheels, {size:.0f} MiB, for a bare venv "
          f"holding only torch ({', '.join(sorted(have))}): "
          f"REHEARSE=1 bash benchmarks/gpu_acceptance.sh installs them offline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
