#!/usr/bin/python
"""Ansible module: unpack Debian packages into a prefix without root."""

from __future__ import annotations

import glob
import os
import re
import subprocess

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: user_space_packages
short_description: Unpack Debian packages and the shared libraries they lack into a prefix
description:
  - Downloads packages with C(apt-get download) and unpacks them with C(dpkg -x), which
    needs no root.
  - Then runs C(ldd) over every ELF file under the prefix. For each soname that is not
    found, it looks for a C(lib*) package among the recursive dependencies of I(packages),
    unpacks it and checks again until nothing is missing.
  - Reports changed only when it unpacked something.
options:
  prefix:
    description: Directory that receives the unpacked trees.
    type: path
    required: true
  packages:
    description: Packages to unpack. An already unpacked package is kept as it is.
    type: list
    elements: str
    required: true
  apt_options:
    description: Extra C(-o) settings for apt-get and apt-cache, such as private lists.
    type: list
    elements: str
    default: []
"""

RETURN = r"""
unpacked:
  description: Packages unpacked by this run, in order.
  type: list
  returned: always
library_dirs:
  description: Directories under the prefix that hold shared libraries.
  type: list
  returned: always
"""

# Each round unpacks at least one package or stops, so this bound only cuts off a
# dependency chain that keeps bringing in libraries with missing libraries of their own.
MAX_ROUNDS = 10
PACKAGE_TREES = ("usr", "lib", "lib64", "bin", "sbin", "opt")
NOT_FOUND = re.compile(r"^\s*(\S+) => not found", re.MULTILINE)


class PackageError(Exception):
    pass


def run(argv, cwd=None, env=None):
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise PackageError(
            f"{' '.join(argv)} failed with exit code {result.returncode}: "
            f"{result.stderr.strip()[-2000:]}"
        )
    return result.stdout


def apt_args(apt_options):
    args = []
    for option in apt_options:
        args += ["-o", option]
    return args


def marker_path(prefix, package):
    return os.path.join(prefix, "var", "lib", "tunefleet-unpacked", package)


def is_unpacked(prefix, package):
    return os.path.exists(marker_path(prefix, package))


def download(packages, download_dir, apt_options):
    """Download `packages` and return {package: path of its .deb}."""
    os.makedirs(download_dir, exist_ok=True)
    run(["apt-get", *apt_args(apt_options), "download", *packages], cwd=download_dir)
    found = {}
    for package in packages:
        # apt-get download names files PACKAGE_VERSION_ARCH.deb.
        matches = sorted(glob.glob(os.path.join(download_dir, f"{package}_*.deb")))
        if not matches:
            raise PackageError(f"apt-get download left no .deb for {package} in {download_dir}")
        found[package] = matches[-1]
    return found


def unpack(prefix, package, deb_path):
    # dpkg-deb -x gives PREFIX the mode of the archive's "./" entry (0755), so put back
    # the mode PREFIX had.
    mode = os.stat(prefix).st_mode & 0o7777
    run(["dpkg-deb", "-x", deb_path, prefix])
    os.chmod(prefix, mode)
    marker = marker_path(prefix, package)
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    with open(marker, "w") as handle:
        handle.write(os.path.basename(deb_path) + "\n")


def sonames_in_deb(deb_path):
    # A soname is usually a symlink, listed as "... ./usr/lib/libfoo.so.1 -> libfoo.so.1.2.3",
    # so both sides of the arrow count.
    names = set()
    for line in run(["dpkg-deb", "-c", deb_path]).splitlines():
        path = line.split(None, 5)[-1]
        for part in path.split(" -> "):
            names.add(os.path.basename(part.strip()))
    return {name for name in names if ".so" in name}


def elf_files(prefix):
    # Only the trees that Debian packages install into, so that a data directory or a
    # nested prefix (psycopg2 under PREFIX/python) is never walked.
    for top in PACKAGE_TREES:
        yield from _elf_files_under(os.path.join(prefix, top))


def _elf_files_under(tree):
    for root, _dirs, files in os.walk(tree):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            with open(path, "rb") as handle:
                if handle.read(4) == b"\x7fELF":
                    yield path


def library_dirs(prefix):
    dirs = set()
    for path in elf_files(prefix):
        if ".so" in os.path.basename(path):
            dirs.add(os.path.dirname(path))
    return sorted(dirs)


def missing_sonames(prefix):
    """Return {soname: [files that need it]} for sonames ldd cannot find."""
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(library_dirs(prefix)), LC_ALL="C")
    missing = {}
    for path in elf_files(prefix):
        # ldd exits non-zero on static binaries and non-dynamic objects: not our concern.
        result = subprocess.run(["ldd", path], env=env, capture_output=True, text=True)
        for soname in NOT_FOUND.findall(result.stdout):
            missing.setdefault(soname, []).append(os.path.relpath(path, prefix))
    return missing


def library_candidates(packages, apt_options):
    """Return the lib* packages in the dependency closure of `packages` not installed on the host."""
    output = run(
        ["apt-cache", *apt_args(apt_options), "depends", "--recurse", "--no-recommends",
         "--no-suggests", "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances",
         *packages]
    )
    # Lines without leading blanks name packages; "<name>" marks a virtual package.
    names = [line.strip() for line in output.splitlines() if line and not line[0].isspace()]
    names = sorted({name for name in names if name.startswith("lib") and "<" not in name})
    installed = run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n"])
    on_host = {line.split()[0] for line in installed.splitlines() if " ii" in line}
    return [name for name in names if name not in on_host]


def normalize(name):
    return re.sub(r"[^a-z0-9]", "", name.lower())


def likely_providers(soname, candidates):
    """Order candidates so that Debian's naming rule (libfoo.so.1 in libfoo1) comes first."""
    stem = normalize(soname.split(".so")[0])
    return [name for name in candidates if normalize(name).startswith(stem)]


