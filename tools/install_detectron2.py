#!/usr/bin/env python3
"""Install detectron2 into the current Python environment from PyPI alone.

detectron2 is not published on PyPI. ``sal-detectron2==0.7.2`` is the official source (commit a59f0563) shipped as a
cp310 wheel with a CUDA ``_C.so``. This script downloads that wheel, drops the compiled extension and the stray
top-level ``tools`` package, patches what breaks under numpy 2 and new setuptools, retags it ``py3-none-any`` and
installs it. Mask R-CNN does not need ``_C``.

An existing, importable detectron2 (for example a user's CUDA build from source) is kept untouched. Running the
script again when the patched wheel is already installed does nothing.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SOURCE = "sal-detectron2==0.7.2"
VERSION = "0.7.2"
# Marker written into the patched wheel so we can recognise our own build.
MARKER = "acp_data_repack.txt"
PATCH_REV = "2"

EXTRA_REQUIRES = ["fvcore>=0.1.5", "iopath>=0.1.7", "cloudpickle", "omegaconf>=2.1,<2.4", "yacs>=0.1.8"]
DROP_REQUIRES = ("numpy", "black", "hydra-core", "dataclasses", "tensorboard")

MODEL_ZOO_PATCH_OLD = """    cfg_file = pkg_resources.resource_filename(
        "detectron2.model_zoo", os.path.join("configs", config_path)
    )"""
MODEL_ZOO_PATCH_NEW = """    cfg_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", config_path)"""


def log(msg: str) -> None:
    print(f"[install_detectron2] {msg}", flush=True)


def existing_detectron2(python: str) -> str | None:
    """Return a description of an importable detectron2 in ``python``'s environment, or None."""
    code = (
        "import importlib.util, pathlib, sys\n"
        "spec = importlib.util.find_spec('detectron2')\n"
        "if spec is None: sys.exit(3)\n"
        "import detectron2\n"
        "from detectron2.modeling import build_model\n"
        "from detectron2.config import get_cfg\n"
        "import detectron2.model_zoo\n"
        "root = pathlib.Path(detectron2.__file__).parent\n"
        f"marker = root / {MARKER!r}\n"
        "print(detectron2.__version__, root, marker.read_text().strip() if marker.exists() else 'external')\n"
    )
    res = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        return None
    return res.stdout.strip()


def download_wheel(dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", "3.10", "--dest", str(dest), SOURCE,
    ]
    log("downloading " + SOURCE)
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("sal_detectron2-*.whl"))
    if res.returncode != 0 or not wheels:
        raise SystemExit(
            f"[install_detectron2] ERROR: could not download {SOURCE} from the package index.\n"
            f"command: {' '.join(cmd)}\n{res.stdout[-2000:]}{res.stderr[-2000:]}\n"
            "Check network access to PyPI, or install detectron2 yourself (it will be kept)."
        )
    return wheels[0]


def _patch_text(name: str, text: str) -> str:
    if name == "detectron2/layers/mask_ops.py":
        text = text.replace("np.array(mask, copy=False)", "np.asarray(mask)")
    if name == "detectron2/evaluation/sem_seg_evaluation.py":
        # numpy 2: copy=False raises when a copy is needed; PIL images always need one.
        text = text.replace("np.array(Image.open(f), copy=copy, dtype=dtype)", "np.array(Image.open(f), dtype=dtype)")
    if name == "detectron2/model_zoo/model_zoo.py":
        text = text.replace("import pkg_resources\n", "")
        if MODEL_ZOO_PATCH_OLD in text:
            text = text.replace(MODEL_ZOO_PATCH_OLD, MODEL_ZOO_PATCH_NEW)
    return text


