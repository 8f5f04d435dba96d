"""moe_build.py - the PEP 517 build backend behind `pip install ./python`, standard library only.

It compiles moe.c, moe_vk.c and shaders_embedded.c (from the repository root above this folder,
or from csrc/ in an sdist) into one shared library with the system C compiler ($CC, else cc) and
writes a wheel holding moe.py and moe.libs/<libmoe>. moe.py finds the library there when no MOE_LIB
is set. Nothing is downloaded: build-system.requires is empty.
"""

import base64
import hashlib
import io
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
C_FILES = ("moe.c", "moe_vk.c", "shaders_embedded.c")
HEADERS = ("moe.h",)


def _source_dir():
    for d in (os.path.join(HERE, "csrc"), os.path.dirname(HERE)):
        if all(os.path.isfile(os.path.join(d, f)) for f in C_FILES + HEADERS):
            return d
    raise RuntimeError("moe_build: moe.h, moe.c, moe_vk.c and shaders_embedded.c not found next to python/ or in "
                       "python/csrc: build from the repository (pip install ./python)")


def _version():
    with open(os.path.join(_source_dir(), "moe.h"), encoding="utf-8") as f:
        text = f.read()
    parts = [re.search(r"#define MOE_VERSION_%s\s+(\d+)" % k, text) for k in ("MAJOR", "MINOR", "PATCH")]
    if all(parts):
        return ".".join(m.group(1) for m in parts)
    m = re.search(r'#define MOE_VERSION_STRING\s+"([0-9.]+)', text) or re.search(r'#define MOE_VERSION\s+"([0-9.]+)', text)
    return m.group(1) if m else "0.0.0"


def _lib_name():
    if sys.platform == "win32":
        return "moe.dll"
    return "libmoe.dylib" if sys.platform == "darwin" else "libmoe.so"


def _platform_tag():
    return re.sub(r"[^A-Za-z0-9]", "_", sysconfig.get_platform())


def _compile(out_path):
    src = _source_dir()
    cc = shlex.split(os.environ.get("CC") or "cc")
    flags = shlex.split(os.environ.get("CFLAGS") or "-O2")
    shared = ["-dynamiclib"] if sys.platform == "darwin" else ["-shared"]
    libs = [] if sys.platform in ("win32", "darwin") else ["-lm", "-lpthread", "-ldl"]
    cmd = (cc + ["-std=c11"] + flags + ["-fPIC", "-fvisibility=hidden", "-I", src] + shared + ["-o", out_path] +
           [os.path.join(src, f) for f in C_FILES] + libs)
    sys.stderr.write("moe_build: %s\n" % " ".join(shlex.quote(c) for c in cmd))
    subprocess.check_call(cmd)


def _metadata(version):
    return ("Metadata-Version: 2.1\nName: moe\nVersion: %s\nSummary: Mixture-of-Experts language models on Vulkan GPUs "
            "and CPUs (ctypes binding of libmoe)\nRequires-Python: >=3.7\n" % version)


def _record_line(name, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return "%s,sha256=%s,%d" % (name, digest, len(data))


# ---- PEP 517 hooks ---------------------------------------------------------------------------------
def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    version = _version()
    info = "moe-%s.dist-info" % version
    os.makedirs(os.path.join(metadata_directory, info), exist_ok=True)
    with open(os.path.join(metadata_directory, info, "METADATA"), "w", encoding="utf-8") as f:
        f.write(_metadata(version))
    return info


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    version = _version()
    tag = "py3-none-" + _platform_tag()
    info = "moe-%s.dist-info" % version
    wheel_name = "moe-%s-%s.whl" % (version, tag)
    with tempfile.TemporaryDirectory() as tmp:
        lib_path = os.path.join(tmp, _lib_name())
        _compile(lib_path)
        with open(os.path.join(HERE, "moe.py"), "rb") as f:
            moe_py = f.read()
        with open(lib_path, "rb") as f:
            lib = f.read()
        files = [("moe.py", moe_py), ("moe.libs/" + _lib_name(), lib),
                 (info + "/METADATA", _metadata(version).encode()),
                 (info + "/WHEEL", ("Wheel-Version: 1.0\nGenerator: moe_build\nRoot-Is-Purelib: false\nTag: %s\n" % tag).encode())]
        record = [_record_line(n, d) for n, d in files] + [info + "/RECORD,,"]
        files.append((info + "/RECORD", ("\n".join(record) + "\n").encode()))
        out = os.path.join(wheel_directory, wheel_name)
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in files:
                zi = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
                zi.external_attr = (0o755 if name.endswith(_lib_name()) else 0o644) << 16
                zi.compress_type = zipfile.ZIP_DEFLATED
                z.writestr(zi, data)
    return wheel_name


def build_sdist(sdist_directory, config_settings=None):
    """A source archive that builds anywhere: this folder plus the C files in csrc/."""
    version = _version()
    base = "moe-%s" % version
    name = base + ".tar.gz"
    src = _source_dir()
    with tarfile.open(os.path.join(sdist_directory, name), "w:gz", format=tarfile.PAX_FORMAT) as t:
        for f in ("pyproject.toml", "moe_build.py", "moe.py"):
            t.add(os.path.join(HERE, f), arcname=base + "/" + f)
        for f in C_FILES + HEADERS:
            t.add(os.path.join(src, f), arcname=base + "/csrc/" + f)
        info = tarfile.TarInfo(base + "/PKG-INFO")
        data = _metadata(version).encode()
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    return name