class Resolver:
    def __init__(self, prefix, roots, apt_options):
        self.prefix = prefix
        self.roots = roots
        self.apt_options = apt_options
        self.download_dir = os.path.join(prefix, "var", "cache", "tunefleet-debs")
        self.provides = {}
        self.unpacked = []
        self._candidates = None

    def candidates(self):
        if self._candidates is None:
            self._candidates = library_candidates(self.roots, self.apt_options)
        return self._candidates

    def index(self, packages):
        packages = [name for name in packages if name not in self.provides]
        if packages:
            for package, deb in download(packages, self.download_dir, self.apt_options).items():
                self.provides[package] = (deb, sonames_in_deb(deb))

    def unpack_providers(self, sonames):
        progress = False
        for package, (deb, provided) in sorted(self.provides.items()):
            if provided & sonames and not is_unpacked(self.prefix, package):
                unpack(self.prefix, package, deb)
                self.unpacked.append(package)
                progress = True
        return progress

    def resolve_round(self, missing):
        sonames = set(missing)
        guesses = [name for soname in sonames for name in likely_providers(soname, self.candidates())]
        self.index(guesses)
        if self.unpack_providers(sonames):
            return True
        # The naming rule failed (libicuuc.so.72 ships in libicu72), so read every candidate.
        self.index(self.candidates())
        return self.unpack_providers(sonames)


def ensure_packages(prefix, packages, apt_options):
    unpacked = []
    requested = [name for name in packages if not is_unpacked(prefix, name)]
    if requested:
        download_dir = os.path.join(prefix, "var", "cache", "tunefleet-debs")
        for package, deb in download(requested, download_dir, apt_options).items():
            unpack(prefix, package, deb)
            unpacked.append(package)
    return unpacked


def resolve_libraries(prefix, packages, apt_options):
    resolver = Resolver(prefix, packages, apt_options)
    for _ in range(MAX_ROUNDS):
        missing = missing_sonames(prefix)
        if not missing:
            return resolver.unpacked
        if not resolver.resolve_round(missing):
            break
    missing = missing_sonames(prefix)
    if missing:
        details = "; ".join(f"{soname} (needed by {files[0]})" for soname, files in sorted(missing.items()))
        raise PackageError(
            f"shared libraries still missing after unpacking {resolver.unpacked or 'nothing'}: "
            f"{details}. Install the packages that provide them on the host"
        )
    return resolver.unpacked


def main():
    module = AnsibleModule(
        argument_spec=dict(
            prefix=dict(type="path", required=True),
            packages=dict(type="list", elements="str", required=True),
            apt_options=dict(type="list", elements="str", default=[]),
        ),
        supports_check_mode=True,
    )
    prefix = module.params["prefix"]
    packages = module.params["packages"]
    apt_options = module.params["apt_options"]

    if module.check_mode:
        requested = [name for name in packages if not is_unpacked(prefix, name)]
        missing = sorted(missing_sonames(prefix)) if os.path.isdir(prefix) else []
        module.exit_json(changed=bool(requested or missing), unpacked=requested, missing=missing,
                         library_dirs=library_dirs(prefix) if os.path.isdir(prefix) else [])

    unpacked = []
    try:
        os.makedirs(prefix, exist_ok=True)
        unpacked += ensure_packages(prefix, packages, apt_options)
        unpacked += resolve_libraries(prefix, packages, apt_options)
    except PackageError as error:
        module.fail_json(msg=str(error), changed=bool(unpacked), unpacked=unpacked)
    module.exit_json(changed=bool(unpacked), unpacked=unpacked, library_dirs=library_dirs(prefix))


if __name__ == "__main__":
    main()
