#!/usr/bin/env python3
"""Deterministic node_modules-like trees for the benchmarks.

gen_tree.py DIR N SEED
    N files. Sizes: ~72% under 4 KiB, ~25.5% 4-32 KiB, ~2.3% 64-256 KiB, ~0.2% 1-3 MiB;
    text-like, compressible content (like real JavaScript packages). Used by benches/core.

gen_tree.py --profile node_modules DIR N SEED
    N regular files laid out like a real node_modules, with its size distribution (about 300 MB
    for N = 30,000; bytes scale with N):
    - ~76% of files under 4 KiB, ~22% 4-64 KiB, ~1% (a few hundred) 64 KiB-1 MiB, and N/1,200
      (25 for 30,000) of 2-16 MiB that hold about 40% of the bytes, like the bundled compilers
      and native binaries of a real install;
    - JavaScript-like text (Zipf-distributed tokens) that zstd -3 compresses about 3-4x, and
      incompressible binaries (.node, .wasm: about a third of the big files, a few mid-size);
    - per package: package.json, README.md, a LICENSE that is one of a few identical texts
      (duplicate content), sources nested in lib/, dist/esm/, src/components/..., and some
      packages copied whole into another's nested node_modules (duplicate subtrees);
    - node_modules/.bin/ symlinks to packages' CLI scripts (not counted in N).
Same DIR N SEED, same tree, byte for byte."""
import itertools
import os
import random
import shutil
import sys