def _patch_metadata(text: str) -> str:
    out = []
    for line in text.splitlines():
        if line.startswith("Name:"):
            line = "Name: detectron2"
        if line.startswith("Requires-Dist:"):
            req = line.split(":", 1)[1].strip()
            base = re.split(r"[<>=!;\s\[]", req, maxsplit=1)[0].lower()
            if base in DROP_REQUIRES:
                continue
        out.append(line)
    # Metadata headers end at the first blank line; insert our requirements before it.
    try:
        blank = out.index("")
    except ValueError:
        blank = len(out)
    extra = [f"Requires-Dist: {r}" for r in EXTRA_REQUIRES] + ["Requires-Dist: numpy"]
    return "\n".join(out[:blank] + extra + out[blank:]) + "\n"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def repack(src: Path, out_dir: Path) -> Path:
    """Write a pure-Python ``detectron2-<ver>-py3-none-any.whl`` built from the downloaded wheel."""
    dist_old = f"sal_detectron2-{VERSION}.dist-info"
    dist_new = f"detectron2-{VERSION}.dist-info"
    out = out_dir / f"detectron2-{VERSION}-py3-none-any.whl"
    files: dict[str, bytes] = {}
    with zipfile.ZipFile(src) as zin:
        for info in zin.infolist():
            name = info.filename
            if name.endswith("/"):
                continue
            if name.startswith("tools/") or re.match(r"detectron2/_C.*\.so$", name):
                continue
            if name.endswith("RECORD"):
                continue
            data = zin.read(name)
            if name.startswith(dist_old):
                name = dist_new + name[len(dist_old):]
                if name.endswith("METADATA"):
                    data = _patch_metadata(data.decode()).encode()
                elif name.endswith("WHEEL"):
                    text = data.decode().replace("Root-Is-Purelib: false", "Root-Is-Purelib: true")
                    text = re.sub(r"Tag: .*", "Tag: py3-none-any", text)
                    data = text.encode()
                elif name.endswith("top_level.txt"):
                    data = b"detectron2\n"
            elif name.endswith(".py"):
                data = _patch_text(name, data.decode()).encode()
            files[name] = data
    files[f"detectron2/{MARKER}"] = f"repacked from {SOURCE} by acp-data, patch rev {PATCH_REV}\n".encode()
    record = [_record_line(n, d) for n, d in files.items()] + [f"{dist_new}/RECORD,,"]
    files[f"{dist_new}/RECORD"] = ("\n".join(record) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zout:
        for name, data in files.items():
            zout.writestr(name, data)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=sys.executable, help="interpreter whose environment receives detectron2")
    ap.add_argument("--force", action="store_true", help="rebuild and reinstall even if a detectron2 works")
    ap.add_argument("--wheel-dir", default=None, help="keep the built wheel here (default: a temp dir)")
    args = ap.parse_args(argv)

    found = existing_detectron2(args.python)
    if found and not args.force:
        if found.endswith("external") or f"patch rev {PATCH_REV}" in found:
            log(f"detectron2 already works, keeping it: {found}")
            return 0
        log(f"older acp-data repack found ({found}); rebuilding")
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        src = download_wheel(tmpdir / "dl")
        out_dir = Path(args.wheel_dir) if args.wheel_dir else tmpdir
        out_dir.mkdir(parents=True, exist_ok=True)
        wheel = repack(src, out_dir)
        log(f"built {wheel.name}; installing")
        cmd = [args.python, "-m", "pip", "install", "--force-reinstall", "--no-deps", str(wheel)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"[install_detectron2] ERROR: pip failed to install {wheel}:\n{res.stderr[-3000:]}")
        deps = [args.python, "-m", "pip", "install", "-q", *EXTRA_REQUIRES, "termcolor", "tabulate", "pycocotools"]
        res = subprocess.run(deps, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"[install_detectron2] ERROR: installing detectron2's requirements failed:\n{res.stderr}")
    found = existing_detectron2(args.python)
    if not found:
        raise SystemExit("[install_detectron2] ERROR: detectron2 was installed but does not import; see above.")
    log(f"detectron2 ready: {found}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