def legacy(d, n, seed):
    r = random.Random(seed)
    words = ["".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(2, 9))) for _ in range(3000)]
    corpus = (" ".join(r.choice(words) + (";\n" if r.random() < .1 else "") for _ in range(400000))).encode()
    pkgs = [f"pkg-{i}" for i in range(max(1, n // 40))]
    for i in range(n):
        p = r.random()
        size = (r.randint(20, 4096) if p < .72 else r.randint(4096, 32768) if p < .975
                else r.randint(65536, 262144) if p < .998 else r.randint(1 << 20, 3 << 20))
        pkg = r.choice(pkgs)
        sub = r.choice(["", "lib/", "dist/", "src/", "lib/util/", "dist/esm/"])
        path = os.path.join(d, "node_modules", pkg, sub, f"f{i}.js")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        off = r.randrange(0, len(corpus) - min(size, len(corpus) - 1))
        body = corpus[off:off + size]
        while len(body) < size:
            body += corpus[:size - len(body)]
        with open(path, "wb") as f:
            f.write(f"// {pkg} file {i} seed {seed}\n".encode() + body)


KEYWORDS = ("const let var function return if else for while new this typeof instanceof import export "
            "from default class extends async await try catch throw null undefined true false module "
            "exports require prototype length value props children state options callback").split()
PUNCT = ["(", ")", "{", "}", "[", "]", ";", ",", ".", " = ", " === ", " !== ", " => ", " && ", " || ",
         ": ", " + ", " ? ", "\n", "\n  ", "\n    ", "\n      ", "'", '"', "0", "1", "/* ", " */"]
LICENSES = [
    "MIT License\n\nCopyright (c) {who}\n\n" + "Permission is hereby granted, free of charge, to any person "
    "obtaining a copy of this software and associated documentation files (the \"Software\"), to deal in "
    "the Software without restriction, including without limitation the rights to use, copy, modify, "
    "merge, publish, distribute, sublicense, and/or sell copies of the Software.\n" * 2,
    "ISC License\n\nCopyright (c) {who}\n\nPermission to use, copy, modify, and/or distribute this software "
    "for any purpose with or without fee is hereby granted, provided that the above copyright notice and "
    "this permission notice appear in all copies.\n",
    "Apache License\nVersion 2.0, January 2004\nhttp://www.apache.org/licenses/\n\n" + "TERMS AND CONDITIONS "
    "FOR USE, REPRODUCTION, AND DISTRIBUTION: the definitions, the grant of copyright license, the grant "
    "of patent license, redistribution, submission of contributions, trademarks, disclaimer of warranty, "
    "limitation of liability, accepting warranty or additional liability.\n" * 40,
    "BSD 2-Clause License\n\nCopyright (c) {who}\nAll rights reserved.\n\nRedistribution and use in source "
    "and binary forms, with or without modification, are permitted provided that the following "
    "conditions are met.\n",
]


def node_modules(d, n, seed):
    r = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    idents = ["".join(r.choice(letters) for _ in range(r.randint(1, 12))) for _ in range(20000)]
    idents = [w[0] + w[1:].capitalize() if r.random() < .3 and len(w) > 4 else w for w in idents]
    # JavaScript-like text: lines of Zipf-distributed tokens (punctuation and keywords most
    # common). Each stretch of the corpus reuses ~300 lines drawn from a global pool, with 30 %
    # fresh lines, so it repeats itself the way a module does: zstd -3 compresses it 3.5-4x
    # (small files less, as real ones).
    vocab = PUNCT + KEYWORDS + idents
    cum = list(itertools.accumulate(1.0 / (i + 1) for i in range(len(vocab))))
    seps = [" ", " ", " ", "", ".", "(", ")", ", "]

    def line():
        k = r.randint(2, 10)
        toks = r.choices(vocab, cum_weights=cum, k=k)
        return "  " * r.randint(0, 4) + "".join(t + s for t, s in zip(toks, r.choices(seps, k=k))) + "\n"

    pool = [line() for _ in range(100000)]
    line_cum = list(itertools.accumulate(1.0 / (i + 1) ** 0.8 for i in range(300)))
    # A 48 MiB corpus to slice text from: large enough that slices rarely overlap within a
    # compressor's window, so a .tar.zst gains no artificial cross-file matches.
    parts, size, target = [], 0, 48 << 20
    while size < target:
        local = r.sample(pool, 300)
        chunk = "".join(line() if r.random() < .3 else x for x in r.choices(local, cum_weights=line_cum, k=500))
        parts.append(chunk)
        size += len(chunk)
    corpus = "".join(parts).encode()[:target]

    def text(size, header):
        off = r.randrange(0, len(corpus) - size) if size < len(corpus) else 0
        body = header.encode() + corpus[off:off + size]
        while len(body) < size:
            body += corpus[:size - len(body)]
        return body[:size]

    def loguniform(lo, hi, skew=1.0):
        return int(lo * (hi / lo) ** (r.random() ** skew))

    # Packages: ~1 per 40 files, 20% scoped; file counts Pareto-distributed (a few packages like
    # typescript or @babel/* have thousands of files, most have a handful).
    npk = max(1, n // 40)
    names = set()
    while len(names) < npk:
        base = "-".join(r.choice(idents[:3000]).lower() for _ in range(r.randint(1, 2)))
        names.add(f"@{r.choice(idents[:200]).lower()}/{base}" if r.random() < .2 else base)
    names = sorted(names)
    r.shuffle(names)
    dup_budget = n * 3 // 100
    budget = n - dup_budget - 3 * npk
    shares = [r.paretovariate(1.2) for _ in names]
    total = sum(shares)
    counts = [max(1, int(budget * s / total)) for s in shares]
    counts[0] += budget - sum(counts)
    while counts[0] < 1:
        i = max(range(len(counts)), key=counts.__getitem__)
        counts[i] -= 1
        counts[0] += 1
    huge_left = max(1, round(n / 1200))
    mid_p = 0.010
    nm = os.path.join(d, "node_modules")
    written = 0
    small_pkgs = []
    bins = []

    def write(path, data):
        nonlocal written
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        written += 1

    subs = ["", "lib/", "dist/", "dist/esm/", "dist/cjs/", "src/", "lib/util/", "types/", "build/",
            "src/components/", "src/internal/utils/", "dist/esm/internal/", "locale/", "es/", "umd/"]
    huge_slots = set(r.sample(range(budget), min(huge_left, budget)))
    slot = 0
    for name, count in zip(names, counts):
        root = os.path.join(nm, name)
        ver = f"{r.randint(0, 12)}.{r.randint(0, 30)}.{r.randint(0, 20)}"
        write(os.path.join(root, "package.json"), text(r.randint(400, 2500),
              f'{{\n  "name": "{name}",\n  "version": "{ver}",\n  "main": "lib/index.js",\n  "description": "'))
        write(os.path.join(root, "LICENSE"), r.choice(LICENSES).format(who="the authors").encode())
        write(os.path.join(root, "README.md"), text(loguniform(300, 16000), f"# {name}\n\n"))
        pkg_subs = r.sample(subs, r.randint(1, min(6, len(subs))))
        for j in range(count):
            sub = r.choice(pkg_subs)
            if r.random() < .15:
                sub += f"{r.choice(idents[:2000]).lower()}/"
            stem = r.choice(idents[:8000]) + (f"-{j}" if r.random() < .5 else f"{j}")
            if slot in huge_slots:
                if r.random() < .35:
                    size, binary, ext = loguniform(2 << 20, 16 << 20, 2.2), True, r.choice([".node", ".wasm"])
                else:
                    size, binary, ext = loguniform(2 << 20, 16 << 20, 2.2), False, ".js"
            else:
                p = r.random()
                binary = False
                if p < .76:
                    size = loguniform(40, 4096, 0.8)
                elif p < 1 - mid_p:
                    size = loguniform(4096, 65536, 2.6)
                else:
                    size = loguniform(65536, 1 << 20, 1.6)
                    binary = r.random() < .1
                ext = ".wasm" if binary else r.choices(
                    [".js", ".mjs", ".cjs", ".d.ts", ".js.map", ".json", ".md", ".css"],
                    [50, 8, 5, 18, 10, 4, 3, 2])[0]
            slot += 1
            path = os.path.join(root, sub, stem + ext)
            if os.path.exists(path):
                path = os.path.join(root, sub, f"{stem}-{j}{ext}")
            write(path, r.randbytes(size) if binary else text(size, f"// {name}@{ver} {sub}{stem}{ext}\n"))
        if count <= 40:
            small_pkgs.append(name)
        if r.random() < .12:
            os.makedirs(os.path.join(root, "bin"), exist_ok=True)
            cli = os.path.join(root, "bin", "cli.js")
            write(cli, b"#!/usr/bin/env node\n" + text(r.randint(100, 3000), "'use strict';\n"))
            os.chmod(cli, 0o755)
            bins.append(name)
    # Duplicate subtrees: small packages copied into other packages' nested node_modules (npm
    # does this when versions conflict), until N files.
    parents = [p for p in names if not p.startswith("@")]
    while written < n and small_pkgs:
        name = r.choice(small_pkgs)
        src = os.path.join(nm, name)
        files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(src) for f in fs)
        parent = r.choice(parents)
        dst = os.path.join(nm, parent, "node_modules", name)
        if os.path.exists(dst) or parent == name or written + len(files) > n:
            small_pkgs.remove(name)
            continue
        for f in files:
            t = os.path.join(dst, os.path.relpath(f, src))
            os.makedirs(os.path.dirname(t), exist_ok=True)
            shutil.copy2(f, t)
            written += 1
    # Pad to exactly N with small duplicates of LICENSE texts (typings, vendored copies).
    i = 0
    while written < n:
        write(os.path.join(nm, r.choice(names), "vendor", f"LICENSE-{i}"),
              r.choice(LICENSES).format(who="contributors").encode())
        i += 1
    os.makedirs(os.path.join(nm, ".bin"), exist_ok=True)
    for name in bins:
        link = os.path.join(nm, ".bin", name.split("/")[-1])
        if not os.path.lexists(link):
            os.symlink(os.path.join("..", name, "bin", "cli.js"), link)


def main(argv):
    profile = None
    if len(argv) >= 2 and argv[0] == "--profile":
        profile, argv = argv[1], argv[2:]
    if len(argv) != 3:
        sys.exit(__doc__)
    d, n, seed = argv[0], int(argv[1]), int(argv[2])
    if profile is None:
        legacy(d, n, seed)
    elif profile == "node_modules":
        node_modules(d, n, seed)
    else:
        sys.exit(f"unknown profile {profile!r} (node_modules)")


if __name__ == "__main__":
    main(sys.argv[1:])
